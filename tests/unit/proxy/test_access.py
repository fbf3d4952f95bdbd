"""The proxy's access lines (proxy/access.py and runtime/logs.install_proxy_logging): ASGI calls
driven through ``ProxyApp`` to a raw fake replica over ``inproc://`` sockets; no process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import run
from test_proxy_metrics import Client, FakeRuntime, RawReplica, _snapshot

from shoal.proxy.access import AccessLine, FastAccessLine, access_line
from shoal.proxy.app import ProxyApp, ProxyOptions
from shoal.proxy.metrics import IngressMetrics
from shoal.runtime import logs, wire
from shoal.runtime.buffered_log import LoopBufferedHandler


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _lines(config: dict[str, Any], tmp_path: Path, root: logging.Logger, drive: Callable[[ProxyApp], Awaitable[None]]) -> list[str]:
    """The proxy log file's lines after ``drive`` sent requests through a ``ProxyApp`` writing
    access lines as ``config`` says (its replica is the raw fake of ``test_proxy_metrics``)."""
    handlers = logs.install_proxy_logging(host="127.0.0.1", logging_config=config, default_logs_dir=str(tmp_path))
    stream = root.handlers[0]
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(io.StringIO())  # pytest owns sys.stderr

    async def main() -> None:
        replica = RawReplica()
        runtime = FakeRuntime(_snapshot(replica.endpoint))
        app = ProxyApp(runtime, ProxyOptions(), IngressMetrics("node", "127.0.0.1"), access_line(handlers, config, "127.0.0.1"))
        replying = asyncio.get_running_loop().create_task(_answer_all(replica))
        try:
            await drive(app)
        finally:
            replying.cancel()
            runtime.close()
            replica.channel.close()

    run(main)
    for handler in handlers:
        handler.flush()
    path = tmp_path / "proxy_127.0.0.1.log"
    return path.read_text().splitlines() if path.exists() else []


async def _answer_all(replica: RawReplica) -> None:
    """Answer every request 201."""
    while True:
        identity, msg = await replica.next_request()
        replica.reply(identity, msg, wire.Kind.STREAM_END, [
            {"type": "http.response.start", "status": 201, "headers": []},
            {"type": "http.response.body", "body": b"ok"},
        ])


def test_text_lines_say_method_route_status_latency_and_request_id(tmp_path: Path, root: logging.Logger) -> None:
    async def drive(app: ProxyApp) -> None:
        await Client(app, "/app/items", method="POST", headers=[(b"x-request-id", b"rid-1")]).run()
        await Client(app, "/elsewhere", method="POST").run()  # no route: 404, no request id
        await Client(app, "/-/healthz").run()  # no line

    written = _lines({}, tmp_path, root, drive)
    stamp = r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ray\.serve"
    expected = [r"rid-1 -- POST /app 201", r"- -- POST  404"]
    assert len(written) == len(expected), written
    for line, pattern in zip(written, expected, strict=True):
        assert re.fullmatch(f"{stamp} {pattern} \\d+\\.\\dms", line), line


def test_json_lines_carry_rays_proxy_fields(tmp_path: Path, root: logging.Logger) -> None:
    config = {"encoding": "JSON", "additional_log_standard_attrs": ["name"]}

    async def drive(app: ProxyApp) -> None:
        await Client(app, "/app/x", method="POST", headers=[(b"x-request-id", b"rid-1")]).run()

    (line,) = _lines(config, tmp_path, root, drive)
    record = json.loads(line)
    assert re.fullmatch(r"POST /app 201 \d+\.\dms", record["message"])
    assert (record["request_id"], record["route"], record["levelname"], record["name"]) == ("rid-1", "/app", "INFO", "ray.serve")
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
