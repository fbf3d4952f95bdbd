"""The proxy's access lines (proxy/access.py and runtime/logs.install_proxy_logging): ASGI calls
driven directly through ``AccessLogMiddleware`` around a stand-in app; no process, no socket."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.proxy.access import AccessLine, AccessLogMiddleware, FastAccessLine, access_line, request_id
from shoal.proxy.routes import RoutingTable
from shoal.runtime import logs
from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.wire import RouteEntry


class StandIn:
    """Answers as told: ``status`` (None: sends nothing, as when the client left), or raises."""

    def __init__(self, status: int | None = 200, fail: bool = False) -> None:
        self.options = SimpleNamespace(root_path="")
        self.table = RoutingTable(1, {"/api": RouteEntry("app", "Ingress")})
        self.status = status
        self.fail = fail

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await receive()  # the client's disconnect
            return
        if self.fail:
            raise RuntimeError("boom")
        if self.status is not None:
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"text/plain"), (b"x-request-id", b"rid-1")]})
            await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _call(app: Any, line: AccessLine, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> None:
    messages = iter(incoming)

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    async def main() -> None:
        try:
            await AccessLogMiddleware(app, line)(scope, receive, send)
        except RuntimeError:
            pass

    asyncio.run(main())


def _http(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


def _lines(config: dict[str, Any], tmp_path: Path, root: logging.Logger, *calls: tuple[Any, dict[str, Any]]) -> list[str]:
    handlers = logs.install_proxy_logging(host="127.0.0.1", logging_config=config, default_logs_dir=str(tmp_path))
    stream = root.handlers[0]
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(io.StringIO())  # pytest owns sys.stderr
    line = AccessLine(handlers)
    for app, scope in calls:
        incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1001}]
        _call(app, line, scope, incoming if scope["type"] == "websocket" else [])
    for handler in handlers:
        handler.flush()
    path = tmp_path / "proxy_127.0.0.1.log"
    return path.read_text().splitlines() if path.exists() else []


def test_text_lines_say_method_route_status_latency_and_request_id(tmp_path: Path, root: logging.Logger) -> None:
    written = _lines(
        {}, tmp_path, root,
        (StandIn(201), _http("/api/items")),
        (StandIn(None), _http("/api/x", [(b"x-request-id", b"given")])),  # the client left
        (StandIn(fail=True), _http("/api")),
        (StandIn(404), _http("/elsewhere")),
        (StandIn(), _http("/-/healthz")),  # no line
        (StandIn(), {"type": "websocket", "path": "/api/ws", "headers": []}),
    )
    stamp = r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ray\.serve"
    expected = [
        r"rid-1 -- POST /api 201", r"given -- POST /api 499", r"- -- POST /api 500", r"rid-1 -- POST  404",
        r"- -- WS /api 1001",
    ]
    assert len(written) == len(expected), written
    for line, pattern in zip(written, expected, strict=True):
        assert re.fullmatch(f"{stamp} {pattern} \\d+\\.\\dms", line), line


def test_json_lines_carry_rays_proxy_fields(tmp_path: Path, root: logging.Logger) -> None:
    config = {"encoding": "JSON", "additional_log_standard_attrs": ["name"]}
    (line,) = _lines(config, tmp_path, root, (StandIn(), _http("/api/x")))
    record = json.loads(line)
    assert re.fullmatch(r"POST /api 200 \d+\.\dms", record["message"])
    assert (record["request_id"], record["route"], record["levelname"], record["name"]) == ("rid-1", "/api", "INFO", "ray.serve")
    assert (record["component_name"], record["component_id"]) == ("proxy", "127.0.0.1")


@pytest.mark.parametrize("config", [{"enable_access_log": False}, {"log_level": "WARNING"}])
def test_no_access_handlers_when_off_or_below_the_level(tmp_path: Path, root: logging.Logger, config: dict[str, Any]) -> None:
    assert logs.install_proxy_logging(host="h", logging_config=config, default_logs_dir=str(tmp_path)) == []
    assert not (tmp_path / "proxy_h.log").exists()


def test_logs_dir_gets_every_proxy_line(tmp_path: Path, root: logging.Logger) -> None:
    config = {"logs_dir": str(tmp_path / "mine"), "enable_access_log": False}
    assert logs.install_proxy_logging(host="h", logging_config=config, default_logs_dir=str(tmp_path)) == []
    stream = root.handlers[0]
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(io.StringIO())
    logging.getLogger("shoal.proxy").warning("a warning")
    for handler in root.handlers:
        handler.flush()
    (line,) = (tmp_path / "mine" / "proxy_h.log").read_text().splitlines()
    assert line.startswith("WARNING ") and line.endswith(" shoal.proxy - -- a warning")


def test_request_id_prefers_the_response_header() -> None:
    assert request_id([(b"x-request-id", b"answered")], [(b"x-request-id", b"given")]) == "answered"
    assert request_id([], [(b"x-request-id", b"given")]) == "given"
    assert request_id((), []) == ""


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_the_fast_line_is_the_formatters_line(tmp_path: Path, root: logging.Logger, encoding: str) -> None:
    config = {"encoding": encoding}
    handlers = logs.install_proxy_logging(
        host="127.0.0.1", logging_config=config, default_logs_dir=str(tmp_path), file_factory=LoopBufferedHandler
    )
    fast = access_line(handlers, config, "127.0.0.1")
    assert isinstance(fast, FastAccessLine)
    assert isinstance(access_line(handlers, {**config, "additional_log_standard_attrs": ["name"]}, "h"), AccessLine)
    for line in (AccessLine(handlers), fast):
        line.write("GET", "/api", 200, 12.345, "rid-1")
        line.write("WS", "/a\"b", 4001, 0.04, "")
    for handler in handlers:
        handler.flush()
    written = (tmp_path / "proxy_127.0.0.1.log").read_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
    assert all(stamp.search(line) for line in written)
    normalized = [stamp.sub("T", line) for line in written]
    assert normalized[:2] == normalized[2:], written
    if encoding == "JSON":
        assert list(json.loads(written[0])) == list(json.loads(written[2]))  # the same keys in the same order
