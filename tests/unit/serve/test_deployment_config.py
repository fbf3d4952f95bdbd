"""shoal.serve._deployment_config: option validation, merging and the wire round trip."""

from __future__ import annotations

import json
import re
from typing import Any

import msgpack
import pydantic
import pytest

from shoal.serve._deployment_config import (
    DEPLOYMENT_OPTION_NAMES,
    DeploymentConfig,
    validate_options,
)
from shoal.serve.config import (
    AutoscalingConfig,
    BackpressureConfig,
    DeploymentActorConfig,
    GangSchedulingConfig,
    RequestRouterConfig,
)
from shoal.serve.schema import LoggingConfig

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is optional
    given = None


def custom_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    return 1, {}


SAMPLE_OPTIONS: dict[str, Any] = {
    "name": "Model",
    "num_replicas": 2,
    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0, "resources": {"x": 1}},
    "placement_group_bundles": [{"CPU": 1, "x": 2}],
    "placement_group_strategy": "SPREAD",
    "placement_group_bundle_label_selector": [{"zone": "a"}],
    "max_replicas_per_node": None,
    "user_config": {"threshold": 0.5, "labels": ["a", "b"]},
    "max_ongoing_requests": 3,
    "max_queued_requests": 10,
    "backpressure_config": {"status_code": 429, "retry_after_s": 1.5},
    "autoscaling_config": None,
    "graceful_shutdown_wait_loop_s": 0,
    "graceful_shutdown_timeout_s": 5,
    "health_check_period_s": 1,
    "health_check_timeout_s": 2.5,
    "logging_config": {"log_level": "DEBUG", "encoding": "JSON"},
    "request_router_config": {
        "request_router_class": "m:Router",
        "request_router_kwargs": {"k": 1},
    },
    "max_constructor_retry_count": 3,
    "gang_scheduling_config": None,
    "deployment_actors": [{"name": "cache", "size": 3}],
    "rolling_update_percentage": 0.5,
    "max_surge_percent": 25,
}


def test_option_names_match_the_decorator() -> None:
    assert len(set(DEPLOYMENT_OPTION_NAMES)) == len(DEPLOYMENT_OPTION_NAMES)
    assert set(DEPLOYMENT_OPTION_NAMES) == set(SAMPLE_OPTIONS)
    assert "version" not in DEPLOYMENT_OPTION_NAMES
    assert set(validate_options(SAMPLE_OPTIONS)) == set(SAMPLE_OPTIONS)


def test_defaults_match_reference() -> None:
    config = DeploymentConfig()
    assert (config.num_replicas, config.max_ongoing_requests, config.max_queued_requests) == (
        1,
        5,
        -1,
    )
    assert config.user_config is None and config.autoscaling_config is None
    assert (config.graceful_shutdown_wait_loop_s, config.graceful_shutdown_timeout_s) == (2, 20)
    assert (config.health_check_period_s, config.health_check_timeout_s) == (10, 30)
    assert config.max_constructor_retry_count == 20
    assert config.ray_actor_options == {"num_cpus": 1}
    assert config.backpressure_config == BackpressureConfig()
    assert config.request_router_config == RequestRouterConfig()
    assert config.logging_config is None
    assert (config.rolling_update_percentage, config.max_surge_percent) == (0.2, 0)
    assert config.user_configured_option_names == frozenset()
    assert config.target_initial_replicas() == 1


def test_normalizes_dicts_into_models() -> None:
    options = validate_options(SAMPLE_OPTIONS)
    assert options["backpressure_config"] == BackpressureConfig(status_code=429, retry_after_s=1.5)
    assert isinstance(options["logging_config"], LoggingConfig)
    assert isinstance(options["request_router_config"], RequestRouterConfig)
    assert options["deployment_actors"] == (DeploymentActorConfig(name="cache", size=3),)
    assert options["health_check_period_s"] == 1.0


