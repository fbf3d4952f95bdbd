"""HTTPListener: the listening socket the proxies serve from, and the answer when none does.

The supervisor binds the socket (``bind``) and every proxy incarnation inherits it, so a proxy
restarted after a crash keeps the port. Each proxy says when it serves (``proxy_up``) and when
it stopped (``proxy_down``). While at least one serves, the kernel hands them the connections.
Once every proxy that served is gone (they crashed, and are being restarted), connections
would queue in the backlog with nobody to accept them; instead the supervisor accepts them
itself and answers each ``503 Service Unavailable`` with ``Retry-After`` and ``Connection:
close``, until a proxy serves again. Before the first proxy is up (the instance is starting),
connections queue as usual: a proxy is about to take them.

The fallback never reads a request: it writes the response, half-closes, and discards what the
client sends until the client closes or ``_LINGER_S`` passed (closing with unread data would
reset the connection before the client reads the 503). At most ``_MAX_LINGERING`` connections
linger; beyond that they are closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket

logger = logging.getLogger("shoal.controller")

_BACKLOG = 2048
_LINGER_S = 1.0
_MAX_LINGERING = 256
_BODY = b"No HTTP proxy is serving right now (it is being restarted). Retry shortly.\n"
UNAVAILABLE_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class HTTPListener:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self._serving: set[object] = set()
        self._served = False  # some proxy has served: from now on nobody serving means down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}

    @classmethod
    def bind(cls, host: str, port: int) -> HTTPListener:
        """Listen on ``host:port`` (0: a free port); OSError with a clear message if taken."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"cannot listen for HTTP on {host}:{port}: {exc.strerror}. Pick another port with "
                "serve.start(http_options={'port': ...}) or `shoal start --http-port`."
            ) from exc
        sock.listen(_BACKLOG)
        return cls(sock)

    @property
    def answering(self) -> bool:
        """True while the supervisor answers 503 itself (no proxy serves)."""
        return self._loop is not None

    def proxy_up(self, proxy: object) -> None:
        """``proxy`` serves from the socket now."""
        self._serving.add(proxy)
        self._served = True
        self._stop_answering()

    def proxy_down(self, proxy: object) -> None:
        """``proxy`` no longer serves (it exited)."""
        self._serving.discard(proxy)
        if self._served and not self._serving and self._loop is None and self.socket.fileno() >= 0:
            logger.warning("no HTTP proxy serves; answering 503 until one does")
            self._loop = asyncio.get_running_loop()
            self.socket.setblocking(False)
            self._loop.add_reader(self.socket.fileno(), self._accept)

    def close(self) -> None:
        """Stop answering, close what lingers and the socket."""
        self._stop_answering()
        for conn in list(self._lingering):
            self._forget(conn)
        self.socket.close()

    def _stop_answering(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.socket.fileno())
            self._loop = None

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("accepting a connection to answer 503 failed: %s", exc)
                return
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        assert self._loop is not None
        conn.setblocking(False)
        try:
            conn.send(UNAVAILABLE_RESPONSE)  # a fresh socket's buffer takes it whole
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= _MAX_LINGERING:
            conn.close()
            return
        self._lingering[conn] = self._loop.call_later(_LINGER_S, self._forget, conn)
        self._loop.add_reader(conn.fileno(), self._discard, conn)

    def _discard(self, conn: socket.socket) -> None:
        try:
            if conn.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._forget(conn)  # the client closed

    def _forget(self, conn: socket.socket) -> None:
        timer = self._lingering.pop(conn, None)
        if timer is not None:
            timer.cancel()
        if conn.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()
