"""shoal.controller.gpus: the GPU allocator (pure), device detection and the deploy check."""

from __future__ import annotations

import pytest

from shoal.controller.gpus import GpuPool, check_request, detect_gpus, parse_gpus


@pytest.mark.parametrize(
    ("value", "ids"),
    [(2, ("0", "1")), (0, ()), ("3", ("0", "1", "2")), ("0,2", ("0", "2")), (["a", "b"], ("a", "b")), ([1, 3], ("1", "3"))],
)
def test_parse_gpus(value: object, ids: tuple[str, ...]) -> None:
    assert parse_gpus(value) == ids  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, "0,0", True])
def test_parse_gpus_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_gpus(value)  # type: ignore[arg-type]


def test_detection_declared_then_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_gpus(("7",), {"CUDA_VISIBLE_DEVICES": "1,3"}) == ("7",)
    assert detect_gpus(None, {"CUDA_VISIBLE_DEVICES": "1,3"}) == ("1", "3")
    assert detect_gpus(None, {"CUDA_VISIBLE_DEVICES": ""}) == ()
    monkeypatch.setenv("PATH", "")  # no nvidia-smi to ask
    assert detect_gpus(None, {}) == ()


def test_whole_gpus_are_distinct_and_come_back_on_release() -> None:
    pool = GpuPool(("0", "1"))
    assert pool.allocate("a", 1) == ("0",)
    assert pool.allocate("b", 1) == ("1",)
    assert pool.allocate("c", 1) is None
    assert pool.shortage("D", 1, 1) == (
        "Deployment D has 1 replica waiting for resources: it asks for num_gpus=1 and 0 of 2 GPUs are free."
    )
    pool.release("a")
    assert pool.allocate("c", 1) == ("0",)
    assert pool.devices_of("c") == ("0",)


def test_several_whole_gpus_per_replica() -> None:
    pool = GpuPool(("0", "1", "2"))
    assert pool.allocate("a", 2) == ("0", "1")
    assert pool.allocate("b", 2) is None  # nothing was taken
    assert pool.allocate("c", 1) == ("2",)


def test_fractions_pack_onto_one_device_and_keep_whole_ones_free() -> None:
    pool = GpuPool(("0", "1"))
    assert pool.allocate("a", 0.5) == ("0",)
    assert pool.allocate("b", 0.5) == ("0",)
    assert pool.allocate("c", 0.25) == ("1",)
    assert pool.allocate("d", 0.5) == ("1",)  # the fullest device it fits on
    assert pool.allocate("e", 1) is None  # no device is wholly free
    assert pool.allocate("f", 0.3) is None
    assert "no GPU has 0.3 free" in pool.shortage("D", 2, 0.3)
    pool.release("a")
    pool.release("b")
    assert pool.allocate("e", 1) == ("0",)


def test_thirds_fit_exactly() -> None:
    pool = GpuPool(("0",))
    assert [pool.allocate(owner, 1 / 3) for owner in "abc"] == [("0",)] * 3
    assert pool.allocate("d", 0.01) is None


def test_zero_gpus_take_nothing_and_an_owner_holds_once() -> None:
    pool = GpuPool(())
    assert pool.allocate("a", 0) == ()
    pool = GpuPool(("0",))
    pool.allocate("a", 0.5)
    with pytest.raises(ValueError):
        pool.allocate("a", 0.5)
    pool.release("nobody")  # nothing held: nothing happens


@pytest.mark.parametrize(
    ("num_gpus", "devices", "problem"),
    [
        (0, 0, None),
        (1, 2, None),
        (2, 2, None),
        (0.5, 1, None),
        (3, 2, "asks for more GPUs per replica than this machine has (2)"),
        (0.5, 0, "than this machine has (0)"),
        (1.5, 4, "must be a whole number"),
    ],
)
def test_check_request(num_gpus: float, devices: int, problem: str | None) -> None:
    found = check_request(num_gpus, devices)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "num_gpus" in found