# --- error messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_replicas": 0}, ValueError, "num_replicas is expected to larger than 0"),
        (
            {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}},
            ValueError,
            "Manually setting num_replicas is not allowed when autoscaling_config is provided.",
        ),
        ({"max_ongoing_requests": None}, ValueError, "`max_ongoing_requests` must be non-null, got None."),
        ({"max_ongoing_requests": 0}, ValueError, "max_ongoing_requests must be greater than 0"),
        ({"max_queued_requests": 0}, ValueError, "max_queued_requests must be -1 (no limit) or a positive integer."),
        ({"max_queued_requests": -2}, ValueError, "max_queued_requests must be -1 (no limit) or a positive integer."),
        ({"max_queued_requests": "3"}, TypeError, "max_queued_requests must be an integer."),
        ({"user_config": {"f": object()}}, ValueError, "user_config is not JSON-serializable: "),
        ({"user_config": {1, 2}}, ValueError, "user_config is not JSON-serializable: "),
        (
            {"ray_actor_options": {"num_returns": 2}},
            ValueError,
            "Specifying 'num_returns' in ray_actor_options is not allowed. Allowed options: ",
        ),
        ({"ray_actor_options": [1]}, TypeError, "for ray_actor_options. Expected a dictionary."),
        ({"ray_actor_options": {"num_cpus": -1}}, ValueError, "ray_actor_options['num_cpus'] must be greater than or equal to 0"),
        ({"ray_actor_options": {"num_gpus": "1"}}, TypeError, "ray_actor_options['num_gpus']"),
        ({"version": "v1"}, ValueError, "`version` in `@serve.deployment` has been removed"),
        ({"name": "a#b"}, ValueError, "Deployment names must not contain the '#' character"),
        ({"route_prefix": "/a"}, TypeError, "unexpected keyword argument 'route_prefix'"),
        ({"max_concurrent_queries": 3}, TypeError, "unexpected keyword argument 'max_concurrent_queries'"),
        ({"num_replicas": "many"}, ValueError, '`num_replicas` must be an int or "auto", but got: many'),
        ({"health_check_period_s": 0}, ValueError, "health_check_period_s must be greater than 0"),
        ({"graceful_shutdown_timeout_s": -1}, ValueError, "graceful_shutdown_timeout_s must be greater than or equal to 0"),
        ({"rolling_update_percentage": 0}, ValueError, "rolling_update_percentage must be in (0, 1]"),
        ({"max_surge_percent": 101}, ValueError, "max_surge_percent must be in [0, 100]"),
        ({"max_replicas_per_node": 0}, ValueError, "Invalid max_replicas_per_node 0. Valid values are None or an integer in the range of [1, 100]."),
        ({"max_replicas_per_node": 1.5}, TypeError, "for max_replicas_per_node. Expected None or an integer"),
        ({"placement_group_strategy": "RANDOM"}, ValueError, "Invalid placement_group_strategy 'RANDOM'"),
        ({"placement_group_bundles": []}, ValueError, "placement_group_bundles must be a non-empty list"),
        ({"deployment_actors": [{"name": "a"}, {"name": "a"}]}, ValueError, "Deployment actor names must be unique"),
    ],
)  # fmt: skip
def test_validation_messages(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        validate_options(options)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_replicas", 2.0),
        ("num_replicas", True),
        ("max_ongoing_requests", "5"),
        ("max_constructor_retry_count", 2.5),
        ("health_check_timeout_s", "30"),
        ("graceful_shutdown_wait_loop_s", True),
        ("autoscaling_config", 5),
        ("backpressure_config", "429"),
        ("logging_config", ["DEBUG"]),
        ("name", 3),
        ("placement_group_bundles", {"CPU": 1}),
        ("deployment_actors", "cache"),
        ("max_surge_percent", 0.5),
    ],
)
def test_wrong_type_names_option_and_expected_type(name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=re.escape(name)) as info:
        validate_options({name: value})
    assert "Expected" in str(info.value)


def test_model_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        validate_options({"autoscaling_config": {"min_replicas": 2, "max_replicas": 1}})
    with pytest.raises(pydantic.ValidationError, match="status_code"):
        validate_options({"backpressure_config": {"status_code": 500}})


# --- ray_actor_options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"num_cpus": 1}),
        ({"num_cpus": None}, {"num_cpus": 1}),
        ({"num_cpus": 0}, {"num_cpus": 0}),
        ({"num_gpus": 1}, {"num_gpus": 1, "num_cpus": 1}),
        ({"runtime_env": {"env_vars": {"A": "1"}}}, {"runtime_env": {"env_vars": {"A": "1"}}, "num_cpus": 1}),
    ],
)  # fmt: skip
def test_num_cpus_filled_in(given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_options({"ray_actor_options": given})["ray_actor_options"] == expected
    assert "num_cpus" not in given or given["num_cpus"] != 1  # the caller's dict is not modified


# --- num_replicas="auto" ---------------------------------------------------------------------


def test_auto_uses_default_autoscaling() -> None:
    options = validate_options({"num_replicas": "auto"})
    assert options["num_replicas"] is None
    assert options["autoscaling_config"] == AutoscalingConfig.default()


@pytest.mark.parametrize(
    "user",
    [
        {"max_replicas": 5, "upscale_delay_s": 1},
        AutoscalingConfig(max_replicas=5, upscale_delay_s=1),
    ],
)
def test_auto_merges_user_fields_and_user_wins(user: Any) -> None:
    config = validate_options({"num_replicas": "auto", "autoscaling_config": user})[
        "autoscaling_config"
    ]
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 5, 2)
    assert config.upscale_delay_s == 1


