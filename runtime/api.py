"""What a runtime offers to the code that sends calls: handles, the proxy, local testing mode.

``client.Runtime`` (processes connected to a supervisor) and ``local.LocalRuntime`` (everything
in-process) both provide ``RuntimeAPI``; ``router.Router`` and ``local.LocalRouter`` both provide
``CallRouter``. Every ``CallRouter`` method runs on the runtime loop's thread.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from shoal.runtime import wire
from shoal.runtime.inbox import LoopInbox
from shoal.runtime.router import Call


class CallRouter(Protocol):
    """Sends calls to one deployment; outcomes go to each call's sink."""

    def submit(self, call: Call) -> None:
        """Send ``call`` (or queue it); its outcome reaches ``call.sink`` exactly once."""

    def cancel(self, call: Call) -> None:
        """Make ``call``'s outcome RequestCancelledError at once and stop its work (idempotent)."""

    def send_receive(self, call: Call, message: dict[str, Any]) -> bool:
        """Forward a later ASGI receive message to ``call``; False if it runs nowhere now."""


class RuntimeAPI(Protocol):
    """A process's runtime: a loop that routers run on, and the routers."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def inbox(self) -> LoopInbox:
        """Posts callbacks to ``loop`` from other threads."""

    def in_loop_thread(self) -> bool:
        """True when called on ``loop``'s thread."""

    def router(self, app_name: str, deployment_name: str) -> CallRouter:
        """The router of a deployment (loop thread only); may raise DeploymentUnavailableError."""


class RoutingRuntime(RuntimeAPI, Protocol):
    """A runtime that follows the controller's snapshots (what the proxy needs)."""

    @property
    def snapshot(self) -> wire.Snapshot:
        """The newest snapshot applied (version 0: none yet)."""
