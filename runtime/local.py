"""Local testing mode: an application's deployments run in the calling process.

``serve.run(app, _local_testing_mode=True)`` constructs each deployment once, in-process, and
returns a handle whose calls run on a background event loop with the same semantics as the
multi-process runtime: the same DeploymentResponse API, arguments and results serialized as they
would be between processes, ``max_ongoing_requests`` respected, cancellation, streaming and
composition. No supervisor, replica process or HTTP proxy is started (Ray Serve does the same).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from shoal.runtime import request_router_report, wire
from shoal.runtime.context import RequestContext, reset_request, set_request
from shoal.runtime.errors import DeploymentUnavailableError, RequestCancelledError
from shoal.runtime.inbox import LoopInbox
from shoal.runtime.reply import END, Reply
from shoal.runtime.router import Call
from shoal.runtime.user_code import UserCallable


class LocalRouter:
    """Runs calls on the in-process user object (``api.CallRouter``), at most
    ``max_ongoing_requests`` at a time; values cross ``wire`` as they would between processes."""

    def __init__(self, user: UserCallable, max_ongoing_requests: int, app_name: str) -> None:
        self.user = user
        self.app_name = app_name
        self._slots = asyncio.Semaphore(max_ongoing_requests)
        self._tasks: dict[Call, asyncio.Task[None]] = {}

    def submit(self, call: Call) -> None:
        task = asyncio.get_running_loop().create_task(self._run(call))
        self._tasks[call] = task
        task.add_done_callback(lambda _t: self._tasks.pop(call, None))

    def cancel(self, call: Call) -> None:
        if call.cancel():
            task = self._tasks.get(call)
            if task is not None:
                task.cancel()

    def send_receive(self, call: Call, message: dict[str, Any]) -> bool:
        return False  # no HTTP in local testing mode

    async def aclose(self) -> None:
        """Cancel the calls still running and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, call: Call) -> None:
        header = call.header
        token = set_request(RequestContext(
            request_id=header.request_id, app_name=self.app_name, multiplexed_model_id=header.multiplexed_model_id,
        ))
        try:
            async with self._slots:
                args, kwargs = wire.loads_args(header.enc, call.payload)
                if header.stream:
                    async for item in self.user.stream(header.method, args, kwargs):
                        call.deliver(Reply(wire.Kind.STREAM_ITEM, wire.loads(*wire.dumps(item)), 0))
                    call.deliver(Reply(wire.Kind.STREAM_END, END, 0))
                else:
                    value = await self.user.call(header.method, args, kwargs)
                    call.resolve(value=wire.loads(*wire.dumps(value)))
        except asyncio.CancelledError:
            call.resolve(RequestCancelledError(header.request_id))
        except Exception as exc:
            call.resolve(exc)
        finally:
            reset_request(token)


class LocalRuntime:
    """The in-process stand-in for ``client.Runtime`` (``api.RuntimeAPI``): a loop thread and
    local routers."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.inbox = LoopInbox(self.loop)
        self.routers: dict[tuple[str, str], LocalRouter] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name="shoal-local", daemon=True)
        self._thread.start()

    def in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def router(self, app_name: str, deployment_name: str) -> LocalRouter:
        try:
            return self.routers[(app_name, deployment_name)]
        except KeyError:
            raise DeploymentUnavailableError(
                f"Deployment(name='{deployment_name}', app='{app_name}')", "because it does not exist"
            ) from None

    def add(self, app_name: str, deployment_name: str, user: UserCallable, user_config: Any,
            max_ongoing_requests: int) -> None:
        """Construct ``user`` on the loop and register its router (blocks until constructed)."""
        asyncio.run_coroutine_threadsafe(user.construct(user_config), self.loop).result()
        self.routers[(app_name, deployment_name)] = LocalRouter(user, max_ongoing_requests, app_name)

    def close(self) -> None:
        async def destroy() -> None:
            for router in self.routers.values():
                await router.aclose()
            await request_router_report.shutdown()  # unloads multiplexed models
            for router in self.routers.values():
                await router.user.destroy()

        asyncio.run_coroutine_threadsafe(destroy(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
