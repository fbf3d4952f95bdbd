"""The validated option set of one deployment (Ray Serve's ``DeploymentConfig``).

``validate_options(options)`` checks the keyword arguments a user gave ``@serve.deployment``,
``Deployment.options()`` or a config file, one by one, with Ray Serve's error types and
messages, and returns them normalized (dicts become the pydantic models). Wrong type ->
``TypeError`` naming the option; bad value -> ``ValueError``; unknown option -> ``TypeError``.

``DeploymentConfig`` is immutable; ``DeploymentConfig().merged(options)`` is the only way to
apply user options, and keeps the invariant "exactly one of ``num_replicas`` (int) and
``autoscaling_config`` is set". ``to_wire()`` / ``from_wire()`` carry it between processes as
msgpack-able plain values; the only ``bytes`` in it are cloudpickled user objects (a callable
autoscaling policy or request router, deployment actors), which travel between processes of the
same user only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import cloudpickle  # type: ignore[import-untyped, unused-ignore]
from pydantic import BaseModel

from shoal.serve.config import (
    AutoscalingConfig,
    BackpressureConfig,
    DeploymentActorConfig,
    GangSchedulingConfig,
    RequestRouterConfig,
)
from shoal.serve.schema import LoggingConfig

__all__ = ["DEPLOYMENT_OPTION_NAMES", "NO_EFFECT_OPTIONS", "DeploymentConfig", "validate_options"]

logger = logging.getLogger("shoal.serve")

_ONE_MACHINE = "shoal runs every replica as a process on this one machine"
NO_EFFECT_OPTIONS: dict[str, str] = {
    # Ray documents these as cluster scheduling: on one node they place nothing.
    "placement_group_bundles": f"placement groups reserve resources across a Ray cluster; {_ONE_MACHINE}",
    "placement_group_strategy": f"placement groups reserve resources across a Ray cluster; {_ONE_MACHINE}",
    "placement_group_bundle_label_selector": f"placement groups select Ray nodes by label; {_ONE_MACHINE}",
    "max_replicas_per_node": f"it spreads replicas over Ray nodes; {_ONE_MACHINE}",
    "gang_scheduling_config": f"gangs are placed together on Ray nodes; {_ONE_MACHINE}",
    "deployment_actors": "deployment actors are Ray actors; shoal has no Ray actors (use a deployment and a handle)",
    "fallback_strategy": f"ray_actor_options.fallback_strategy picks other Ray nodes; {_ONE_MACHINE}",
    # shoal's own mechanisms do the job these tune in Ray.
    "graceful_shutdown_wait_loop_s": (
        "a shoal replica does not poll: it stops the moment its last request ends, once every "
        "router has stopped sending to it (graceful_shutdown_timeout_s still bounds the wait)"
    ),
    "max_surge_percent": (
        "shoal's rolling update always starts a batch (rolling_update_percentage) of new replicas "
        "before it stops old ones, so running replicas never drop below the target"
    ),
    "metrics_interval_s": (
        "autoscaling_config.metrics_interval_s is deprecated in Ray; shoal's controller reads "
        "replica queue lengths every 0.25 s"
    ),
}

DEPLOYMENT_OPTION_NAMES: tuple[str, ...] = (
    "name",
    "num_replicas",
    "ray_actor_options",
    "placement_group_bundles",
    "placement_group_strategy",
    "placement_group_bundle_label_selector",
    "max_replicas_per_node",
    "user_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "backpressure_config",
    "autoscaling_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "logging_config",
    "request_router_config",
    "max_constructor_retry_count",
    "gang_scheduling_config",
    "deployment_actors",
    "rolling_update_percentage",
    "max_surge_percent",
)

ALLOWED_RAY_ACTOR_OPTIONS = frozenset(
    {
        "accelerator_type",
        "memory",
        "num_cpus",
        "num_gpus",
        "resources",
        "runtime_env",
        "label_selector",
        "fallback_strategy",
    }
)
PLACEMENT_GROUP_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MAX_REPLICAS_PER_NODE_MAX_VALUE = 100


@dataclass(frozen=True)
class DeploymentConfig:
    """Every option of one deployment, validated. Build it with ``DeploymentConfig().merged(...)``.

    ``num_replicas`` is None exactly when ``autoscaling_config`` decides the replica count.
    ``user_configured_option_names`` lists the options a user set explicitly (in code or in a
    config file); config-file values win over code values, code values over defaults.
    """

    num_replicas: int | None = 1
    max_ongoing_requests: int = 5
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    max_constructor_retry_count: int = 20
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    backpressure_config: BackpressureConfig = field(default_factory=BackpressureConfig)
    logging_config: LoggingConfig | None = None
    request_router_config: RequestRouterConfig = field(default_factory=RequestRouterConfig)
    rolling_update_percentage: float = 0.2
    max_surge_percent: int = 0
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    placement_group_bundle_label_selector: list[dict[str, str]] | None = None
    max_replicas_per_node: int | None = None
    gang_scheduling_config: GangSchedulingConfig | None = None
    deployment_actors: tuple[DeploymentActorConfig, ...] | None = None
    user_configured_option_names: frozenset[str] = frozenset()

    def merged(self, options: dict[str, Any]) -> DeploymentConfig:
        """A copy with ``options`` validated and applied, their names added to the user-set ones.

        ``name`` is validated but not stored. ``num_replicas=None`` keeps the current count.
        An int ``num_replicas`` drops autoscaling; an ``autoscaling_config`` (or ``"auto"``)
        sets ``num_replicas`` to None; ``autoscaling_config=None`` alone falls back to 1 replica.
        """
        normalized = validate_options(options)
        changes = {k: v for k, v in normalized.items() if k in _FIELD_NAMES}
        is_auto = options.get("num_replicas") == "auto"
        if changes.get("num_replicas", 0) is None and not is_auto:
            del changes["num_replicas"]
        if "autoscaling_config" in changes:
            if changes["autoscaling_config"] is not None:
                changes["num_replicas"] = None
            elif changes.get("num_replicas", self.num_replicas) is None:
                changes["num_replicas"] = 1
        elif changes.get("num_replicas") is not None:
            changes["autoscaling_config"] = None
        names = self.user_configured_option_names | set(options)
        if is_auto:
            names |= {"autoscaling_config"}
        result = dataclasses.replace(self, **changes, user_configured_option_names=frozenset(names))
        _check_combinations(result)
        _warn_no_effect(options, normalized)
        return result

    def target_initial_replicas(self) -> int:
        """Replicas to start: ``num_replicas``, else ``initial_replicas`` or ``min_replicas``."""
        if self.num_replicas is not None:
            return self.num_replicas
        if self.autoscaling_config is None:
            return 1
        if self.autoscaling_config.initial_replicas is not None:
            return self.autoscaling_config.initial_replicas
        return self.autoscaling_config.min_replicas

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able values: models as dicts, enums as strings, user objects pickled."""
        wire: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BaseModel):
                value = _plain(value.model_dump())
            elif f.name == "deployment_actors" and value is not None:
                value = cloudpickle.dumps(value)
            elif f.name == "user_configured_option_names":
                value = sorted(value)
            else:
                value = copy.deepcopy(value)
            wire[f.name] = value
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> DeploymentConfig:
        """Inverse of ``to_wire`` (trusted input from another shoal process of the same user)."""
        kwargs = dict(wire)
        for name, model in _MODEL_FIELDS.items():
            if kwargs.get(name) is not None:
                kwargs[name] = model.model_validate(_unpickle(kwargs[name]))
        if kwargs.get("deployment_actors") is not None:
            kwargs["deployment_actors"] = cloudpickle.loads(kwargs["deployment_actors"])
        kwargs["user_configured_option_names"] = frozenset(
            kwargs.get("user_configured_option_names", ())
        )
        return cls(**kwargs)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(DeploymentConfig))
