"""SLOT_FREE: a caller that a replica REJECTED is told when a slot frees, and sends at once.

Two callers in two processes (the driver and a replica of ``Caller``) share a replica of
``Blocker`` whose ``max_ongoing_requests`` is 1; each caller's router counts only its own requests,
so the second one is REJECTED. The deployment's backoff is an hour: only SLOT_FREE can make its
request go within the test's timeouts, and the test proves the order of events (held, rejected,
released, answered), not a duration.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import wait_until

from shoal import serve
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(90)

_HOUR_S = 3600.0


@serve.deployment(
    max_ongoing_requests=1,
    request_router_config={"initial_backoff_s": _HOUR_S, "max_backoff_s": _HOUR_S},
)
class Blocker:
    async def __call__(self, gate: DeploymentHandle, key: str) -> str:
        await gate.arrive.remote(key)
        await gate.wait.remote(key)
        return f"done {key}"


@serve.deployment
class Caller:
    """The second caller of ``Blocker``, in a process of its own."""

    def __init__(self, blocker: DeploymentHandle) -> None:
        self.blocker = blocker

    async def forward(self, gate: DeploymentHandle, key: str) -> str:
        result: str = await self.blocker.remote(gate, key)
        return result

    def rejected_and_waiting(self) -> bool:
        """This process's router holds a call that a Blocker replica REJECTED (it waits for the
        backoff or SLOT_FREE): a request is queued while a replica is skipped."""
        from shoal.runtime.client import get_runtime

        router = get_runtime().routers.get((serve.get_replica_context().app_name, "Blocker"))
        if router is None:
            return False
        return bool(router.queue) and any(conn.skip_until for conn in router.replicas.values())


def test_a_rejected_caller_in_another_process_is_resumed_by_slot_free(deploy: Any, gate: Any) -> None:
    caller = deploy(Caller.bind(Blocker.bind()), "slot_free")
    blocker = serve.get_deployment_handle("Blocker", "slot_free")
    gate.open.remote("forwarded").result(timeout_s=30)  # the second request runs straight through
    held = blocker.remote(gate, "held")  # from the driver: takes Blocker's only slot ...
    assert gate.arrived.remote("held").result(timeout_s=30) == 1  # ... and is running
    forwarded = caller.forward.remote(gate, "forwarded")  # from Caller's process: REJECTED
    wait_until(lambda: caller.rejected_and_waiting.remote().result(timeout_s=30), timeout_s=30)
    gate.open.remote("held").result(timeout_s=30)  # the slot frees ...
    assert held.result(timeout_s=30) == "done held"
    # ... and the rejected caller, whose backoff is an hour, is told at once.
    assert forwarded.result(timeout_s=30) == "done forwarded"
    assert not caller.rejected_and_waiting.remote().result(timeout_s=30)