def test_auto_user_min_above_default_max_is_checked() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        validate_options({"num_replicas": "auto", "autoscaling_config": {"min_replicas": 200}})


def test_merged_auto_records_both_names() -> None:
    config = DeploymentConfig().merged({"num_replicas": "auto"})
    assert config.num_replicas is None
    assert config.user_configured_option_names == {"num_replicas", "autoscaling_config"}
    assert config.target_initial_replicas() == 1


# --- merged() --------------------------------------------------------------------------------


def test_merged_returns_copy_and_accumulates_names() -> None:
    base = DeploymentConfig()
    first = base.merged({"name": "A", "max_ongoing_requests": 7})
    second = first.merged({"user_config": {"a": 1}})
    assert base == DeploymentConfig()
    assert (second.max_ongoing_requests, second.user_config) == (7, {"a": 1})
    assert second.user_configured_option_names == {"name", "max_ongoing_requests", "user_config"}
    assert not hasattr(second, "name")


def test_merged_copies_user_values() -> None:
    user_config = {"a": [1]}
    config = DeploymentConfig().merged({"user_config": user_config})
    user_config["a"].append(2)
    assert config.user_config == {"a": [1]}


def test_int_num_replicas_replaces_autoscaling() -> None:
    autoscaled = DeploymentConfig().merged({"autoscaling_config": {"max_replicas": 4}})
    assert autoscaled.num_replicas is None
    fixed = autoscaled.merged({"num_replicas": 3})
    assert (fixed.num_replicas, fixed.autoscaling_config) == (3, None)
    assert fixed.target_initial_replicas() == 3


def test_autoscaling_none_falls_back_to_one_replica() -> None:
    autoscaled = DeploymentConfig().merged({"num_replicas": "auto"})
    assert autoscaled.merged({"autoscaling_config": None}).num_replicas == 1
    assert DeploymentConfig(num_replicas=4).merged({"autoscaling_config": None}).num_replicas == 4


def test_num_replicas_none_keeps_current() -> None:
    config = DeploymentConfig().merged({"num_replicas": 3}).merged({"num_replicas": None})
    assert config.num_replicas == 3
    autoscaled = DeploymentConfig().merged({"num_replicas": "auto"}).merged({"num_replicas": None})
    assert autoscaled.autoscaling_config is not None


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_replicas": 4}, 4),
        ({"autoscaling_config": {"min_replicas": 2, "max_replicas": 5}}, 2),
        ({"autoscaling_config": {"min_replicas": 0, "initial_replicas": 3, "max_replicas": 5}}, 3),
        ({"autoscaling_config": {"min_replicas": 0, "max_replicas": 5}}, 0),
    ],
)
def test_target_initial_replicas(options: dict[str, Any], expected: int) -> None:
    assert DeploymentConfig().merged(options).target_initial_replicas() == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"placement_group_strategy": "PACK"}, "If `placement_group_strategy` is provided, `placement_group_bundles` must also be provided."),
        ({"max_replicas_per_node": 2, "placement_group_bundles": [{"CPU": 1}]}, "Setting max_replicas_per_node is not allowed when placement_group_bundles is provided."),
        ({"placement_group_bundles": [{"GPU": 1}]}, "`CPU` requirement for the actor is 1, but the bundle only has 0."),
        ({"ray_actor_options": {"num_cpus": 0, "num_gpus": 2}, "placement_group_bundles": [{"GPU": 1}]}, "`GPU` requirement for the actor is 2"),
        ({"num_replicas": 3, "gang_scheduling_config": {"gang_size": 2}}, "num_replicas (3) must be a multiple of gang_size (2)."),
        ({"max_replicas_per_node": 1, "gang_scheduling_config": {"gang_size": 1}}, "max_replicas_per_node is not allowed when gang_scheduling_config"),
    ],
)  # fmt: skip
def test_combination_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DeploymentConfig().merged(options)


def test_combination_checked_across_merges() -> None:
    config = DeploymentConfig().merged(
        {"num_replicas": 4, "gang_scheduling_config": {"gang_size": 2}}
    )
    assert config.gang_scheduling_config == GangSchedulingConfig(gang_size=2)
    with pytest.raises(ValueError, match="must be a multiple of gang_size"):
        config.merged({"num_replicas": 5})


# --- wire round trip -------------------------------------------------------------------------