_MODEL_FIELDS: dict[str, type[BaseModel]] = {
    "autoscaling_config": AutoscalingConfig,
    "backpressure_config": BackpressureConfig,
    "logging_config": LoggingConfig,
    "request_router_config": RequestRouterConfig,
    "gang_scheduling_config": GangSchedulingConfig,
}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):  # a policy function or router class given as an object
        return cloudpickle.dumps(value)
    return value


def _unpickle(value: Any) -> Any:
    if isinstance(value, bytes):
        return cloudpickle.loads(value)
    if isinstance(value, dict):
        return {k: _unpickle(v) for k, v in value.items()}
    return value


# --- one validator per option ----------------------------------------------------------------


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"Got invalid type '{type(value).__name__}' for {name}. Expected {expected}.")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int", value)
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    return float(value)


def _non_negative(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(name, value)
        if number < 0:
            raise ValueError(f"{name} must be greater than or equal to 0, got {value}.")
        return number

    return check


def _positive(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(name, value)
        if number <= 0:
            raise ValueError(f"{name} must be greater than 0, got {value}.")
        return number

    return check


def _model(name: str, model: type[BaseModel], *, none_is_default: bool) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None:
            return model() if none_is_default else None
        if isinstance(value, model):
            return value.model_copy(deep=True)
        if isinstance(value, dict):
            return model.model_validate(value)
        raise _type_error(name, f"a dict or {model.__name__}", value)

    return check


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error("name", "a str", value)
    if "#" in value:
        raise ValueError(f"Deployment names must not contain the '#' character, got '{value}'.")
    return value


def _num_replicas(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f'`num_replicas` must be an int or "auto", but got: {value}')
    if _int("num_replicas", value) <= 0:
        raise ValueError("num_replicas is expected to larger than 0")
    return value


def _ray_actor_options(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(
            f'Got invalid type "{type(value)}" for ray_actor_options. Expected a dictionary.'
        )
    for key in value:
        if key not in ALLOWED_RAY_ACTOR_OPTIONS:
            raise ValueError(
                f"Specifying '{key}' in ray_actor_options is not allowed. "
                f"Allowed options: {sorted(ALLOWED_RAY_ACTOR_OPTIONS)}"
            )
    options = copy.deepcopy(value)
    for key in ("num_cpus", "num_gpus", "memory"):
        if options.get(key) is not None:
            _non_negative(f"ray_actor_options['{key}']")(options[key])
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise _type_error("ray_actor_options['resources']", "a dict", resources)
        for resource, amount in resources.items():
            _non_negative(f"ray_actor_options['resources']['{resource}']")(amount)
    typed_keys = (("runtime_env", dict), ("label_selector", dict), ("accelerator_type", str))
    for key, expected in typed_keys:
        if options.get(key) is not None and not isinstance(options[key], expected):
            raise _type_error(f"ray_actor_options['{key}']", f"a {expected.__name__}", options[key])
    if options.get("num_cpus") is None:
        options["num_cpus"] = 1
    return options


def _max_ongoing_requests(value: Any) -> int:
    if value is None:
        raise ValueError("`max_ongoing_requests` must be non-null, got None.")
    number = _int("max_ongoing_requests", value)
    if number <= 0:
        raise ValueError(f"max_ongoing_requests must be greater than 0, got {value}.")
    return number


def _max_queued_requests(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("max_queued_requests must be an integer.")
    if value < 1 and value != -1:
        raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer.")
    return value


def _user_config(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"user_config is not JSON-serializable: {exc}.") from None
    return copy.deepcopy(value)


def _max_constructor_retry_count(value: Any) -> int:
    number = _int("max_constructor_retry_count", value)
    if number <= 0:
        raise ValueError(f"max_constructor_retry_count must be greater than 0, got {value}.")
    return number


def _rolling_update_percentage(value: Any) -> float:
    number = _number("rolling_update_percentage", value)
    if not 0 < number <= 1:
        raise ValueError(f"rolling_update_percentage must be in (0, 1], got {value}.")
    return number


def _max_surge_percent(value: Any) -> int:
    number = _int("max_surge_percent", value)
    if not 0 <= number <= 100:
        raise ValueError(f"max_surge_percent must be in [0, 100], got {value}.")
    return number


def _list_of_dicts(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, dict) for d in value):
        raise _type_error(name, "a list of dicts", value)
    return [dict(d) for d in value]


def _placement_group_bundles(value: Any) -> list[dict[str, float]] | None:
    if value is None:
        return None
    bundles = _list_of_dicts("placement_group_bundles", value)
    if not bundles:
        raise ValueError("placement_group_bundles must be a non-empty list of dicts.")
    for index, bundle in enumerate(bundles):
        for resource, amount in bundle.items():
            _non_negative(f"placement_group_bundles[{index}]['{resource}']")(amount)
    return bundles


def _placement_group_strategy(value: Any) -> str | None:
    if value is not None and value not in PLACEMENT_GROUP_STRATEGIES:
        raise ValueError(
            f"Invalid placement_group_strategy {value!r}. "
            f"Valid strategies are {list(PLACEMENT_GROUP_STRATEGIES)}."
        )
    return None if value is None else str(value)


def _label_selector(value: Any) -> list[dict[str, str]] | None:
    return None if value is None else _list_of_dicts("placement_group_bundle_label_selector", value)


def _max_replicas_per_node(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Get invalid type '{type(value)}' for max_replicas_per_node. Expected None or an "
            f"integer in the range of [1, {MAX_REPLICAS_PER_NODE_MAX_VALUE}]."
        )
    if not 1 <= value <= MAX_REPLICAS_PER_NODE_MAX_VALUE:
        raise ValueError(
            f"Invalid max_replicas_per_node {value}. Valid values are None or an integer in "
            f"the range of [1, {MAX_REPLICAS_PER_NODE_MAX_VALUE}]."
        )
    return value


def _deployment_actors(value: Any) -> tuple[DeploymentActorConfig, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _type_error("deployment_actors", "a list", value)
    check = _model("deployment_actors", DeploymentActorConfig, none_is_default=False)
    actors = tuple(check(item) for item in value)
    names = [actor.name for actor in actors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Deployment actor names must be unique; duplicated: {duplicates}.")
    return actors


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "num_replicas": _num_replicas,
    "ray_actor_options": _ray_actor_options,
    "placement_group_bundles": _placement_group_bundles,
    "placement_group_strategy": _placement_group_strategy,
    "placement_group_bundle_label_selector": _label_selector,
    "max_replicas_per_node": _max_replicas_per_node,
    "user_config": _user_config,
    "max_ongoing_requests": _max_ongoing_requests,
    "max_queued_requests": _max_queued_requests,
    "backpressure_config": _model("backpressure_config", BackpressureConfig, none_is_default=True),
    "autoscaling_config": _model("autoscaling_config", AutoscalingConfig, none_is_default=False),
    "graceful_shutdown_wait_loop_s": _non_negative("graceful_shutdown_wait_loop_s"),
    "graceful_shutdown_timeout_s": _non_negative("graceful_shutdown_timeout_s"),
    "health_check_period_s": _positive("health_check_period_s"),
    "health_check_timeout_s": _positive("health_check_timeout_s"),
    "logging_config": _model("logging_config", LoggingConfig, none_is_default=False),
    "request_router_config": _model(
        "request_router_config", RequestRouterConfig, none_is_default=True
    ),
    "max_constructor_retry_count": _max_constructor_retry_count,
    "gang_scheduling_config": _model(
        "gang_scheduling_config", GangSchedulingConfig, none_is_default=False
    ),
    "deployment_actors": _deployment_actors,
    "rolling_update_percentage": _rolling_update_percentage,
    "max_surge_percent": _max_surge_percent,
}


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate user-given deployment options; return them normalized.

    ``num_replicas="auto"`` comes back as ``num_replicas=None`` plus an ``autoscaling_config``
    built from ``AutoscalingConfig.default()`` updated with the fields the user set.
    """
    if "version" in options:
        raise ValueError(
            "`version` in `@serve.deployment` has been removed. A deployment's version is "
            "derived from its code and options."
        )
    for key in options:
        if key not in _VALIDATORS:
            raise TypeError(f"got an unexpected keyword argument '{key}'")
    normalized = {key: _VALIDATORS[key](value) for key, value in options.items()}
    num_replicas = normalized.get("num_replicas")
    autoscaling_config = normalized.get("autoscaling_config")
    if isinstance(num_replicas, int) and autoscaling_config is not None:
        raise ValueError(
            "Manually setting num_replicas is not allowed when autoscaling_config is provided."
        )
    if num_replicas == "auto":
        merged = AutoscalingConfig.default().model_dump(exclude_unset=True)
        if autoscaling_config is not None:
            merged.update(autoscaling_config.model_dump(exclude_unset=True))
        normalized["num_replicas"] = None
        normalized["autoscaling_config"] = AutoscalingConfig.model_validate(merged)
    return normalized


def _warn_no_effect(options: dict[str, Any], normalized: dict[str, Any]) -> None:
    """One warning per option in ``options`` that has no effect in shoal (``NO_EFFECT_OPTIONS``,
    see docs/options.md); unset values (None or empty) are not warned about."""
    set_names = [k for k in options if k in NO_EFFECT_OPTIONS and options[k] not in (None, [], (), {})]
    if (normalized.get("ray_actor_options") or {}).get("fallback_strategy") is not None:
        set_names.append("fallback_strategy")
    autoscaling = normalized.get("autoscaling_config")
    if isinstance(autoscaling, AutoscalingConfig) and "metrics_interval_s" in _set_fields(options):
        set_names.append("metrics_interval_s")
    for name in set_names:
        logger.warning("%s has no effect in shoal: %s.", name, NO_EFFECT_OPTIONS[name])


def _set_fields(options: dict[str, Any]) -> set[str]:
    """The autoscaling fields ``options`` wrote."""
    given = options.get("autoscaling_config")
    if isinstance(given, BaseModel):
        return set(given.model_fields_set)
    return set(given) if isinstance(given, dict) else set()


def _check_combinations(config: DeploymentConfig) -> None:
    """Raise ValueError for options that are valid alone but not together."""
    bundles = config.placement_group_bundles
    if config.placement_group_strategy is not None and bundles is None:
        raise ValueError(
            "If `placement_group_strategy` is provided, `placement_group_bundles` must also "
            "be provided."
        )
    if config.max_replicas_per_node is not None and bundles is not None:
        raise ValueError(
            "Setting max_replicas_per_node is not allowed when placement_group_bundles is provided."
        )
    if bundles:
        first = bundles[0]
        demands = {
            "CPU": config.ray_actor_options.get("num_cpus") or 0,
            "GPU": config.ray_actor_options.get("num_gpus") or 0,
            **(config.ray_actor_options.get("resources") or {}),
        }
        for resource, amount in demands.items():
            if first.get(resource, 0) < amount:
                raise ValueError(
                    "When using `placement_group_bundles`, the replica actor will be placed in "
                    "the first bundle, so the resource requirements for the actor must be a "
                    f"subset of the first bundle. `{resource}` requirement for the actor is "
                    f"{amount}, but the bundle only has {first.get(resource, 0)}."
                )
    gang = config.gang_scheduling_config
    if gang is not None:
        if config.num_replicas is not None and config.num_replicas % gang.gang_size:
            raise ValueError(
                f"num_replicas ({config.num_replicas}) must be a multiple of "
                f"gang_size ({gang.gang_size})."
            )
        if config.max_replicas_per_node is not None:
            raise ValueError(
                "Setting max_replicas_per_node is not allowed when gang_scheduling_config "
                "is provided."
            )
        if config.placement_group_strategy is not None:
            raise ValueError(
                "Setting placement_group_strategy is not allowed when gang_scheduling_config "
                "is provided."
            )
