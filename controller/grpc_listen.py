"""The instance's gRPC port: checked, discovered and reserved by the supervisor before any proxy starts.

``prepare(grpc_options, host)`` (the supervisor, at start):

- no servicer functions: no gRPC at all (None; grpc is not imported);
- imports every servicer function and learns its RPCs (``runtime/grpc_services.discover_all``):
  a function that cannot serve is a ``GrpcServicerError`` naming it, before anything starts;
- binds the port on ``host`` with ``SO_REUSEPORT`` and keeps that socket, never listening on it:
  port 0 becomes a free port that stays the instance's while proxies die and restart, and each
  proxy's gRPC server binds the same port with ``SO_REUSEPORT`` (the kernel spreads connections
  over the proxies that listen; a socket that only holds the port gets none). The kernel lets
  only sockets of the same user share the port. A port another program holds is an OSError
  naming ``grpc_options.port``.

``GrpcListen.spec()`` is what each proxy's spec carries (``proxy.grpc_server.GrpcOptions``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.grpc_services import MethodSpec, discover_all

__all__ = ["GrpcListen", "prepare"]

DEFAULT_HOST = "127.0.0.1"


@dataclass
class GrpcListen:
    host: str
    port: int
    methods: list[MethodSpec]
    request_timeout_s: float | None
    enable_reflection: bool
    _socket: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``host:port``, as a gRPC client dials it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def spec(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "methods": [m.to_wire() for m in self.methods],
            "request_timeout_s": self.request_timeout_s,
            "enable_reflection": self.enable_reflection,
        }

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def prepare(grpc_options: dict[str, Any] | None, host: str | None) -> GrpcListen | None:
    """See the module docstring. ``host``: the HTTP host (gRPC listens where HTTP does, as in
    Ray), None for the default."""
    functions = list((grpc_options or {}).get("grpc_servicer_functions") or [])
    if not functions:
        return None
    assert grpc_options is not None
    methods = discover_all(functions)
    host = host or DEFAULT_HOST
    port = int(grpc_options.get("port", 9000))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve gRPC on {host}:{port} (grpc_options.port): {exc}") from exc
    return GrpcListen(
        host, int(sock.getsockname()[1]), methods, grpc_options.get("request_timeout_s"),
        bool(grpc_options.get("enable_reflection", True)), sock,
    )
