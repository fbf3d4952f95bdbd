"""Deploying: application specs (as built by ``shoal.serve._build``) checked and turned into
the controller's records.

``check_route_prefixes`` is the one check that no two applications share a route prefix.
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

from shoal.controller.autoscale import Autoscaler
from shoal.controller.state import AppState, DeploymentState, definition_version, initial_target
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import DeploymentID
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


def apply_spec(old: AppState | None, spec: dict[str, Any]) -> tuple[AppState, list[InPlaceUpdate]]:
    """The records of application ``spec`` replacing ``old``; deployments ``old`` had and the
    spec drops stay, being deleted, until their replicas are gone."""
    updates: list[InPlaceUpdate] = []
    deployments: dict[str, DeploymentState] = {}
    sys_path = list(spec.get("sys_path", []))
    for d in spec["deployments"]:
        version = definition_version(d["definition"], d["config"], d.get("code_hash", ""))
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
        _set_scaling(state, d["config"])
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


def delete_deployment(state: DeploymentState) -> None:
    state.deleting = True
    state.target = 0


def _set_scaling(state: DeploymentState, config: dict[str, Any]) -> None:
    """A fixed ``num_replicas``, or an autoscaler that keeps the current target (within the
    new bounds) across redeploys and starts at ``initial_replicas`` or ``min_replicas``."""
    with _importing_from(state.sys_path):  # a custom policy is imported from the app's own path
        autoscaling = DeploymentConfig.from_wire(config).autoscaling_config if config.get("autoscaling_config") else None
        if autoscaling is None:
            state.autoscaler = None
            state.target = initial_target(config)
        elif state.autoscaler is None or not state.replicas:
            state.autoscaler = Autoscaler(DeploymentID(state.name, state.app), autoscaling)
            state.target = initial_target(config)
        else:
            state.autoscaler.reconfigure(autoscaling)
            state.target = min(max(state.target, autoscaling.min_replicas), autoscaling.max_replicas)


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
