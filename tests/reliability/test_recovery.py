"""Recovery after the supervisor itself is killed (T10, and the applications coming back).

``shoal start`` runs a detached supervisor on a private SHOAL_RUN_DIR; an application is
deployed to it; the supervisor is SIGKILLed. Its children must exit, ``shoal status`` must say
at once that it is gone, and ``shoal start`` again on the same run directory must serve the
application again. Figures are printed (``-s``) and put in the assertion messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import alive, processes_in_run_dir, wait_until

pytestmark = pytest.mark.timeout(90)

SHOAL = str(Path(sys.executable).with_name("shoal"))
APP = """
import os

from shoal import serve


@serve.deployment(num_replicas=2)
class Hello:
    def __call__(self, request):
        return {"pid": os.getpid()}


app = Hello.bind()
"""


class Shoal:
    def __init__(self, workdir: Path, run_dir: Path) -> None:
        self.workdir = workdir
        self.run_dir = run_dir
        self.env = {**os.environ, "SHOAL_RUN_DIR": str(run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
        self.env.pop("SHOAL_ADDRESS", None)
        self.started = ""

    def __call__(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SHOAL, *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def start(self) -> str:
        """``shoal start``; the HTTP URL it printed (all it printed: ``started``)."""
        result = self("start", "--http-port", "0")
        self.started = result.stdout
        assert result.returncode == 0 and "shoal started" in result.stdout, result.stdout + result.stderr
        match = re.search(r"HTTP: (http://\S+)", result.stdout)
        assert match, result.stdout
        return match.group(1)

    def supervisor(self) -> psutil.Process:
        (sup,) = [p for p in processes_in_run_dir(self.run_dir) if p.name() == "shoal"]
        return sup


@pytest.fixture
def shoal(tmp_path: Path, private_run_dir: Path) -> Iterator[Shoal]:
    (tmp_path / "hello.py").write_text(APP)
    cli = Shoal(tmp_path, private_run_dir)
    yield cli
    cli("shutdown", "-y")
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "the instance stops")


def _serves(url: str) -> bool:
    try:
        return httpx.get(f"{url}/hello", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_t10_supervisor_sigkill_then_start_brings_the_app_back(shoal: Shoal) -> None:
    url = shoal.start()
    deployed = shoal("deploy", "hello:app", "--route-prefix", "/hello", "--wait")
    assert deployed.returncode == 0, deployed.stderr
    assert _serves(url)
    saved = shoal.run_dir / "default" / "applied.msgpack"
    assert saved.exists() and (saved.stat().st_mode & 0o777) == 0o600
    supervisor = shoal.supervisor()
    children = [p.pid for p in supervisor.children(recursive=True)]
    assert len(children) >= 3  # two replicas and the proxy at least

    killed_at = time.monotonic()
    supervisor.kill()
    status = shoal("status", timeout_s=30)
    status_s = time.monotonic() - killed_at
    wait_until(lambda: not [pid for pid in children if alive(pid)], 10, "the supervisor's children exit")
    children_s = time.monotonic() - killed_at
    orphans = [pid for pid in children if alive(pid)]

    restarted_at = time.monotonic()
    new_url = shoal.start()
    assert "deployed again" in shoal.started, shoal.started
    wait_until(lambda: _serves(new_url), 30, "the application serves again after `shoal start`")
    serving_s = time.monotonic() - restarted_at
    apps = json.loads(shoal("status", "--json").stdout)["applications"]
    figures = (
        f"T10: `shoal status` after the SIGKILL answered in {status_s:.2f} s (exit {status.returncode}: "
        f"{status.stderr.strip()!r}); the supervisor's {len(children)} children exited within "
        f"{children_s:.2f} s, orphans {len(orphans)}; after `shoal start` again the app served in {serving_s:.2f} s"
    )
    print(figures)
    assert status.returncode == 1 and "no longer running" in status.stderr, figures
    assert status_s < 10, figures
    assert not orphans, figures
    assert apps["default"]["status"] == "RUNNING", apps
    # An orderly shutdown deletes the applications: the next start brings nothing back.
    assert shoal("shutdown", "-y").returncode == 0
    assert not saved.exists()
    shoal.start()
    assert shoal("status").stdout.strip() == "No applications are running."
