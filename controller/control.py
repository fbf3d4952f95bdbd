"""ControlServer: the supervisor's ROUTER socket, answering clients and hearing from workers.

Clients (drivers, the CLI, replicas, the proxy) send CALL messages whose ``meta["op"]`` names an
operation; each gets one REPLY with ``ok`` and either the answer or ``error`` (a message for the
user) and ``etype`` (the exception type to raise). Operations that wait (``listen``,
``wait_app``, ``delete``) run as tasks, so one slow client never blocks another.

Workers send READY; their protocol version is checked by the controller. They send
ROUTING_INFO when the multiplexed models they hold change; it goes into the routing snapshot. (A worker that fails
to start says why on its last-words pipe, not here: see ``WorkerProcess``.)

Every frame must be signed with the instance's key (``wire.sign``), replies are too. A frame
whose MAC is missing or wrong, or that is malformed, is dropped before anything in it is decoded
and is never answered; it is counted in ``rejected_frames`` (in the ``status`` reply) and logged
once per peer connection (for the first ``_MAX_LOGGED_PEERS`` peers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from shoal.controller.controller import Controller, ControllerError
from shoal.controller.tasks import TaskSet
from shoal.runtime import transport, wire

logger = logging.getLogger("shoal.control")

_MAX_LOGGED_PEERS = 64


class ControlServer:
    def __init__(self, endpoint: str, controller: Controller, *, on_shutdown: Callable[[], None], info: dict[str, Any]) -> None:
        """Bind ``endpoint``; the instance's key is read from beside it, as every process does
        (the supervisor created it before)."""
        self.controller = controller
        self._on_shutdown = on_shutdown
        self._info = info
        self._key = key = transport.read_key(endpoint)
        self.rejected_frames = 0
        self._logged_peers: set[bytes] = set()
        sock = transport.make_socket(zmq.ROUTER)
        sock.bind(endpoint)
        self.channel = transport.Channel(sock, self._on_message, key=key)
        self._tasks = TaskSet()
        self._ops: dict[str, Callable[[dict[str, Any], tuple[bytes, ...]], Awaitable[dict[str, Any]]]] = {
            "ping": self._ping,
            "deploy_many": self._deploy_many,
            "configs": self._configs,
            "wait_app": self._wait_app,
            "delete": self._delete,
            "status": self._status,
            "listen": self._listen,
            "shutdown": self._shutdown,
            "metrics": self._metrics,
            "set_num_proxies": self._set_num_proxies,
        }

    async def aclose(self) -> None:
        """Cancel the operations still running, await them, and close the socket."""
        await self._tasks.aclose()
        self.channel.close()

    def _on_message(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            if len(frames) != 2:
                raise wire.ProtocolError(f"expected one frame after the peer's identity, got {len(frames) - 1}")
            msg = wire.decode([wire.verify(frames[1], self._key)])
        except wire.ProtocolError as exc:
            self.rejected_frames += 1
            if identity not in self._logged_peers and len(self._logged_peers) < _MAX_LOGGED_PEERS:
                self._logged_peers.add(identity)
                logger.warning("dropped a frame from control peer %s: %s (rejected so far: %d)",
                               identity.hex(), exc, self.rejected_frames)
            return
        if msg.kind == wire.Kind.CALL:
            self._tasks.spawn(self._answer(identity, msg), name=f"operation {msg.meta.get('op', '')}")
        elif msg.kind == wire.Kind.READY:
            self.controller.on_ready(msg.meta["replica_id"], msg.incarnation, msg.meta)
        elif msg.kind == wire.Kind.ROUTING_INFO:
            self._on_routing_info(msg)
        else:
            logger.warning("control socket got an unexpected %s message", msg.kind.name)

    def _on_routing_info(self, msg: wire.Message) -> None:
        """A replica's multiplexed model ids: into the next snapshot, if it is a replica we run."""
        replica_id = msg.meta.get("replica_id")
        try:
            model_ids = wire.routing_info_model_ids(msg.meta)
        except wire.ProtocolError as exc:
            logger.warning("dropped routing info from replica %s: %s", replica_id, exc)
            return
        if not isinstance(replica_id, str) or self.controller.find_replica(replica_id, msg.incarnation) is None:
            return
        snapshots = self.controller.snapshots
        if snapshots.record_model_ids(replica_id, model_ids):
            snapshots.publish(self.controller.apps.values())

    async def _answer(self, identity: bytes, msg: wire.Message) -> None:
        op = msg.meta.get("op", "")
        handler = self._ops.get(op)
        if op == "listen":
            self.controller.listener_at(identity, msg.meta.get("version", 0))
            if msg.meta.get("role") == "proxy" and self.controller.proxies is not None:
                self.controller.proxies.on_listen(identity, msg.meta.get("version", 0))
        try:
            if op == "proxy_ready":  # needs the connection: the proxy's later calls come on it
                reply = {"ok": True, **self._proxy_ready(identity, msg.meta)}
            elif handler is None:
                raise ControllerError(f"unknown operation '{op}'; is the client a different shoal version?")
            else:
                reply = {"ok": True, **await handler(msg.meta, msg.payload)}
        except ControllerError as exc:
            reply = {"ok": False, "error": str(exc), "etype": "RayServeException"}
        except TimeoutError:
            reply = {"ok": False, "error": f"operation '{op}' timed out", "etype": "TimeoutError"}
        except Exception as exc:
            logger.exception("operation '%s' failed", op)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "etype": "RayServeException"}
        delivered = self.channel.send_message(wire.Message(wire.Kind.REPLY, 0, msg.call_id, reply), identity)
        if op == "listen" and not delivered:
            self.controller.listener_gone(identity)

    async def _ping(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        return dict(self._info)

    async def _deploy_many(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        self.controller.deploy_apps(wire.unpack(payload[0]), declarative=bool(meta.get("declarative")))
        return {}

    async def _configs(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        apps = self.controller.apps.values()
        return {"configs": {a.name: a.config_source for a in apps if a.config_source is not None}}

    async def _wait_app(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        app = await self.controller.wait_app(meta["name"], meta.get("timeout_s"))
        if app is None:
            return {"exists": False}
        return {"exists": True, "status": app.status.value, "message": app.message, "ingress": app.ingress}

    async def _delete(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        name = meta["name"]
        self.controller.delete_app(name)
        if meta.get("wait", True):
            while name in self.controller.apps:
                app = self.controller.apps[name]
                app.changed.clear()
                await app.changed.wait()
        return {}

    async def _status(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        return {"status": self.controller.status(), "rejected_frames": self.rejected_frames}

    async def _listen(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        version = meta.get("version", 0)
        return {"snapshot": (await self.controller.wait_snapshot(version)).to_wire()}

    async def _metrics(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        self.controller.record_queued(meta.get("source", "router"), meta.get("queued", {}))
        return {}

    def _proxy_ready(self, identity: bytes, meta: dict[str, Any]) -> dict[str, Any]:
        """A proxy (``meta["pid"]``) serves; its connection tells its later calls apart."""
        if meta.get("protocol") != wire.PROTOCOL_VERSION:
            raise ControllerError("the proxy speaks another protocol version; reinstall shoal")
        if self.controller.proxies is not None:
            self.controller.proxies.on_ready(identity, meta.get("pid"))
        return {}

    async def _set_num_proxies(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        await self.controller.set_num_proxies(meta.get("num_proxies"))  # type: ignore[arg-type]
        return {}

    async def _shutdown(self, meta: dict[str, Any], payload: tuple[bytes, ...]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return {}
