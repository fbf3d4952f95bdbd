"""Shared-memory segments (``runtime/shm.py``): placement, zero-copy mapping, who removes each
file, and the supervisor's sweep. No processes: pids of dead processes come from a fake."""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.runtime import shm, wire

np = pytest.importorskip("numpy")

BIG = shm.THRESHOLD_BYTES


@pytest.fixture
def segment_dir(tmp_path: Path) -> Iterator[str]:
    """A run directory with its segment directory, configured for this process."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    path = shm.create_directory(str(run_dir))
    shm.configure(str(run_dir))
    yield path
    shm._spares.discard()
    shm.configure(None)
    shm.remove_directory(str(run_dir))
    assert not os.path.exists(path)


def _segments(path: str) -> list[str]:
    return sorted(os.listdir(path))


def test_the_directory_is_private(segment_dir: str) -> None:
    st = os.lstat(segment_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


def test_a_directory_others_can_read_turns_segments_off(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    path = shm.create_directory(str(run_dir))
    try:
        os.chmod(path, 0o755)
        shm.configure(str(run_dir))
        assert shm.directory() is None
        placed, created = shm.place([pickle.PickleBuffer(bytearray(BIG))])
        assert not created and type(placed[0]) is memoryview  # a frame instead
        with pytest.raises(PermissionError):
            shm.create_directory(str(run_dir))
    finally:
        os.chmod(path, 0o700)
        shm.remove_directory(str(run_dir))


def test_small_buffers_stay_frames(segment_dir: str) -> None:
    placed, created = shm.place([pickle.PickleBuffer(bytearray(BIG - 1))])
    assert type(placed[0]) is memoryview and not created
    assert _segments(segment_dir) == []


def test_a_request_segment_is_mapped_without_a_copy_and_removed_by_its_creator(segment_dir: str) -> None:
    array = np.arange(BIG // 4, dtype=np.float32)
    placed, created = shm.place([pickle.PickleBuffer(array)])
    [ref] = placed
    assert isinstance(ref, wire.SegmentRef) and ref.nbytes == array.nbytes
    assert oct(os.stat(created[0]).st_mode & 0o777) == "0o600"
    view = shm.attach(ref)
    assert ref.name in _segments(segment_dir)  # receiver pid 0: the receiver leaves it
    mapped = np.frombuffer(view, dtype=np.float32)
    assert np.array_equal(mapped, array) and not mapped.flags.writeable
    again = np.frombuffer(shm.attach(ref), dtype=np.float32)
    shm.release(created)
    shm.release(created)  # twice is fine
    assert ref.name not in _segments(segment_dir)
    assert np.array_equal(mapped, array) and np.array_equal(again, array)  # mappings outlive the file


def test_a_reply_segment_is_removed_by_its_receiver_as_it_maps_it(segment_dir: str) -> None:
    placed, _ = shm.place([pickle.PickleBuffer(bytearray(b"x" * BIG))], receiver_pid=os.getpid())
    [ref] = placed
    view = shm.attach(ref)
    assert not [n for n in _segments(segment_dir) if shm.SPARE not in n]  # a spare at most
    assert bytes(view[:3]) == b"xxx" and len(view) == BIG
    with pytest.raises(shm.SegmentError):
        shm.attach(ref)  # gone


def test_values_round_trip_through_segments(segment_dir: str) -> None:
    value = {"a": np.ones(BIG // 8), "b": bytes(BIG), "small": np.zeros(3)}
    enc, data, raw = wire.dumps_oob(value)
    placed, created = shm.place(raw)
    msg = wire.decode(wire.encode(wire.reply(wire.Kind.RESULT, 1, 1, enc, data, buffers=placed)))
    assert len(wire.encode(wire.reply(wire.Kind.RESULT, 1, 1, enc, data, buffers=placed))) == 1  # refs ride in the meta
    back = wire.loads(msg.meta["enc"], msg.payload[0], msg.buffers)
    assert np.array_equal(back["a"], value["a"]) and back["b"] == value["b"]
    shm.release(created)


def test_the_requests_own_segment_goes_back_uncopied(segment_dir: str) -> None:
    array = np.arange(BIG // 4, dtype=np.float32)
    placed, created = shm.place([pickle.PickleBuffer(array)])
    received = np.frombuffer(shm.attach(placed[0]), dtype=np.float32).reshape(2, -1)
    # A spare for the next segment may appear meanwhile (allocated by a background thread).
    before = {n for n in _segments(segment_dir) if shm.SPARE not in n}
    again, more = shm.place([pickle.PickleBuffer(received)], receiver_pid=12345, reuse=placed)
    assert again == placed and more == ()
    assert {n for n in _segments(segment_dir) if shm.SPARE not in n} == before  # nothing written
    part, written = shm.place([pickle.PickleBuffer(np.ascontiguousarray(received[0]))], reuse=placed)
    assert part == () or part[0] != placed[0]
    shm.release(created + written)


def test_attach_refuses_what_is_not_a_segment(segment_dir: str) -> None:
    with pytest.raises(shm.SegmentError):
        shm.attach(wire.SegmentRef("../../etc/passwd", 10))
    Path(segment_dir, "1-0-1").write_bytes(b"short")
    with pytest.raises(shm.SegmentError):
        shm.attach(wire.SegmentRef("1-0-1", 100))  # not the announced size


def test_sweep_removes_segments_of_dead_processes(segment_dir: str) -> None:
    for name in ("10-0-1", "10-20-2", "30-0-3", "30-40-4", "30-20-5", "not-a-segment"):
        Path(segment_dir, name).write_bytes(b"x")
    dead = {20, 40}

    def alive(pid: int) -> bool:
        return pid not in dead

    assert sorted(shm.sweep(segment_dir, alive)) == ["10-20-2", "30-20-5", "30-40-4"]
    dead.add(10)
    assert shm.sweep(segment_dir, alive) == ["10-0-1"]
    assert _segments(segment_dir) == ["30-0-3", "not-a-segment"]


def test_a_spare_is_taken_over_and_cut_to_size(segment_dir: str) -> None:
    mib = 1024 * 1024
    _, created = shm.place([pickle.PickleBuffer(bytearray(BIG + 2 * mib))])
    future: Any = shm._spares._next
    spare_path, spare_size = future.result(timeout=30)
    assert spare_size == BIG + 2 * mib and os.path.exists(spare_path)
    second, more = shm.place([pickle.PickleBuffer(bytearray(b"y" * (BIG + mib - 5)))])
    assert not os.path.exists(spare_path)  # renamed into the new segment
    assert os.path.getsize(more[0]) == BIG + mib - 5
    assert bytes(shm.attach(second[0])[-2:]) == b"yy"
    shm.release(created + more)


def test_a_large_buffer_is_copied_in_two_halves_intact(segment_dir: str) -> None:
    data = np.random.default_rng(3).integers(0, 255, shm._SPLIT_BYTES + 12345, dtype=np.uint8)
    placed, created = shm.place([pickle.PickleBuffer(data)])
    assert np.array_equal(np.frombuffer(shm.attach(placed[0]), dtype=np.uint8), data)
    shm.release(created)
