"""The replica side of HTTP: running an ingress's ASGI app, or a plain deployment, per request.

The proxy sends a request as the ASGI scope and its first receive message (msgpack; the body is
raw bytes inside it) and, for WebSockets, later receive messages as RECEIVE frames. Whatever the
app passes to ``send`` goes back as stream items: lists of ASGI messages, normalized so that they
are plain msgpack values (an ``http.response.start`` rides with the first body message).
Nothing here is ever unpickled: the HTTP path is msgpack and raw bytes only.

- Ingress deployments (``@serve.ingress(app)``): the whole ASGI app runs here, with its lifespan
  started after the user's constructor and shut down before ``__del__``. FastAPI routes declared
  as methods of the class are re-bound to the replica's instance (``self``).
- Plain deployments: ``__call__`` gets a ``starlette.requests.Request`` (or no argument if it
  takes none); its return value becomes a response: a Starlette ``Response`` as is, ``str`` as
  text/plain, ``bytes`` raw, ``None`` empty, anything else JSON. A user exception becomes a 500
  whose body does not carry the traceback; the traceback is logged with the request id. A
  ``StreamingResponse``'s body generator is closed as soon as the request ends, also when it is
  cancelled (client gone, timeout), so its ``finally`` runs then.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from shoal.runtime.errors import BackPressureError, DeploymentUnavailableError
from shoal.runtime.user_code import UserCallable

logger = logging.getLogger("shoal.http")

HTTP_METHOD = "__shoal_http__"
INGRESS_ATTR = "__shoal_ingress__"
BUILD_ASGI_APP_METHOD = "__serve_build_asgi_app__"  # ``serve.ingress()`` with no app: the instance builds it

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def normalize_message(message: MutableMapping[str, Any]) -> Message:
    """An ASGI message as plain msgpack values (lists, bytes, int), whatever the app passed
    (an ``HTTPStatus`` status becomes its int)."""
    out = dict(message)
    status = out.get("status")
    if status is not None and type(status) is not int:
        out["status"] = int(status)
    headers = out.get("headers")
    if headers is not None:
        out["headers"] = [[bytes(k), bytes(v)] for k, v in headers]
    body = out.get("body")
    if body is not None and not isinstance(body, bytes):
        out["body"] = bytes(body)
    data = out.get("bytes")
    if data is not None and not isinstance(data, bytes):
        out["bytes"] = bytes(data)
    return out


def scope_from_wire(scope: Scope) -> Scope:
    scope["headers"] = [(k, v) for k, v in scope["headers"]]
    for key in ("client", "server"):
        if scope.get(key) is not None:
            scope[key] = tuple(scope[key])
    return scope


class _Lifespan:
    """Runs an ASGI app's lifespan protocol: startup before traffic, shutdown at stop."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.state: dict[str, Any] = {}
        self.supported = True

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._task = asyncio.get_running_loop().create_task(self._main(scope))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"ASGI lifespan startup failed: {reply.get('message', '')}")
        if reply["type"] == "_unsupported":
            self.supported = False

    async def _main(self, scope: Scope) -> None:
        try:
            await self._app(scope, self._to_app.get, self._from_app.put)
        except Exception as exc:  # apps without lifespan support raise on the scope type
            await self._from_app.put({"type": "_unsupported", "message": repr(exc)})

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        if not self.supported or self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            async with asyncio.timeout(timeout_s):
                await self._from_app.get()
        except TimeoutError:
            logger.warning("ASGI lifespan shutdown did not finish within %ss", timeout_s)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class HttpHandler:
    """Serves the HTTP and WebSocket requests of one replica's user object."""

    def __init__(self, user: UserCallable) -> None:
        self.user = user
        self.app: Any = None
        self._lifespan: _Lifespan | None = None
        self._plain: tuple[Callable[..., Any], bool, bool] | None = None  # fn, is_async, takes_request

    async def startup(self) -> None:
        """Build the ingress app (if any) for the constructed instance and start its lifespan."""
        instance = self.user.instance
        ingress = getattr(type(instance), INGRESS_ATTR, None) if instance is not None else None
        if ingress is None:
            return
        if isinstance(ingress, str) and ingress == BUILD_ASGI_APP_METHOD:
            app = getattr(instance, BUILD_ASGI_APP_METHOD)()
            if inspect.isawaitable(app):
                app = await app
            if app is None:
                raise TypeError(f"`{BUILD_ASGI_APP_METHOD}` must return an ASGI app.")
        else:
            app = ingress() if _is_builder(ingress) else ingress
        _bind_class_based_views(app, instance)
        self.app = app
        self._lifespan = _Lifespan(app)
        await self._lifespan.startup()

    async def shutdown(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.shutdown()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> Exception | None:
        """Serve one request; returns the exception of a plain ``__call__`` that the response
        answers (500, or the status of a BackPressureError/503), else None (an ASGI app's
        exceptions propagate)."""
        if self.app is not None:
            if self._lifespan is not None and self._lifespan.state:
                scope["state"] = dict(self._lifespan.state)
            await self.app(scope, receive, send)
            return None
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return None
        result, answered = await self._call_plain(scope, receive)
        if isinstance(result, Response):
            try:
                await result(scope, receive, send)
            finally:
                await _close_body(result)
        else:
            for message in result:
                await send(message)
        return answered

    async def _call_plain(self, scope: Scope, receive: Receive) -> tuple[Response | list[Message], Exception | None]:
        if self._plain is None:
            fn, is_async = self.user.resolve("__call__")
            try:
                takes_request = bool(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                takes_request = True
            self._plain = (fn, is_async, takes_request)
        fn, is_async, takes_request = self._plain
        args = (Request(scope, receive),) if takes_request else ()
        try:
            result = await self.user.invoke(fn, args, {}, is_async)
        except BackPressureError as exc:
            headers = {"Retry-After": exc.retry_after_header} if exc.retry_after_header else None
            return Response(exc.message, status_code=exc.status_code, headers=headers), exc
        except DeploymentUnavailableError as exc:
            return Response(exc.message, status_code=503), exc
        except Exception as exc:
            logger.exception("HTTP request to deployment '%s' raised", self.user.deployment_name)
            return Response("Internal Server Error", status_code=500), exc
        return (result if isinstance(result, Response) else to_messages(result)), None


async def _close_body(response: Response) -> None:
    """Close a streaming response's body generator now: one the request was cut off in (client
    gone, timeout) would otherwise see ``GeneratorExit``, and run its ``finally``, only when the
    cyclic garbage collector frees it, which on an idle replica may be never."""
    aclose = getattr(getattr(response, "body_iterator", None), "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing the body of a streaming response raised")


_TEXT = b"text/plain; charset=utf-8"


def to_messages(result: Any, status: int = 200) -> list[Message]:
    """Ray Serve's conversion of a plain deployment's return value (not a ``Response``) to the
    ASGI messages of an HTTP response with ``status``: ``str`` as text/plain, ``bytes`` raw,
    ``None`` empty, anything else minified JSON."""
    if result is None:
        body, content_type = b"", _TEXT
    elif isinstance(result, str):
        body, content_type = result.encode(), _TEXT
    elif isinstance(result, (bytes, bytearray, memoryview)):
        body, content_type = bytes(result), _TEXT
    else:
        body = json.dumps(_jsonable(result), separators=(",", ":")).encode()
        content_type = b"application/json"
    headers = [[b"content-type", content_type], [b"content-length", str(len(body)).encode()]]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    custom: dict[Any, Callable[[Any], Any]] = {BaseException: str}
    try:
        import numpy as np  # type: ignore[import-not-found,unused-ignore]

        custom[np.ndarray] = lambda a: a.tolist()
        custom[np.generic] = lambda s: s.item()
    except ImportError:
        pass
    return jsonable_encoder(value, custom_encoder=custom)


def _is_builder(ingress: Any) -> bool:
    """A function taking no arguments builds the ASGI app inside the replica."""
    if not inspect.isfunction(ingress):
        return False
    return not inspect.signature(ingress).parameters


def _bind_class_based_views(app: Any, instance: Any) -> None:
    """Re-create FastAPI routes whose endpoint is a method of ``instance``'s class so that the
    endpoint is the bound method (FastAPI then no longer sees ``self`` as a parameter)."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if routes is None:
        return
    cls = type(instance)
    for index, route in enumerate(routes):
        endpoint = getattr(route, "endpoint", None)
        name = getattr(endpoint, "__name__", None)
        if endpoint is None or name is None or getattr(cls, name, None) is not endpoint:
            continue
        routes[index] = _copy_route(route, getattr(instance, name))


def _copy_route(route: Any, endpoint: Callable[..., Any]) -> Any:
    """A route of the same class and settings as ``route``, for ``endpoint``."""
    params = inspect.signature(type(route).__init__).parameters
    kwargs = {
        name: getattr(route, name)
        for name, p in params.items()
        if name not in ("self", "path", "endpoint") and p.kind is not p.VAR_KEYWORD and hasattr(route, name)
    }
    return type(route)(route.path, endpoint, **kwargs)
