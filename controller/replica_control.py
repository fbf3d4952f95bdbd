"""ReplicaControl: the supervisor's own calls to one replica (health checks, reconfiguration,
routing stats).

They travel like any request (``wire`` REQUEST frames on a DEALER connection), to internal
method names that a replica runs outside ``max_ongoing_requests``, so a busy replica still
answers; a replica whose event loop is blocked does not, which is how the health check sees it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal.runtime import wire
from shoal.runtime.errors import RayServeException, ReplicaDiedError
from shoal.runtime.reply import Reply, ReplySink
from shoal.runtime.router import Call, ReplicaConn
from shoal.runtime.wire import HEALTH_METHOD, METRICS_METHOD, RECONFIGURE_METHOD, ROUTING_STATS_METHOD

__all__ = ["HEALTH_METHOD", "METRICS_METHOD", "RECONFIGURE_METHOD", "ROUTING_STATS_METHOD", "ReplicaControl"]


class ReplicaControl:
    """Calls to one replica incarnation; create and use it on the supervisor's loop."""

    def __init__(self, replica_id: str, incarnation: int, endpoint: str) -> None:
        self._conn = ReplicaConn(self, replica_id, incarnation, endpoint, asyncio.get_running_loop())

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
        """Run ``method`` on the replica; TimeoutError after ``timeout_s``, ReplicaDiedError if
        its socket closes first, else its outcome."""
        enc, payload = wire.dumps_args(args, {})
        sink = ReplySink()
        call = Call(wire.RequestHeader(method, f"control-{method}", enc), payload, sink)
        self._conn.send(call)
        try:
            async with asyncio.timeout(timeout_s):
                return await sink.result()
        finally:
            if not call.resolved:
                call.resolved = True
                self._conn.calls.pop(call.call_id, None)

    def on_reply(self, conn: ReplicaConn, call: Call, reply: Reply) -> None:
        if reply.kind in (wire.Kind.RESULT, wire.Kind.ERROR):
            call.deliver(reply)
        elif reply.kind in wire.TERMINAL_KINDS:
            call.resolve(RayServeException(f"the replica answered {reply.kind.name} to {call.header.method}"))

    def on_model_ids(self, conn: ReplicaConn) -> None:
        """Multiplexed model ids on a reply: not the supervisor's concern."""

    def on_death(self, conn: ReplicaConn) -> None:
        conn.fail_all(lambda call: ReplicaDiedError(f"replica {conn.replica_id} exited during {call.header.method}"))

    def close(self) -> None:
        self._conn.close()