def _assert_plain(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            _assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain(item)
    else:
        assert value is None or type(value) in (str, int, float, bool, bytes), value


def _round_trips(config: DeploymentConfig) -> None:
    wire = config.to_wire()
    _assert_plain(wire)
    assert DeploymentConfig.from_wire(wire) == config
    packed = msgpack.packb(wire)
    assert DeploymentConfig.from_wire(msgpack.unpackb(packed)) == config
    # Compared as configs, not as wire dicts: pickled user objects hold sets, whose byte order
    # may differ between two pickles of equal objects.
    assert DeploymentConfig.from_wire(DeploymentConfig.from_wire(wire).to_wire()) == config


@pytest.mark.parametrize(
    "options",
    [
        {},
        SAMPLE_OPTIONS,
        {"num_replicas": "auto", "autoscaling_config": {"aggregation_function": "max"}},
        {"autoscaling_config": {"min_replicas": 0, "max_replicas": 9, "policy": {"policy_function": "m:f", "policy_kwargs": {"a": [1]}}}},
        {"logging_config": {"log_level": 30, "additional_log_standard_attrs": ["lineno"]}},
        {"num_replicas": 4, "gang_scheduling_config": {"gang_size": 2, "gang_placement_strategy": "SPREAD"}},
        {"user_config": [1, "two", {"three": 3.0}, None, True]},
    ],
)  # fmt: skip
def test_wire_round_trip(options: dict[str, Any]) -> None:
    _round_trips(DeploymentConfig().merged(options))


def test_wire_carries_enums_as_strings() -> None:
    wire = (
        DeploymentConfig()
        .merged({"num_replicas": "auto", "logging_config": {"encoding": "JSON"}})
        .to_wire()
    )
    assert wire["autoscaling_config"]["aggregation_function"] == "mean"
    assert wire["logging_config"]["encoding"] == "JSON"
    assert wire["user_configured_option_names"] == [
        "autoscaling_config",
        "logging_config",
        "num_replicas",
    ]


def test_wire_round_trip_with_callables() -> None:
    config = DeploymentConfig().merged(
        {
            "autoscaling_config": {"max_replicas": 3, "policy": {"policy_function": custom_policy}},
            "request_router_config": {"request_router_class": json.JSONDecoder},
        }
    )
    wire = msgpack.unpackb(msgpack.packb(config.to_wire()))
    restored = DeploymentConfig.from_wire(wire)
    assert restored.autoscaling_config is not None
    assert restored.autoscaling_config.policy.policy_function is custom_policy
    assert restored.request_router_config.request_router_class is json.JSONDecoder
    assert restored == config


if given is not None:
    _json = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=5)
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
        max_leaves=8,
    )  # fmt: skip
    _bounds = st.tuples(st.integers(0, 5), st.integers(0, 5)).map(sorted)
    _autoscaling = _bounds.flatmap(
        lambda b: st.fixed_dictionaries(
            {"min_replicas": st.just(b[0]), "max_replicas": st.just(max(b[1], 1, b[0]))},
            optional={
                "target_ongoing_requests": st.floats(0.1, 100),
                "upscale_delay_s": st.floats(0, 1000),
                "downscale_to_zero_delay_s": st.none() | st.floats(0, 1000),
                "aggregation_function": st.sampled_from(["mean", "MAX", "min"]),
                "upscaling_factor": st.none() | st.floats(0.1, 3),
            },
        )
    )
    _options = st.fixed_dictionaries(
        {},
        optional={
            "num_replicas": st.none() | st.integers(1, 10),
            "max_ongoing_requests": st.integers(1, 1000),
            "max_queued_requests": st.just(-1) | st.integers(1, 100),
            "user_config": _json,
            "graceful_shutdown_timeout_s": st.floats(0, 100),
            "health_check_period_s": st.floats(0.01, 100),
            "ray_actor_options": st.fixed_dictionaries(
                {}, optional={"num_cpus": st.floats(0, 8), "num_gpus": st.integers(0, 4),
                              "runtime_env": st.fixed_dictionaries({"env_vars": st.dictionaries(st.text(max_size=3), st.text(max_size=3))})}
            ),
            "backpressure_config": st.fixed_dictionaries(
                {"status_code": st.sampled_from([503, 429])}, optional={"retry_after_s": st.floats(0, 10)}
            ),
            "logging_config": st.fixed_dictionaries({}, optional={"log_level": st.sampled_from(["INFO", 10, 40]), "enable_access_log": st.booleans()}),
            "rolling_update_percentage": st.floats(0.01, 1),
            "max_surge_percent": st.integers(0, 100),
        },
    ).flatmap(
        lambda opts: st.just(opts)
        if isinstance(opts.get("num_replicas"), int)
        else st.one_of(st.just(opts), _autoscaling.map(lambda a: {**opts, "autoscaling_config": a}))
    )  # fmt: skip

    @settings(max_examples=200, deadline=None)
    @given(_options)
    def test_wire_round_trip_property(options: dict[str, Any]) -> None:
        _round_trips(DeploymentConfig().merged(options))

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_wire_round_trip_property() -> None:
        pass
