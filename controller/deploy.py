"""Deploying: application specs (as built by ``shoal.serve._build``) checked and turned into
the controller's records.

``check_route_prefixes`` is the one check that no two applications share a route prefix.
``capacity_direction`` is Ray's rule for which way a config's ``target_capacity`` moves.
``apply_spec`` builds an application's records from its spec, keeping what a redeploy keeps
(replicas of an unchanged version, autoscaling targets, restart counts); it returns the
in-place config updates (``user_config``, ``max_ongoing_requests``) that running replicas of an
unchanged version take without a restart.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.controller.autoscale import AppPolicy, Autoscaler, capacity_adjusted
from shoal.controller.state import AppState, DeploymentState, definition_version, initial_target
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import AutoscalingPolicy, DeploymentID
from shoal.serve.schema import DeploymentStatus, DeploymentStatusTrigger

# Options a running replica takes without a restart (Ray: NeedsActorReconfigure).
_IN_PLACE_OPTIONS = ("user_config", "max_ongoing_requests")


class ControllerError(Exception):
    """A request the controller refuses; the message says what to change."""


@dataclass(frozen=True)
class InPlaceUpdate:
    state: DeploymentState
    update: dict[str, Any]
    previous: dict[str, Any]


def check_route_prefixes(apps: Mapping[str, AppState], specs: Sequence[dict[str, Any]], *, declarative: bool) -> None:
    """ControllerError if, once ``specs`` are deployed, two applications would share a route
    prefix. ``declarative``: the applications ``specs`` does not name are being deleted."""
    names = {spec["name"] for spec in specs}
    taken: dict[str, str] = {}
    if not declarative:
        for app in apps.values():
            if app.name not in names and app.route_prefix is not None and not app.deleting:
                taken[app.route_prefix] = app.name
    for spec in specs:
        prefix = spec.get("route_prefix")
        if prefix is None:
            continue
        if prefix in taken:
            raise ControllerError(
                f'Prefix {prefix} is being used by application "{taken[prefix]}". '
                f'Failed to deploy application "{spec["name"]}".'
            )
        taken[prefix] = spec["name"]


def capacity_direction(
    current: tuple[frozenset[str], float | None] | None,
    new: tuple[frozenset[str], float | None],
    current_direction: str | None,
) -> str | None:
    """``"UP"``, ``"DOWN"`` or None for a config ``new`` = (application names, target_capacity)
    replacing ``current`` (None: no config was applied), as Ray computes it: the same
    applications compare capacities (unchanged keeps the direction, from none to a number is
    DOWN, to none is None); other applications with a capacity scale UP."""
    new_names, new_capacity = new
    if current is not None and current[0] == new_names:
        current_capacity = current[1]
        if current_capacity == new_capacity:
            return current_direction
        if new_capacity is None:
            return None
        if current_capacity is None:
            return "DOWN"
        return "UP" if current_capacity < new_capacity else "DOWN"
    return "UP" if new_capacity is not None else None


def apply_spec(old: AppState | None, spec: dict[str, Any]) -> tuple[AppState, list[InPlaceUpdate]]:
    """The records of application ``spec`` replacing ``old``; deployments ``old`` had and the
    spec drops stay, being deleted, until their replicas are gone.

    ``spec`` may carry ``target_capacity`` and ``target_capacity_direction`` (a config file's,
    set by the controller), ``autoscaling_policy`` (the application-level policy, as a dict) and
    ``logging_config`` (the application's: each deployment that sets none uses it, as in Ray).
    Raises ImportError naming the policy if it does not import."""
    updates: list[InPlaceUpdate] = []
    deployments: dict[str, DeploymentState] = {}
    sys_path = list(spec.get("sys_path", []))
    capacity = _Capacity(spec.get("target_capacity"), spec.get("target_capacity_direction"))
    app_policy = None
    if spec.get("autoscaling_policy") is not None:
        with _importing_from(sys_path):
            app_policy = AppPolicy(spec["name"], AutoscalingPolicy.model_validate(spec["autoscaling_policy"]))
    for d in spec["deployments"]:
        d = _with_logging_config(d, spec.get("logging_config"))
        logging_config = d["config"].get("logging_config")
        # Replicas are started with their logging config: a change replaces them.
        code = d.get("code_hash", "") + (f"|logging={sorted(logging_config.items())}" if logging_config else "")
        version = definition_version(d["definition"], d["config"], code)
        state = old.deployments.get(d["name"]) if old is not None else None
        if state is None or state.deleting:
            state = DeploymentState(spec["name"], d["name"], d["definition"], d["config"], version, sys_path)
        else:
            if state.version != version:
                state.failed_starts = 0
                state.last_error = ""
            else:
                changed = {k: d["config"].get(k) for k in _IN_PLACE_OPTIONS if d["config"].get(k) != state.config.get(k)}
                if changed:
                    updates.append(InPlaceUpdate(state, changed, {k: state.config.get(k) for k in changed}))
            state.definition, state.config, state.version, state.sys_path = d["definition"], d["config"], version, sys_path
        _set_scaling(state, d["config"], capacity)
        if state.autoscaler is not None:
            state.autoscaler.app_policy = app_policy
        state.status = DeploymentStatus.UPDATING
        state.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
        state.message = ""
        deployments[d["name"]] = state
    if old is not None:
        for name, state in old.deployments.items():
            if name not in deployments:
                delete_deployment(state)
                deployments[name] = state
    app = AppState(spec["name"], spec.get("route_prefix"), spec["ingress"], deployments)
    if old is not None:
        app.changed = old.changed
    app.config_source = spec.get("config_source")
    return app, updates


def _with_logging_config(entry: dict[str, Any], app_logging_config: dict[str, Any] | None) -> dict[str, Any]:
    """``entry`` whose config has ``app_logging_config`` when it sets no logging config itself
    (Ray: a deployment's ``logging_config`` wins over its application's, whole, not by field)."""
    if app_logging_config is None or entry["config"].get("logging_config") is not None:
        return entry
    return {**entry, "config": {**entry["config"], "logging_config": dict(app_logging_config)}}


def delete_deployment(state: DeploymentState) -> None:
    state.deleting = True
    state.target = 0


@dataclass(frozen=True)
class _Capacity:
    target_capacity: float | None
    direction: str | None


def _set_scaling(state: DeploymentState, config: dict[str, Any], capacity: _Capacity) -> None:
    """A fixed ``num_replicas`` scaled by the target capacity, or an autoscaler that keeps the
    current target (within the new capacity-adjusted bounds) across redeploys and starts at
    ``initial_replicas`` or ``min_replicas``."""
    with _importing_from(state.sys_path):  # a custom policy is imported from the app's own path
        autoscaling = DeploymentConfig.from_wire(config).autoscaling_config if config.get("autoscaling_config") else None
        if autoscaling is None:
            state.autoscaler = None
            state.target = capacity_adjusted(initial_target(config), capacity.target_capacity)
            return
        if state.autoscaler is None or not state.replicas:
            state.autoscaler = Autoscaler(DeploymentID(state.name, state.app), autoscaling)
            state.target = initial_target(config)
        else:
            state.autoscaler.reconfigure(autoscaling)
        state.autoscaler.target_capacity = capacity.target_capacity
        state.autoscaler.capacity_direction = capacity.direction
        state.target = state.autoscaler.apply_bounds(state.target)


@contextlib.contextmanager
def _importing_from(entries: Sequence[str]) -> Iterator[None]:
    """``entries`` are on ``sys.path`` (at its end) only inside the block."""
    added = [e for e in dict.fromkeys(entries) if e not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)
