"""A replica's logging as its LoggingConfig says (runtime/logs.py), and the precedence of the
levels it can be set at (no process: the root logger of this process is configured and put back)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.controller.deploy import apply_spec
from shoal.runtime import logs
from shoal.runtime.context import RequestContext, reset_request, set_request
from shoal.serve._deployment_config import DeploymentConfig

_OUT = io.StringIO()


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """What the replica's root logger writes to stderr (see ``install``); the root logger is
    restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    _OUT.seek(0)
    _OUT.truncate()
    yield _OUT
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def install(config: dict[str, Any] | None) -> None:
    logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app", logging_config=config)
    stream = logging.getLogger().handlers[0]
    assert isinstance(stream, logging.StreamHandler)
    stream.setStream(_OUT)  # pytest owns sys.stderr during the test


def test_json_lines_carry_rays_keys_and_the_request(stderr: io.StringIO) -> None:
    install({"encoding": "JSON", "additional_log_standard_attrs": ["funcName", "name"]})
    token = set_request(RequestContext(request_id="rid-1", route="/r", app_name="app"))
    try:
        logging.getLogger("ray.serve").info("hello %s", "world")
    finally:
        reset_request(token)
    logging.getLogger("user").warning("outside")
    first, second = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert first["message"] == "hello world" and first["levelname"] == "INFO"
    assert (first["request_id"], first["route"], first["application"]) == ("rid-1", "/r", "app")
    assert (first["deployment"], first["replica"], first["component_name"]) == ("D", "abcd", "replica")
    assert first["funcName"] == "test_json_lines_carry_rays_keys_and_the_request" and first["name"] == "ray.serve"
    assert {"asctime", "filename", "lineno", "process"} <= set(first)
    assert "request_id" not in second and second["message"] == "outside"


def test_text_lines_level_and_extra_attributes(stderr: io.StringIO) -> None:
    install({"log_level": "WARNING", "additional_log_standard_attrs": ["lineno"]})
    logging.getLogger("ray.serve").info("dropped")
    logging.getLogger("ray.serve").warning("kept")
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith("WARNING ") and line.endswith(" -- kept")
    assert " ray.serve - " in line and line.split(" -- ")[0].split()[-1].isdigit()  # %(lineno)s


def test_access_lines_as_rays_replica_writes_them_into_the_log_file_only(stderr: io.StringIO, tmp_path: Path) -> None:
    logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app", default_logs_dir=str(tmp_path))
    logging.getLogger().handlers[0].setStream(_OUT)  # type: ignore[attr-defined]
    call = logs.AccessLog("predict", "", "rid-2")
    call.end("RESULT")
    http = logs.AccessLog("__serve_http__", "/api", "rid-3")
    http.http({"method": "POST", "path": "/api/x"})
    http.final = [{"type": "http.response.start", "status": 201}, {"type": "http.response.body"}]
    http.end("STREAM_END")
    failed = logs.AccessLog("__serve_http__", "", "rid-4")
    failed.http({"method": "GET", "path": "/y"})
    failed.end("ERROR")
    logs.AccessLog("predict", "", "rid-5").end("CANCELLED")
    logs.AccessLog("__health__", "", "", enabled=False).end("RESULT")
    logging.getLogger("user").info("a user line")
    assert stderr.getvalue().splitlines()[-1].endswith(" -- a user line")
    assert "CALL" not in stderr.getvalue()  # stderr is echoed to consoles: no access lines there
    out = (tmp_path / "replica_app_D_abcd.log").read_text().splitlines()
    assert len(out) == 4  # the supervisor writes the stderr lines into the same file
    assert " rid-2 -- CALL predict OK " in out[0] and out[0].endswith("ms")
    assert " rid-3 -- POST /api 201 " in out[1]
    assert " rid-4 -- GET /y 500 " in out[2]
    assert " rid-5 -- CALL predict CANCELLED " in out[3]


def test_access_lines_can_be_turned_off_and_logs_dir_gets_every_line(stderr: io.StringIO, tmp_path: Path) -> None:
    for enabled in (True, False):
        logs_dir = tmp_path / str(enabled)
        install({"enable_access_log": enabled, "logs_dir": str(logs_dir)})
        logs.AccessLog("m", "", "rid").end("RESULT")
        logging.getLogger("ray.serve").info("user line")
        written = (logs_dir / "replica_app_D_abcd.log").read_text().splitlines()
        assert [line.split(" -- ")[-1].split(" ")[0] for line in written] == (["CALL", "user"] if enabled else ["user"])


def entry(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "definition": b"x", "config": DeploymentConfig().merged(options).to_wire()}


def test_a_deployments_config_wins_over_its_applications_whole() -> None:
    spec = {
        "name": "app", "route_prefix": None, "ingress": "A", "sys_path": [],
        "deployments": [entry("A"), entry("B", logging_config={"log_level": "DEBUG"})],
        "logging_config": {"encoding": "JSON", "log_level": "WARNING"},
    }
    app, _ = apply_spec(None, spec)
    a, b = app.deployments["A"].config["logging_config"], app.deployments["B"].config["logging_config"]
    assert (a["encoding"], a["log_level"]) == ("JSON", "WARNING")
    assert (b["encoding"], b["log_level"]) == ("TEXT", "DEBUG")  # not merged field by field
    version = app.deployments["A"].version
    again, _ = apply_spec(app, {**spec, "logging_config": {"log_level": "INFO"}})
    assert again.deployments["A"].version != version  # replicas restart with the new config
    assert again.deployments["B"].version == app.deployments["B"].version


