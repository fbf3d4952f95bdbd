"""Access lines from the HTTP proxy (issue 9, item 5): one per HTTP request and WebSocket session
in ``<run dir>/logs/proxy_<host>.log``, TEXT or JSON as the instance's global ``logging_config``
says (it reaches the proxy with the next deploy, which replaces the proxy); none, from the proxy
or the replicas, with ``enable_access_log=False``; and ``shoal logs`` shows them.

Real supervisor, proxy and replicas (one instance for the module; the CLI test starts its own,
detached, as a user does), real HTTP and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import PlainTextResponse
from helpers import wait_until

from shoal import serve
from shoal.serve import api as serve_api
from shoal.serve import config_file
from shoal.serve.schema import ServeDeploySchema

pytestmark = pytest.mark.timeout(120)

PROXY_FILE = "proxy_127.0.0.1.log"
LOGS_APPS = Path(__file__).resolve().parent / "logs_apps"
SHOAL = str(Path(sys.executable).with_name("shoal"))

api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Talk:
    @api.get("/")
    def root(self, request: Request) -> str:
        logging.getLogger("ray.serve").warning("handled %s", request.headers.get("x-request-id"))
        return "ok"

    @api.get("/teapot")
    def teapot(self) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=418)

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close(code=4001)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def deploy(logging_config: dict[str, Any] | None) -> str:
    """Deploy ``Talk`` at ``/talk`` with ``logging_config`` as the instance's (serve.start's):
    the proxy logs as it says once ``serve.run`` returns. The proxy's URL."""
    if logging_config is not None:
        serve.start(logging_config=logging_config)
    serve.run(Talk.bind(), name="talk", route_prefix="/talk")
    url = serve.get_http_url()
    assert url is not None
    return url


def get(url: str, request_id: str) -> int:
    return httpx.get(url, headers={"x-request-id": request_id}, timeout=30).status_code


def websocket_echo(url: str) -> str:
    async def talk() -> str:
        async with websockets.connect(url.replace("http", "ws", 1) + "/talk/ws") as ws:
            await ws.send("hello")
            reply = await ws.recv()
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return str(reply)

    return asyncio.run(talk())


@pytest.fixture
def talk(serve_instance: Any) -> Iterator[None]:
    yield
    serve.delete("talk")


def test_text_access_lines_for_http_and_websockets(serve_instance: Any, talk: None) -> None:
    url = deploy({"encoding": "TEXT"})  # the default; said, so the test does not depend on the others
    proxy_log = serve_instance.run_dir / "logs" / PROXY_FILE
    assert httpx.get(url + "/-/healthz", timeout=30).status_code == 200  # no access line
    assert get(url + "/talk/", "text-ok") == 200
    assert get(url + "/talk/teapot", "text-teapot") == 418
    assert get(url + "/nowhere", "text-missing") == 404
    assert websocket_echo(url) == "hello"

    wait_until(lambda: any(" WS /talk " in line for line in lines(proxy_log)), 10, "the WebSocket's access line")
    written = lines(proxy_log)
    stamp = r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ray\.serve"
    assert any(re.fullmatch(stamp + r" text-ok -- GET /talk 200 \d+\.\dms", line) for line in written), written
    assert any(re.fullmatch(stamp + r" text-teapot -- GET /talk 418 \d+\.\dms", line) for line in written), written
    assert any(re.fullmatch(stamp + r" text-missing -- GET  404 \d+\.\dms", line) for line in written), written
    assert any(re.fullmatch(stamp + r" \S+ -- WS /talk 4001 \d+\.\dms", line) for line in written), written
    assert not any("healthz" in line for line in written)


def test_json_access_lines_carry_rays_fields(serve_instance: Any, talk: None) -> None:
    url = deploy({"encoding": "JSON"})
    proxy_log = serve_instance.run_dir / "logs" / PROXY_FILE
    assert get(url + "/talk/", "json-ok") == 200

    def json_line() -> dict[str, Any] | None:
        for line in lines(proxy_log):
            if line.startswith("{") and '"json-ok"' in line:
                record: dict[str, Any] = json.loads(line)
                return record
        return None

    record = wait_until(json_line, 10, "the JSON access line")
    assert re.fullmatch(r"GET /talk 200 \d+\.\dms", record["message"])
    assert (record["request_id"], record["route"], record["levelname"]) == ("json-ok", "/talk", "INFO")
    assert (record["component_name"], record["component_id"]) == ("proxy", "127.0.0.1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", record["asctime"])


