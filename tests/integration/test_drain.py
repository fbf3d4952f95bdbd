"""SIGTERM of the supervisor drains: /-/healthz answers 503 while requests in flight finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import processes_in_run_dir, served_url, wait_until

pytestmark = pytest.mark.timeout(90)

APP = '''
import asyncio
from starlette.requests import Request
from shoal import serve

@serve.deployment
class Held:
    def __init__(self):
        self.running = 0
        self.release = asyncio.Event()

    async def __call__(self, request: Request) -> str:
        action = request.url.path.strip("/")
        if action == "running":
            return str(self.running)
        if action == "release":
            self.release.set()
            return "released"
        self.running += 1
        await self.release.wait()
        return "finished"

app = Held.bind()
'''


def test_sigterm_drains_the_proxy_then_the_replicas(tmp_path: Path, private_run_dir: Path) -> None:
    (tmp_path / "held_app.py").write_text(APP)
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    shoal = str(Path(sys.executable).parent / "shoal")
    cli = subprocess.Popen([shoal, "run", "held_app:app", "--port", "0"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    reader: list[threading.Thread] = []
    try:
        base = served_url(cli, 60, reader)
        with httpx.Client(base_url=base, timeout=30) as client:
            wait_until(lambda: _ok(client, "/-/healthz"), 30, "the app serves")
            result: dict[str, Any] = {}
            held = threading.Thread(target=lambda: result.update(r=client.get("/hold")))
            held.start()
            wait_until(lambda: _text(client, "/running") == "1", 10, "the held request runs")

            supervisor = int((private_run_dir / "default" / "supervisor.pid").read_text())
            os.kill(supervisor, signal.SIGTERM)
            wait_until(lambda: _status(client, "/-/healthz") == 503, 5, "healthz answers 503 while draining")
            assert client.get("/release").text == "released"  # still served while draining
            held.join(30)
            assert result["r"].status_code == 200 and result["r"].text == "finished"
        assert cli.wait(60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        for thread in reader:
            thread.join(10)  # it ends at the CLI's end of output
        if cli.stdout is not None:
            cli.stdout.close()
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "every shoal process exited")
    assert not list(private_run_dir.rglob("*.sock"))


def _status(client: httpx.Client, path: str) -> int | None:
    try:
        return client.get(path, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _ok(client: httpx.Client, path: str) -> bool:
    return _status(client, path) == 200


def _text(client: httpx.Client, path: str) -> str:
    try:
        return client.get(path, timeout=2).text
    except httpx.HTTPError:
        return ""