def test_local_testing_mode_applies_the_apps_logging_config(tmp_path: Path) -> None:
    from shoal import serve

    @serve.deployment
    class Talk:
        def __call__(self) -> str:
            logging.getLogger("ray.serve").info("info-line")
            logging.getLogger("ray.serve").warning("warning-line")
            return "ok"

    serve_logger = logging.getLogger("ray.serve")
    handlers, propagate, level = serve_logger.handlers[:], serve_logger.propagate, serve_logger.level
    try:
        config = {"log_level": "WARNING", "encoding": "JSON", "logs_dir": str(tmp_path)}
        handle = serve.run(Talk.bind(), name="local_logs", _local_testing_mode=True, logging_config=config)
        assert handle.remote().result(timeout_s=10) == "ok"
        (file,) = tmp_path.glob("replica_local_logs_local_test_*.log")
        assert [json.loads(line)["message"] for line in file.read_text().splitlines()] == ["warning-line"]
    finally:
        serve.shutdown()
        for handler in serve_logger.handlers:
            handler.close()
        serve_logger.handlers[:], serve_logger.propagate = handlers, propagate
        serve_logger.setLevel(level)


def test_set_logging_config_replaces_a_deployments_config() -> None:
    from shoal import serve

    @serve.deployment(logging_config={"encoding": "JSON"})
    def f() -> None:
        return None

    f.set_logging_config({"log_level": "DEBUG"})
    assert (f.logging_config.log_level, f.logging_config.encoding) == ("DEBUG", "TEXT")
    app = f.bind()
    assert app.deployment.logging_config.log_level == "DEBUG"


@pytest.mark.parametrize("encoding", ["TEXT", "JSON"])
def test_the_replicas_fast_access_line_is_the_formatters_line(
    stderr: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str,
) -> None:
    logs.install_replica_logging(
        deployment="D", replica="app#D#abcd", app="app", logging_config={"encoding": encoding},
        default_logs_dir=str(tmp_path),
    )
    assert logs._fast_access is not None and logs._fast_access.usable()
    fast = logs._fast_access
    token = set_request(RequestContext(request_id="ctx-rid", route="/r", app_name="app"))
    try:
        for slow in (True, False):
            monkeypatch.setattr(logs, "_fast_access", None if slow else fast)
            logs.log_access("GET", "/r", 200, 3.14159, request_id="rid-1")
            logs.log_access("CALL", "__call__", "OK", 0.04)  # the current request's id and route
    finally:
        reset_request(token)
    (path,) = tmp_path.glob("replica_app_D_abcd.log")
    written = path.read_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
    normalized = [stamp.sub("T", line) for line in written]
    assert len(written) == 4 and normalized[:2] == normalized[2:], written
    if encoding == "JSON":
        assert list(json.loads(written[1])) == list(json.loads(written[3]))
        assert json.loads(written[1])["route"] == "/r" and "route" not in json.loads(written[0])


def test_a_handler_added_by_the_user_gets_access_records_again(stderr: io.StringIO, tmp_path: Path) -> None:
    logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app", default_logs_dir=str(tmp_path))
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("ray.serve").addHandler(keep)
    try:
        logs.log_access("GET", "/r", 200, 1.0, request_id="rid-2")
    finally:
        logging.getLogger("ray.serve").removeHandler(keep)
    assert [r.getMessage() for r in seen] == ["GET /r 200 1.0ms"]
    assert "rid-2 -- GET /r 200 1.0ms" in next(tmp_path.glob("replica_*.log")).read_text()


def test_a_replicas_access_lines_are_written_once_per_loop_iteration_and_at_shutdown(
    stderr: io.StringIO, tmp_path: Path,
) -> None:
    logs.install_replica_logging(deployment="D", replica="app#D#abcd", app="app", default_logs_dir=str(tmp_path))
    path = tmp_path / "replica_app_D_abcd.log"

    async def main() -> tuple[str, str, str]:
        files = logs.bind_log_files(asyncio.get_running_loop())
        assert len(files) == 1
        for number in range(3):
            logs.log_access("GET", "/r", 200, 1.0, request_id=f"rid-{number}")
        during = path.read_text()
        await asyncio.sleep(0)
        after = path.read_text()
        logs.log_access("GET", "/r", 200, 1.0, request_id="rid-last")
        # What a replica does before os._exit, limited to its files (not pytest's handlers).
        logging.shutdown(handlerList=[weakref.ref(file) for file in files])
        return during, after, path.read_text()

    during, after, at_exit = asyncio.run(main())
    assert during == ""
    assert [line.split(" -- ")[0].split()[-1] for line in after.splitlines()] == ["rid-0", "rid-1", "rid-2"]
    assert at_exit.splitlines()[-1].endswith(" rid-last -- GET /r 200 1.0ms")
