"""RestAPI: Ray's Serve REST API on the supervisor, on a listener of its own (off unless enabled).

Endpoints, as Ray 2.60's dashboard answers them (``ray/dashboard/modules/serve/serve_head.py``),
so that Ray's own ``serve deploy|status|shutdown -a http://HOST:PORT`` work against shoal:

- ``GET /api/ray/version`` and ``GET /api/version``: what Ray's CLI checks first;
- ``GET /api/serve/applications/[?api_type=imperative|declarative]``: ``ServeInstanceDetails``
  (``rest_details``); an unknown ``api_type`` is 400 with Ray's text;
- ``PUT /api/serve/applications/``: a Serve config (JSON), applied declaratively exactly as
  ``shoal deploy`` applies a config file (``rest_deploy``, in a child process: importing the
  applications runs user code, which must neither block nor live in the supervisor). A config
  that fails validation, import or the controller's checks is 400 with the error, and changes
  nothing; 200 once the controller took it (the applications then deploy, as in Ray);
- ``DELETE /api/serve/applications/``: deletes every application (Ray shuts Serve down; here
  the instance keeps running, empty), answering once they are gone.

Safety: the body of a request is JSON only (never unpickled), at most ``MAX_BODY_BYTES``, read
within ``BODY_TIMEOUT_S``; request heads are bounded (``proxy.protocol.LimitedHttpProtocol``);
idle connections close after ``_KEEP_ALIVE_S``; at most ``_MAX_CONNECTIONS`` at once. With a
token, every request must carry ``Authorization: Bearer <token>`` (or Ray's
``X-Ray-Authorization``): none is 401, a wrong one 403 (Ray's codes), compared with
``hmac.compare_digest``. Binding a non-loopback address without a token is refused
(``check_options``).

The server runs on the supervisor's loop (uvicorn without its signal handling); handlers only
read the controller's records or await (the build child, an application's deletion), so a
request never blocks the controller, and the controller never waits for a client. PUTs and
DELETEs are applied one at a time, in the order they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from shoal.controller import rest_details

logger = logging.getLogger("shoal.rest_api")

TOKEN_ENV = "SHOAL_API_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8265
MAX_BODY_BYTES = 8 * 1024 * 1024
BODY_TIMEOUT_S = 30.0
BUILD_TIMEOUT_S = 300.0  # importing and building the applications of one PUT
DELETE_TIMEOUT_S = 300.0  # DELETE answers once the applications are gone, or after this
RAY_API_VERSION = "4"  # ray.dashboard.modules.version.CURRENT_VERSION
RAY_VERSION = "2.60.0"  # the Ray Serve whose API this is
_KEEP_ALIVE_S = 5
_MAX_CONNECTIONS = 64
_APPLICATIONS_PATHS = ("/api/serve/applications/", "/api/serve/applications")
_API_TYPES = ("imperative", "declarative")  # Ray's APIType.get_valid_user_values()
_BAD_CONFIG_EXIT = 3  # rest_deploy's exit code for a config it refused


class RestAPIOptionsError(ValueError):
    """REST API options that cannot be served; the message names the option."""


@dataclass(frozen=True)
class RestAPIOptions:
    """``host``/``port`` to listen on (port 0: a free one); ``token``: the bearer token every
    request must carry (None: none needed, only allowed on loopback); ``app_dir``: the
    directory the applications of a PUT are imported from (prepended to ``sys.path``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    app_dir: str = "."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_options(options: RestAPIOptions) -> None:
    """RestAPIOptionsError unless ``options`` can be served safely."""
    if not 0 <= options.port <= 65535:
        raise RestAPIOptionsError(f"--api-port {options.port} is not a port number (0 to 65535)")
    if options.token is not None and not options.token.strip():
        raise RestAPIOptionsError(f"--api-token (or ${TOKEN_ENV}) is empty; give a token or leave it unset")
    if not is_loopback(options.host) and options.token is None:
        raise RestAPIOptionsError(
            f"the REST API would listen on {options.host}, which is not a loopback address, without a "
            f"token: anyone who reaches it could deploy code. Set --api-token (or ${TOKEN_ENV}), or use "
            "--api-host 127.0.0.1."
        )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; OSError naming the option if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve the REST API on {host}:{port} (--api-host/--api-port): {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class RestAPI:
    """The ASGI app and its server. ``controller`` is the supervisor's ``Controller``;
    ``facts()`` gives the instance's ``rest_details.InstanceFacts`` at the time of a GET."""

    def __init__(
        self, options: RestAPIOptions, controller: Any, run_dir: Path,
        facts: Callable[[], rest_details.InstanceFacts],
    ) -> None:
        self.options = options
        self._controller = controller
        self._run_dir = run_dir
        self._facts = facts
        self._token = options.token.encode() if options.token is not None else None
        self._changes = asyncio.Lock()  # PUTs and DELETEs, one at a time
        self._socket = bind(options.host, options.port)
        host, port = self._socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on the running loop."""
        import uvicorn

        from shoal.proxy.protocol import HeadLimits, LimitedHttpProtocol

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the supervisor's signals are its own
                yield

        config = uvicorn.Config(
            self, http=LimitedHttpProtocol.with_limits(HeadLimits(16 * 1024, 64, 10.0)), lifespan="off",
            log_config=None, access_log=False, log_level="warning", timeout_keep_alive=_KEEP_ALIVE_S,
            limit_concurrency=_MAX_CONNECTIONS, server_header=False, ws="none", timeout_graceful_shutdown=3,
        )
        self._server = Server(config)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="REST API")

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._socket])
        except Exception:
            logger.exception("the REST API on %s stopped", self.url)

    def close_soon(self) -> None:
        """Stop taking requests: those open are answered 503 at once (a PUT's build is killed,
        nothing of it deployed); the server winds down meanwhile (``aclose`` waits for it)."""
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True

    async def aclose(self) -> None:
        """``close_soon``, wait (bounded) for the server to stop, and close the socket."""
        self.close_soon()
        if self._server is not None and self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close()

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        answering = asyncio.ensure_future(self._answer(scope, receive))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((answering, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not answering.done():
                answering.cancel()
            await asyncio.gather(answering, closing, return_exceptions=True)
        if answering.cancelled():
            status, body, content_type = _text(503, "the shoal instance is stopping")
        else:
            status, body, content_type = answering.result()
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes, str]:
        refused = self._refuse_unauthorized(scope)
        if refused is not None:
            return refused
        method, path = scope["method"], scope["path"]
        if path in ("/api/ray/version", "/api/version"):
            return _allowed(method, ("GET",)) or _json(200, self._version())
        if path not in _APPLICATIONS_PATHS:
            return _text(404, f"Not found: {path}. This is shoal's Serve REST API: /api/serve/applications/")
        if method == "GET":
            return self._get(scope)
        if method == "PUT":
            return await self._put(scope, receive)
        if method == "DELETE":
            return await self._delete()
        return _allowed(method, ("GET", "PUT", "DELETE")) or _text(405, "")

    def _refuse_unauthorized(self, scope: dict[str, Any]) -> tuple[int, bytes, str] | None:
        if self._token is None:
            return None
        given = b""
        for name, value in scope["headers"]:
            if name in (b"authorization", b"x-ray-authorization") and not given:
                given = value
        if not given:
            return _text(401, "Unauthorized: Missing authentication token (send Authorization: Bearer <token>)")
        scheme, _, token = given.partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)):
            return _text(403, "Forbidden: Invalid authentication token")
        return None

    def _version(self) -> dict[str, Any]:
        from shoal import __version__ as shoal_version

        return {
            "version": RAY_API_VERSION, "ray_version": RAY_VERSION, "ray_commit": "shoal",
            "session_name": self._run_dir.name, "shoal_version": shoal_version,
        }

    def _get(self, scope: dict[str, Any]) -> tuple[int, bytes, str]:
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        api_type = (query.get("api_type") or [""])[0]
        if api_type and api_type.lower() not in _API_TYPES:
            return _text(400, f"Invalid 'api_type' value: '{api_type}'. Must be one of: {', '.join(_API_TYPES)}")
        details = rest_details.instance_details(self._controller.apps.values(), self._facts())
        if api_type:
            details["applications"] = {
                name: app for name, app in details["applications"].items() if app["source"] == api_type.lower()
            }
        return _json(200, details)

    async def _put(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes, str]:
        from shoal.serve.schema import ServeDeploySchema, format_validation_error

        try:
            body = await _read_body(scope, receive)
        except _BodyError as exc:
            return _text(exc.status, str(exc))
        try:
            config = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _text(400, f"the body is not JSON: {exc}. Send a Serve config as JSON (Content-Type: application/json).")
        if not isinstance(config, dict):
            return _text(400, "the body must be a JSON object: a Serve config with an 'applications' list")
        try:
            ServeDeploySchema.model_validate(config)
        except pydantic.ValidationError as exc:
            return _text(400, f"the config is not a valid Serve config:\n{format_validation_error(exc)}")
        async with self._changes:
            return await self._deploy(json.dumps(config).encode())

    async def _deploy(self, config_json: bytes) -> tuple[int, bytes, str]:
        """Build and deploy ``config_json`` in a ``rest_deploy`` child, as ``shoal deploy`` does."""
        env = {**os.environ, "SHOAL_ADDRESS": str(self._run_dir)}
        env.pop(TOKEN_ENV, None)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.controller.rest_deploy", "--app-dir", self.options.app_dir,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                env=env, cwd=self.options.app_dir, start_new_session=True,
            )
        except OSError as exc:  # the app directory is gone, no process can start, ...
            logger.error("cannot start the build of a PUT config in %s: %s", self.options.app_dir, exc)
            return _text(500, f"cannot build the config: {exc}")
        try:
            _, stderr = await asyncio.wait_for(process.communicate(config_json), BUILD_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return _text(504, f"building the applications took more than {BUILD_TIMEOUT_S:.0f}s; nothing was deployed")
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        message = stderr.decode(errors="replace").strip()
        if process.returncode == 0:
            if message:
                logger.warning("PUT /api/serve/applications/: %s", message)
            return _text(200, "")
        if process.returncode == _BAD_CONFIG_EXIT:
            return _text(400, message)
        logger.error("deploying a PUT config failed (exit code %s): %s", process.returncode, message)
        return _text(500, f"deploying the config failed (exit code {process.returncode}):\n{message[-4000:]}")

    async def _delete(self) -> tuple[int, bytes, str]:
        async with self._changes:
            names = list(self._controller.apps)
            for name in names:
                self._controller.delete_app(name)
            try:
                async with asyncio.timeout(DELETE_TIMEOUT_S):
                    for name in names:
                        while (app := self._controller.apps.get(name)) is not None and app.deleting:
                            app.changed.clear()
                            await app.changed.wait()
            except TimeoutError:
                logger.warning("DELETE: applications still stopping after %.0fs", DELETE_TIMEOUT_S)
        return _text(200, "")


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(scope: dict[str, Any], receive: Any) -> bytes:
    """The request body: 413 over ``MAX_BODY_BYTES`` (before reading it when its length is
    declared), 408 if it does not arrive within ``BODY_TIMEOUT_S``."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
            raise _BodyError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _BodyError(400, "the client left before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _BodyError(413, f"the body is over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise _BodyError(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f}s") from None


def _allowed(method: str, methods: tuple[str, ...]) -> tuple[int, bytes, str] | None:
    if method in methods:
        return None
    return _text(405, f"Method {method} is not allowed here; use {', '.join(methods)}")


def _text(status: int, text: str) -> tuple[int, bytes, str]:
    return status, text.encode(), "text/plain; charset=utf-8"


def _json(status: int, value: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(value).encode(), "application/json"
