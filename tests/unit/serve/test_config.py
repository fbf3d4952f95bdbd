"""shoal.serve.config: defaults, validation messages and helpers of the public config models."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pydantic
import pytest

from shoal.serve.config import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    BackpressureConfig,
    ControllerOptions,
    DeploymentID,
    GangSchedulingConfig,
    HTTPOptions,
    ProxyLocation,
    RequestRouterConfig,
    gRPCOptions,
)

AUTOSCALING_DEFAULTS: dict[str, Any] = {
    "min_replicas": 1,
    "initial_replicas": None,
    "max_replicas": 1,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 10.0,
    "look_back_period_s": 30.0,
    "smoothing_factor": 1.0,
    "upscale_smoothing_factor": None,
    "downscale_smoothing_factor": None,
    "upscaling_factor": None,
    "downscaling_factor": None,
    "upscale_delay_s": 30.0,
    "downscale_delay_s": 600.0,
    "downscale_to_zero_delay_s": None,
    "aggregation_function": "mean",
}


@pytest.mark.parametrize(("field", "expected"), sorted(AUTOSCALING_DEFAULTS.items()))
def test_autoscaling_defaults(field: str, expected: Any) -> None:
    assert getattr(AutoscalingConfig(), field) == expected


def test_autoscaling_default_policy() -> None:
    policy = AutoscalingConfig().policy
    assert policy.policy_function == "shoal.serve.autoscaling_policy:default_autoscaling_policy"
    assert policy.policy_kwargs == {}
    assert policy.is_default_policy_function()


def test_autoscaling_default_classmethod() -> None:
    config = AutoscalingConfig.default()
    assert (config.target_ongoing_requests, config.min_replicas, config.max_replicas) == (2, 1, 100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"min_replicas": 3, "max_replicas": 2},
            "max_replicas (2) must be greater than or equal to min_replicas (3)!",
        ),
        (
            {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 1},
            "min_replicas (2) must be less than or equal to initial_replicas (1)!",
        ),
        (
            {"min_replicas": 0, "max_replicas": 5, "initial_replicas": 6},
            "max_replicas (5) must be greater than or equal to initial_replicas (6)!",
        ),
    ],
)
def test_autoscaling_replica_bounds(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoscalingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": -1},
        {"max_replicas": 0},
        {"target_ongoing_requests": 0},
        {"look_back_period_s": 0},
        {"upscale_delay_s": -1},
        {"downscale_to_zero_delay_s": -0.5},
        {"upscaling_factor": 0},
        {"aggregation_function": "median"},
    ],
)
def test_autoscaling_rejects_out_of_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        AutoscalingConfig(**kwargs)
    assert info.value.errors()[0]["loc"][0] == next(iter(kwargs))


def test_autoscaling_extra_key_is_named() -> None:
    with pytest.raises(ValueError, match="target_num_ongoing_requests_per_replica"):
        AutoscalingConfig(target_num_ongoing_requests_per_replica=1)


def test_scale_to_zero_and_initial_replicas_allowed() -> None:
    config = AutoscalingConfig(min_replicas=0, initial_replicas=0, max_replicas=3)
    assert (config.min_replicas, config.initial_replicas) == (0, 0)


def test_aggregation_function_is_case_insensitive() -> None:
    assert (
        AutoscalingConfig(aggregation_function="MAX").aggregation_function
        is AggregationFunction.MAX
    )
    assert AggregationFunction.MIN == "min"


@pytest.mark.parametrize(
    ("kwargs", "up", "down"),
    [
        ({}, 1.0, 1.0),
        ({"smoothing_factor": 0.5}, 0.5, 0.5),
        ({"smoothing_factor": 0.5, "upscale_smoothing_factor": 2.0}, 2.0, 0.5),
        ({"smoothing_factor": 0.5, "downscale_smoothing_factor": 0.3}, 0.5, 0.3),
        ({"upscale_smoothing_factor": 2.0, "upscaling_factor": 3.0}, 3.0, 1.0),
        ({"downscale_smoothing_factor": 0.3, "downscaling_factor": 0.1}, 1.0, 0.1),
    ],
)
def test_scaling_factors(kwargs: dict[str, Any], up: float, down: float) -> None:
    config = AutoscalingConfig(**kwargs)
    assert (config.get_upscaling_factor(), config.get_downscaling_factor()) == (up, down)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 600.0),
        ({"downscale_delay_s": 5}, 5.0),
        ({"downscale_to_zero_delay_s": 7}, 7.0),
        ({"downscale_to_zero_delay_s": 0}, 0.0),
    ],
)
def test_downscale_to_zero_delay(kwargs: dict[str, Any], expected: float) -> None:
    assert AutoscalingConfig(**kwargs).get_downscale_to_zero_delay_s() == expected


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("a:b:c", "at most one colon"),
        (":fn", "may not start or end with a colon"),
        ("mod:", "may not start or end with a colon"),
        ("nodots", "at least one dot or colon"),
        (".mod", "may not start or end with a dot"),
        ("mod.", "may not start or end with a dot"),
    ],
)
def test_policy_import_path_shape(path: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        AutoscalingPolicy(policy_function=path)


@pytest.mark.parametrize("path", ["pkg.mod:fn", "pkg.mod.fn", "mod:Class"])
def test_policy_import_path_accepted(path: str) -> None:
    assert AutoscalingPolicy(policy_function=path).policy_function == path


def test_policy_accepts_callable_and_kwargs() -> None:
    policy = AutoscalingPolicy(policy_function=json.dumps, policy_kwargs={"k": 1})
    assert policy.policy_function is json.dumps
    assert not policy.is_default_policy_function()
    assert AutoscalingConfig(policy={"policy_function": "m:f"}).policy.policy_function == "m:f"


def _context(total: float, queued: float | None) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID("D", "app"),
        deployment_name="D",
        app_name="app",
        current_num_replicas=1,
        target_num_replicas=1,
        running_replicas=[],
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=3,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=AutoscalingConfig(),
    )


@pytest.mark.parametrize(("total", "queued", "running"), [(5, 2, 3), (1, 4, 0), (3, None, 3)])
def test_context_running_requests(total: float, queued: float | None, running: float) -> None:
    assert _context(total, queued).total_running_requests == running


def test_context_has_reference_attributes() -> None:
    names = {f.name for f in dataclasses.fields(AutoscalingContext)} | {"total_running_requests"}
    assert names == {
        "deployment_id", "deployment_name", "app_name", "current_num_replicas",
        "target_num_replicas", "running_replicas", "total_num_requests",
        "total_queued_requests", "total_running_requests", "aggregated_metrics", "raw_metrics",
        "capacity_adjusted_min_replicas", "capacity_adjusted_max_replicas", "policy_state",
        "last_scale_up_time", "last_scale_down_time", "current_time", "config",
    }  # fmt: skip


def test_backpressure_config() -> None:
    assert BackpressureConfig() == BackpressureConfig(status_code=503, retry_after_s=None)
    assert BackpressureConfig(status_code=429, retry_after_s=1.2).status_code == 429
    for bad in ({"status_code": 500}, {"retry_after_s": -1}, {"retry": 1}):
        with pytest.raises(pydantic.ValidationError):
            BackpressureConfig(**bad)


def test_request_router_config_defaults() -> None:
    config = RequestRouterConfig()
    assert config.request_router_class == "shoal.runtime.request_router:PowerOfTwoChoicesRequestRouter"
    assert config.request_router_kwargs == {}
    assert (config.request_routing_stats_period_s, config.request_routing_stats_timeout_s) == (
        10,
        30,
    )
    assert (config.initial_backoff_s, config.backoff_multiplier, config.max_backoff_s) == (
        0.025,
        2,
        0.5,
    )


def test_request_router_kwargs_must_be_json() -> None:
    with pytest.raises(ValueError, match="request_router_kwargs is not JSON-serializable"):
        RequestRouterConfig(request_router_kwargs={"x": object()})


def test_http_options_defaults() -> None:
    options = HTTPOptions()
    assert (options.host, options.port, options.root_path) == ("127.0.0.1", 8000, "")
    assert (options.request_timeout_s, options.keep_alive_timeout_s) == (None, 90)
    assert options.ssl_keyfile is options.ssl_certfile is None
    assert options.middlewares == [] and options.location is None and options.num_cpus == 0
    assert options.max_request_body_bytes == 100 * 1024 * 1024
    assert options.graceful_shutdown_timeout_s == 20.0


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_http_port_in_range(port: int) -> None:
    assert HTTPOptions(port=port).port == port


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": -1},
        {"port": 65536},
        {"request_timeout_s": 0},
        {"max_request_body_bytes": 0},
        {"ssl_keyfile": "k.pem"},
        {"location": "Nowhere"},
        {"hots": "0.0.0.0"},
    ],
)
def test_http_options_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        HTTPOptions(**kwargs)


def test_http_options_validate_assignment() -> None:
    options = HTTPOptions()
    options.port = 9000
    with pytest.raises(pydantic.ValidationError):
        options.port = 70000
    assert options.port == 9000


def test_http_removed_fields() -> None:
    with pytest.raises(ValueError, match="`middlewares` in HTTPOptions has been removed"):
        HTTPOptions(middlewares=[object()])
    with pytest.raises(ValueError, match="`num_cpus` in HTTPOptions has been removed"):
        HTTPOptions(num_cpus=1)


def test_http_host_none_and_ssl_pair() -> None:
    assert HTTPOptions(host=None).host is None
    assert HTTPOptions(ssl_keyfile="k", ssl_certfile="c").ssl_certfile == "c"


def test_grpc_options_defaults() -> None:
    options = gRPCOptions()
    assert (options.port, options.grpc_servicer_functions) == (9000, [])
    assert (options.request_timeout_s, options.enable_reflection) == (None, True)


def test_proxy_location() -> None:
    assert [p.value for p in ProxyLocation] == ["Disabled", "HeadOnly", "EveryNode"]
    assert ProxyLocation("EveryNode") is ProxyLocation.EveryNode
    assert ProxyLocation.HeadOnly == "HeadOnly"


def test_controller_options_env_vars_only() -> None:
    options = ControllerOptions(runtime_env={"env_vars": {"A": "1"}})
    assert options.env_vars == {"A": "1"}
    with pytest.raises(ValueError, match="supports only 'env_vars'"):
        ControllerOptions(runtime_env={"pip": {}})


def test_deployment_id() -> None:
    deployment_id = DeploymentID(name="X", app_name="Y")
    assert str(deployment_id) == repr(deployment_id) == "Deployment(name='X', app='Y')"
    assert DeploymentID("X").app_name == "default"
    assert {deployment_id: 1}[DeploymentID("X", "Y")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        deployment_id.name = "Z"  # type: ignore[misc]


def test_gang_scheduling_config() -> None:
    assert GangSchedulingConfig(gang_size=2).gang_placement_strategy == "PACK"
    with pytest.raises(pydantic.ValidationError):
        GangSchedulingConfig(gang_size=0)
    with pytest.raises(pydantic.ValidationError):
        GangSchedulingConfig()  # type: ignore[call-arg]


def test_a_request_router_class_that_does_not_import_is_refused_naming_it() -> None:
    from shoal import serve
    from shoal.serve import _build

    @serve.deployment(request_router_config={"request_router_class": "no_such_module_x:Router"})
    def f() -> int:
        return 1

    with pytest.raises(ValueError, match="Deployment 'f': request_router_class 'no_such_module_x:Router' could not be imported"):
        _build.build(f.bind(), "app")
    with pytest.raises(ValueError, match="'json:JSONDecoder' is not a subclass of RequestRouter"):
        _build.build(f.options(request_router_config={"request_router_class": "json:JSONDecoder"}).bind(), "app")
    _build.build(f.options(request_router_config={}).bind(), "app")  # the default deploys
