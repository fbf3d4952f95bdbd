"""The status report's fields for progress lines: replica start times on the wall clock, the
target, the version being deployed, failed starts, reconfigures and missing resources."""

from __future__ import annotations

from typing import Any

from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.controller.status import render_status
from shoal.serve.schema import ReplicaState, ServeStatus


def state(**extra: Any) -> DeploymentState:
    return DeploymentState(app="a", name="M", definition=b"", config={}, version="v2", sys_path=[], **extra)


def test_progress_fields() -> None:
    d = state(target=3, failed_starts=1, reconfiguring=1, resources_wanted="Deployment M has 1 replica waiting for resources: ...")
    d.replicas["r1"] = Replica("r1", 1, "v2", "ipc://x", started_at=100.0, state=ReplicaState.RUNNING, pid=7)
    d.replicas["r2"] = Replica("r2", 2, "v2", "ipc://y", started_at=110.5)
    app = AppState(name="a", route_prefix="/", ingress="M", deployments={"M": d})
    report = render_status([app], None, wall_s=1_700_000_000.0, monotonic_s=120.0)
    m = report["applications"]["a"]["deployments"]["M"]
    assert [r["start_time_s"] for r in m["replicas"]] == [1_700_000_000.0 - 20.0, 1_700_000_000.0 - 9.5]
    assert (m["version"], m["target_num_replicas"], m["failed_starts"], m["reconfiguring"]) == ("v2", 3, 1, True)
    assert m["waiting_for_resources"].startswith("Deployment M has 1 replica waiting")
    ServeStatus.from_dict(report)  # the extra fields do not bother serve.status()


def test_no_resources_are_wanted_once_enough_replicas_live() -> None:
    d = state(target=1, resources_wanted="stale")
    d.replicas["r1"] = Replica("r1", 1, "v2", "ipc://x", started_at=0.0)
    app = AppState(name="a", route_prefix="/", ingress="M", deployments={"M": d})
    assert render_status([app], None)["applications"]["a"]["deployments"]["M"]["waiting_for_resources"] == ""
