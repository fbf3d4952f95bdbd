"""The controller's metrics, under Ray Serve 2.60's names, labels and meanings.

Events (recorded into the supervisor's sample files, ``runtime/metrics.py``, where the
controller sees them happen):

- ``ray_serve_replica_startup_latency_ms``: a replica's creation (its process spawned) to READY.
- ``ray_serve_replica_initialization_latency_ms``: its constructor, as the replica measured it.
- ``ray_serve_replica_reconfigure_latency_ms``: an in-place config update of one replica.
- ``ray_serve_replica_shutdown_duration_ms``: asked to stop (or killed) to its process's exit.
- ``ray_serve_health_check_latency_ms``: one ``check_health`` call, answered or timed out.

Current values (``ControllerGauges``: computed from the controller's records after each
control-loop pass and each autoscaling tick, served by the supervisor's metrics endpoint, so a
deleted deployment's series go with it):

- ``ray_serve_deployment_replica_healthy`` {deployment, replica, application}: 1 for each running
  replica, 0 once it fails its health checks (Ray's default, per-replica series).
- ``ray_serve_health_check_failures_total`` {deployment, replica, application}: a replica's failed
  checks (raised or timed out); a counter kept on the replica's record, so its series ends when
  the replica is gone instead of staying in the supervisor's files forever.
- ``ray_serve_deployment_status`` / ``ray_serve_application_status``: Ray's numeric encoding
  (``DEPLOYMENT_STATUS_CODES``, ``APPLICATION_STATUS_CODES``).
- ``ray_serve_autoscaling_target_replicas``: the number of replicas the controller works toward
  (every deployment, as in Ray); ``_desired_replicas``, ``_total_requests`` and
  ``_target_ongoing_requests``, ``_policy_execution_time_ms`` {``policy_scope``}: the last
  autoscaling decision's (autoscaling deployments).
- ``ray_serve_controller_num_control_loops`` and ``_control_loop_duration_s``: shoal's
  controller has no periodic loop; one pass of ``Controller.reconcile`` (after every event)
  counts as one loop.

Labels are Ray's defaults: ``deployment`` and ``application``, plus ``replica`` on the healthy
gauge and the failure counter (Ray's ``RAY_SERVE_CONTROLLER_METRICS_INCLUDE_HIGH_CARDINALITY_TAGS``
defaults to on).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shoal.controller.metrics_endpoint import DEFAULT_RETENTION_S
from shoal.runtime.metrics import LATENCY_BUCKETS_MS, PREFIX, STARTUP_BUCKETS_MS, Histogram
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, ReplicaState

if TYPE_CHECKING:
    from shoal.controller.state import AppState, DeploymentState

_DEPLOYMENT_TAGS = ("deployment", "application")

# Ray's DeploymentStatus.to_numeric() and ApplicationStatus.to_numeric() (0 is UNKNOWN).
DEPLOYMENT_STATUS_CODES: dict[DeploymentStatus, int] = {
    DeploymentStatus.DEPLOY_FAILED: 1,
    DeploymentStatus.UNHEALTHY: 2,
    DeploymentStatus.UPDATING: 3,
    DeploymentStatus.UPSCALING: 4,
    DeploymentStatus.DOWNSCALING: 5,
    DeploymentStatus.HEALTHY: 6,
}
APPLICATION_STATUS_CODES: dict[ApplicationStatus, int] = {
    ApplicationStatus.DEPLOY_FAILED: 1,
    ApplicationStatus.UNHEALTHY: 2,
    ApplicationStatus.NOT_STARTED: 3,
    ApplicationStatus.DELETING: 4,
    ApplicationStatus.DEPLOYING: 5,
    ApplicationStatus.RUNNING: 6,
}

REPLICA_STARTUP_LATENCY_MS = Histogram(
    "serve_replica_startup_latency_ms",
    description="Time from replica creation to ready state in milliseconds.",
    boundaries=STARTUP_BUCKETS_MS,
    tag_keys=_DEPLOYMENT_TAGS,
)
REPLICA_INITIALIZATION_LATENCY_MS = Histogram(
    "serve_replica_initialization_latency_ms",
    description="Time for replica to initialize in milliseconds.",
    boundaries=STARTUP_BUCKETS_MS,
    tag_keys=_DEPLOYMENT_TAGS,
)
REPLICA_RECONFIGURE_LATENCY_MS = Histogram(
    "serve_replica_reconfigure_latency_ms",
    description="Time for replica to complete reconfigure in milliseconds.",
    boundaries=LATENCY_BUCKETS_MS,
    tag_keys=_DEPLOYMENT_TAGS,
)
REPLICA_SHUTDOWN_DURATION_MS = Histogram(
    "serve_replica_shutdown_duration_ms",
    description="Time from shutdown signal to replica fully stopped in milliseconds.",
    boundaries=STARTUP_BUCKETS_MS,
    tag_keys=_DEPLOYMENT_TAGS,
)
HEALTH_CHECK_LATENCY_MS = Histogram(
    "serve_health_check_latency_ms",
    description="Duration of health check calls in milliseconds.",
    boundaries=LATENCY_BUCKETS_MS,
    tag_keys=_DEPLOYMENT_TAGS,
)


def deployment_tags(state: DeploymentState) -> dict[str, str]:
    return {"deployment": state.name, "application": state.app}


_REPLICA_TAGS = ("deployment", "replica", "application")


# name, help, label names: the families ``ControllerGauges`` serves.
_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve_deployment_replica_healthy": ("1 for a running replica that passes its health checks, else 0.", _REPLICA_TAGS),
    "serve_deployment_status": (
        "Numeric status of deployment. 0=UNKNOWN, 1=DEPLOY_FAILED, 2=UNHEALTHY, 3=UPDATING, "
        "4=UPSCALING, 5=DOWNSCALING, 6=HEALTHY.",
        _DEPLOYMENT_TAGS,
    ),
    "serve_application_status": (
        "Numeric status of application. 0=UNKNOWN, 1=DEPLOY_FAILED, 2=UNHEALTHY, 3=NOT_STARTED, "
        "4=DELETING, 5=DEPLOYING, 6=RUNNING.",
        ("application",),
    ),
    "serve_autoscaling_target_replicas": (
        "The target number of replicas for this deployment. This is the number the autoscaler is trying to reach.",
        _DEPLOYMENT_TAGS,
    ),
    "serve_autoscaling_desired_replicas": (
        "The raw autoscaling decision (number of replicas) from the autoscaling policy before applying "
        "min/max bounds.",
        _DEPLOYMENT_TAGS,
    ),
    "serve_autoscaling_total_requests": (
        "Total number of requests as seen by the autoscaler. This is the input to the autoscaling decision.",
        _DEPLOYMENT_TAGS,
    ),
    "serve_autoscaling_target_ongoing_requests": (
        "The configured target number of ongoing requests per replica.",
        _DEPLOYMENT_TAGS,
    ),
    "serve_autoscaling_policy_execution_time_ms": (
        "Time taken to execute the autoscaling policy in milliseconds. High values may indicate a slow or "
        "complex policy.",
        (*_DEPLOYMENT_TAGS, "policy_scope"),
    ),
    "serve_controller_num_control_loops": (
        "The number of control loops performed by the controller. Increases monotonically over the "
        "controller's lifetime.",
        ("actor_id",),
    ),
    "serve_controller_control_loop_duration_s": ("The duration of the last control loop.", ()),
}

_FAILURES = "serve_health_check_failures_total"  # a counter among the gauges
_Row = tuple[str, tuple[str, ...], float]


class ControllerGauges:
    """A prometheus-client collector of the controller's current gauges.

    ``publish`` runs on the controller's event loop and replaces the whole set of rows at once
    (one reference assignment); ``collect`` runs in a scrape thread and only reads that
    reference, so a scrape never sees half an update and never touches the controller's
    records. Nothing is computed while ``enabled`` is False (metrics are off).
    """

    def __init__(
        self,
        actor_id: str | None = None,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = False
        self._actor_id = actor_id or str(os.getpid())
        self._loops = 0
        self._last_loop_s = 0.0
        self._rows: tuple[_Row, ...] = ()
        self.retention_s = retention_s
        self._clock = clock
        self._failures: dict[tuple[str, ...], float] = {}  # the live replicas' failure counts
        self._gone: dict[tuple[str, ...], tuple[float, float]] = {}  # a gone replica's: (count, gone at)

    def control_loop(self, duration_s: float, apps: Iterable[AppState]) -> None:
        """One pass of the control loop took ``duration_s``; publish the gauges of ``apps``."""
        self._loops += 1
        self._last_loop_s = duration_s
        self.publish(apps)

    def publish(self, apps: Iterable[AppState]) -> None:
        if not self.enabled:
            return
        rows = list(self._rows_of(apps))
        self._keep_gone_failures(rows)
        self._rows = tuple(rows)

    def _keep_gone_failures(self, rows: list[_Row]) -> None:
        """A replica that is gone keeps its failure count for ``retention_s`` (as a dead process's
        sample files do), so its last failures are scraped before the series ends."""
        now = self._clock()
        failures = {labels: value for name, labels, value in rows if name == _FAILURES}
        for labels, value in self._failures.items():
            if labels not in failures and value > 0:  # (a count of 0 has nothing to tell)
                self._gone[labels] = (value, now)
        self._failures = failures
        for labels, (value, gone_at) in list(self._gone.items()):
            if labels in failures or now - gone_at >= self.retention_s:
                del self._gone[labels]
            else:
                rows.append((_FAILURES, labels, value))

    def _rows_of(self, apps: Iterable[AppState]) -> Iterator[_Row]:
        yield "serve_controller_num_control_loops", (self._actor_id,), float(self._loops)
        yield "serve_controller_control_loop_duration_s", (), self._last_loop_s
        for app in apps:
            yield "serve_application_status", (app.name,), float(APPLICATION_STATUS_CODES.get(app.status, 0))
            for state in app.deployments.values():
                labels = (state.name, state.app)
                for replica in state.replicas.values():
                    replica_labels = (state.name, replica.replica_id.rsplit("#", 1)[-1], state.app)  # Ray's unique_id
                    yield "serve_health_check_failures_total", replica_labels, float(replica.health_check_failures)
                    if replica.state == ReplicaState.RUNNING:
                        yield "serve_deployment_replica_healthy", replica_labels, 0.0 if replica.unhealthy else 1.0
                yield "serve_deployment_status", labels, float(DEPLOYMENT_STATUS_CODES.get(state.status, 0))
                yield "serve_autoscaling_target_replicas", labels, float(state.target)
                autoscaler = state.autoscaler
                if autoscaler is not None and autoscaler.last_desired is not None:
                    yield "serve_autoscaling_desired_replicas", labels, float(autoscaler.last_desired)
                    yield "serve_autoscaling_total_requests", labels, float(autoscaler.last_total_requests)
                    yield (
                        "serve_autoscaling_target_ongoing_requests", labels,
                        float(autoscaler.config.get_target_ongoing_requests()),
                    )
                    yield (
                        "serve_autoscaling_policy_execution_time_ms", (*labels, autoscaler.last_policy_scope),
                        autoscaler.last_policy_execution_ms,
                    )

    def collect(self) -> Iterable[Any]:
        rows = self._rows
        if not rows:
            return []
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            name: GaugeMetricFamily(PREFIX + name, documentation, labels=label_names)
            for name, (documentation, label_names) in _GAUGES.items()
        }
        families[_FAILURES] = CounterMetricFamily(PREFIX + _FAILURES, "Count of failed health checks.", labels=_REPLICA_TAGS)
        for name, labels, value in rows:
            families[name].add_metric(labels, value)
        return [family for family in families.values() if family.samples]
