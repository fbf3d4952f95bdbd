"""``DeploymentHandle.options`` accepts exactly Ray 2.60's keywords (no process is started:
``options`` only makes a new handle)."""

from __future__ import annotations

import pickle

import pytest

from shoal.serve.handle import DeploymentHandle


def handle() -> DeploymentHandle[object]:
    return DeploymentHandle("D", "app")


@pytest.mark.parametrize("keyword", ["use_new_handle_api", "_locality_routing", "methodname", "timeout_s"])
def test_an_unknown_keyword_is_a_type_error_naming_it(keyword: str) -> None:
    with pytest.raises(TypeError, match=keyword):
        handle().options(**{keyword: True})


def test_known_keywords_change_a_copy() -> None:
    h = handle()
    derived = h.options(method_name="m", multiplexed_model_id="model-1", session_id="s", stream=True,
                        _by_reference=False, request_serialization="PICKLE", response_serialization="cloudpickle")
    opts = derived.handle_options
    assert (opts.method_name, opts.multiplexed_model_id, opts.session_id, opts.stream) == ("m", "model-1", "s", True)
    assert (opts.request_serialization, opts.response_serialization) == ("pickle", "cloudpickle")
    assert h.handle_options.method_name == "__call__" and not h.handle_options.stream
    assert derived.handle_id == h.handle_id
    # Options survive pickling (handles passed into other deployments).
    assert pickle.loads(pickle.dumps(derived)).handle_options == opts


def test_attribute_access_is_a_method_name_but_real_members_win() -> None:
    h = handle()
    assert h.some_method.handle_options.method_name == "some_method"
    for member in ("broadcast", "remote", "options", "shutdown", "shutdown_async", "choose_replica", "dispatch",
                   "running_replicas_populated", "_init"):
        assert callable(getattr(h, member)) and not isinstance(getattr(h, member), DeploymentHandle)
    assert h.deployment_id == "Deployment(name='D', app='app')"


def test_serialization_methods_are_validated_as_ray_does() -> None:
    with pytest.raises(ValueError, match="Unsupported request serialization method: bogus"):
        handle().options(request_serialization="bogus")
    with pytest.raises(ValueError, match="Unsupported response serialization method: yaml"):
        handle().options(response_serialization="yaml")
    for method in ("msgpack", "orjson", "noop"):
        with pytest.raises(ValueError, match=f"request_serialization='{method}'.*not supported by shoal"):
            handle().options(request_serialization=method)


def test_by_reference_true_is_refused() -> None:
    with pytest.raises(ValueError, match="_by_reference=True"):
        handle().options(_by_reference=True)


def test_prefer_local_routing_warns_as_deprecated() -> None:
    with pytest.warns(UserWarning, match="Modifying `_prefer_local_routing` with `options\\(\\)` is deprecated"):
        handle().options(_prefer_local_routing=True)


def test_init_once() -> None:
    h = handle()
    assert not h.is_initialized and not h.running_replicas_populated()
    h._init(_prefer_local_routing=True)
    assert h.is_initialized
    with pytest.raises(RuntimeError, match="Handle has already been initialized"):
        h._init()
    with pytest.raises(TypeError, match="_bogus"):
        handle()._init(_bogus=1)  # type: ignore[call-arg]
