"""ReplicaControl: the supervisor's own calls to one replica (health checks, reconfiguration).

They travel like any request (``wire`` REQUEST frames on a DEALER connection), to internal
method names that a replica runs outside ``max_ongoing_requests``, so a busy replica still
answers; a replica whose event loop is blocked does not, which is how the health check sees it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal.runtime import wire
from shoal.runtime.errors import RayServeException
from shoal.runtime.replica import HEALTH_METHOD, METRICS_METHOD, RECONFIGURE_METHOD
from shoal.runtime.router import Call, ReplicaConn, decode_error

__all__ = ["HEALTH_METHOD", "METRICS_METHOD", "RECONFIGURE_METHOD", "ReplicaControl"]


class _Outcome:
    def __init__(self, fut: asyncio.Future[Any]) -> None:
        self._fut = fut

    def set_result(self, value: Any) -> None:
        if not self._fut.done():
            self._fut.set_result(value)

    def set_exception(self, exc: BaseException) -> None:
        if not self._fut.done():
            self._fut.set_exception(exc)

    def push(self, item: Any) -> None:  # pragma: no cover - control calls never stream
        pass

    def finish(self) -> None:  # pragma: no cover
        pass


class ReplicaControl:
    def __init__(self, replica_id: str, incarnation: int, endpoint: str) -> None:
        self.loop = asyncio.get_running_loop()
        self._conn = ReplicaConn(self, replica_id, incarnation, endpoint)  # type: ignore[arg-type]

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
        """Run ``method`` on the replica; TimeoutError after ``timeout_s``, else its outcome."""
        enc, payload = wire.dumps_args(args, {})
        outcome: asyncio.Future[Any] = self.loop.create_future()
        call = Call(method, f"control-{method}", False, int(enc), payload, _Outcome(outcome))
        self._conn.send(call)
        try:
            async with asyncio.timeout(timeout_s):
                return await outcome
        finally:
            if not call.resolved:
                call.resolved = True
                self._conn.calls.pop(call.call_id, None)

    def on_reply(self, conn: ReplicaConn, call: Call, msg: wire.Message) -> None:
        if msg.kind == wire.Kind.RESULT:
            call.resolve(value=wire.loads(msg.meta.get("enc", 0), msg.payload[0]) if msg.payload else None)
        elif msg.kind == wire.Kind.ERROR:
            call.resolve(decode_error(msg.meta, msg.payload[0]))
        elif msg.kind in wire.TERMINAL_KINDS:
            call.resolve(RayServeException(f"the replica answered {msg.kind.name} to {call.method}"))

    def close(self) -> None:
        self._conn.close()