def test_a_global_change_alone_replaces_the_proxy_before_serve_run_returns(serve_instance: Any, talk: None) -> None:
    """The deployment keeps its own logging_config, so only the proxy changes: once serve.run
    returns, the new proxy serves (no 503 from the supervisor while it starts) and logs JSON."""
    own = Talk.options(logging_config={"encoding": "TEXT"})
    serve.start(logging_config={"encoding": "TEXT"})
    serve.run(own.bind(), name="talk", route_prefix="/talk")
    serve.start(logging_config={"encoding": "JSON"})
    serve.run(own.bind(), name="talk", route_prefix="/talk")
    url = serve.get_http_url()
    assert url is not None
    assert get(url + "/talk/", "swap-1") == 200
    proxy_log = serve_instance.run_dir / "logs" / PROXY_FILE
    line = wait_until(lambda: next((x for x in lines(proxy_log) if '"swap-1"' in x), None), 10, "the JSON line")
    assert json.loads(line)["route"] == "/talk"


def test_enable_access_log_false_silences_the_proxy_and_the_replicas(
    serve_instance: Any, talk: None, tmp_path: Path,
) -> None:
    url = deploy({"enable_access_log": False, "logs_dir": str(tmp_path)})
    assert get(url + "/talk/", "off-1") == 200
    # Access lines back on: this replaces the proxy (the one that served off-1 has exited, so
    # anything it would have written is written) and the replica (a new logging_config).
    url = deploy({"enable_access_log": True, "logs_dir": str(tmp_path)})
    assert get(url + "/talk/", "on-1") == 200
    proxy_log = tmp_path / PROXY_FILE
    wait_until(lambda: any(" on-1 -- GET /talk 200 " in line for line in lines(proxy_log)), 10, "on-1's proxy line")
    replica_logs = sorted(tmp_path.glob("replica_talk_Talk_*.log"))
    wait_until(
        lambda: any(" on-1 -- GET /talk 200 " in line for p in replica_logs for line in lines(p)), 10,
        "on-1's replica line",
    )

    assert not any("off-1 -- " in line for line in lines(proxy_log))
    replica_lines = [line for path in replica_logs for line in lines(path)]
    assert any("handled off-1" in line for line in replica_lines)  # the replica served it, silently
    assert not any(" off-1 -- GET" in line for line in replica_lines)


def test_a_config_files_global_logging_config_reaches_the_proxy(serve_instance: Any, tmp_path: Path) -> None:
    config = {
        "logging_config": {"encoding": "JSON", "logs_dir": str(tmp_path)},
        "applications": [{"name": "cfg", "route_prefix": "/cfg", "import_path": "logging_app:app"}],
    }
    sys.path.insert(0, str(LOGS_APPS))
    try:
        serve_api.deploy_specs(config_file.build_specs(ServeDeploySchema.model_validate(config)), declarative=True, wait=True)
        url = serve.get_http_url()
        assert url is not None
        assert get(url + "/cfg?say=x", "cfg-1") == 200
        proxy_log = tmp_path / PROXY_FILE
        line = wait_until(
            lambda: next((x for x in lines(proxy_log) if '"cfg-1"' in x), None), 10, "the JSON line under logs_dir"
        )
        record = json.loads(line)
        assert re.fullmatch(r"GET /cfg 200 \d+\.\dms", record["message"]) and record["component_name"] == "proxy"
    finally:
        sys.path.remove(str(LOGS_APPS))
        serve.delete("cfg")


@pytest.fixture
def detached(private_run_dir: Path) -> Iterator[tuple[dict[str, str], str]]:
    """``shoal start`` on a private run directory serving ``logging_app:app`` at ``/``: its
    environment and HTTP URL."""
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SHOAL_ADDRESS", None)
    started = shoal(env, "start", "--http-port", "0", "--metrics-port", "off")
    try:
        url = next(line.split()[1] for line in started.splitlines() if line.startswith("HTTP: "))
        shoal(env, "deploy", "logging_app:app", "--name", "logapp", "--wait")
        yield env, url
    finally:
        subprocess.run([SHOAL, "shutdown", "--yes"], cwd=LOGS_APPS, env=env, capture_output=True, timeout=60)


def shoal(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([SHOAL, *args], cwd=LOGS_APPS, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"shoal {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def test_shoal_logs_shows_the_proxys_access_lines(detached: tuple[dict[str, str], str]) -> None:
    env, url = detached
    assert get(url + "/?say=cli-marker", "cli-1") == 200

    def proxy_line(output: str) -> str | None:
        return next((line for line in output.splitlines()
                     if line.startswith("(ProxyActor) INFO ") and " cli-1 -- GET / 200 " in line), None)

    wait_until(lambda: proxy_line(shoal(env, "logs")), 20, "the proxy's access line in `shoal logs`")
    assert "said cli-marker" in shoal(env, "logs")  # with the replicas' lines (merge order: unit tests)

    only_proxy = shoal(env, "logs", "--proxy")
    assert proxy_line(only_proxy) is not None
    assert "(ServeReplica:" not in only_proxy
    assert proxy_line(shoal(env, "logs", "--app", "logapp")) is None
