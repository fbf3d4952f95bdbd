"""``shoal logs`` as a user runs it: against a detached instance (``shoal start``) on a private
SHOAL_RUN_DIR, with an app whose replicas log known lines (``logs_apps/logging_app.py``)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import wait_until

pytestmark = pytest.mark.timeout(90)

APPS = Path(__file__).resolve().parent / "logs_apps"
SHOAL = str(Path(sys.executable).with_name("shoal"))


@pytest.fixture
def env(private_run_dir: Path) -> dict[str, str]:
    values = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    values.pop("SHOAL_ADDRESS", None)
    return values


def _shoal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOAL, *args], cwd=APPS, env=env, capture_output=True, text=True, timeout=60)


def _ok(env: dict[str, str], *args: str) -> str:
    result = _shoal(env, *args)
    assert result.returncode == 0, f"shoal {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


@pytest.fixture
def instance(env: dict[str, str]) -> Iterator[str]:
    """A started instance serving ``logging_app:app`` as application ``logapp``; its HTTP URL."""
    started = _ok(env, "start", "--http-port", "0")
    try:
        url = next(line.split()[1] for line in started.splitlines() if line.startswith("HTTP: "))
        _ok(env, "deploy", "logging_app:app", "--name", "logapp", "--wait")
        yield url
    finally:
        _shoal(env, "shutdown", "--yes")


def test_logs_without_an_instance_is_one_error_line(env: dict[str, str]) -> None:
    result = _shoal(env, "logs")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("shoal: No shoal instance is running") and result.stderr.count("\n") == 1


def test_logs_merges_filters_and_follows(env: dict[str, str], instance: str) -> None:
    wait_until(
        lambda: "child-started-marker" in _ok(env, "logs", "--app", "logapp"), 20, "the child's line in `shoal logs`"
    )
    everything = _ok(env, "logs", "--app", "logapp")
    ingress = next(line for line in everything.splitlines() if "ingress-started-marker" in line)
    assert ingress.startswith("(ServeReplica:logapp:Ingress replica=")
    child_only = _ok(env, "logs", "--deployment", "Child")
    assert "child-started-marker" in child_only and "ingress-started-marker" not in child_only
    assert _ok(env, "logs", "--app", "other") == ""

    follow = subprocess.Popen(
        [SHOAL, "logs", "--follow", "--app", "logapp"], cwd=APPS, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert follow.stdout is not None
        with follow.stdout:
            for line in follow.stdout:
                lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        def next_with(text: str) -> str:
            while True:
                line = lines.get(timeout=30)
                assert line is not None, "shoal logs --follow exited"
                if text in line:
                    return line

        next_with("ingress-started-marker")  # the lines logged before it started
        assert httpx.get(instance, params={"say": "after-follow-started"}, timeout=10).text == "pong"
        assert next_with("said after-follow-started").startswith("(ServeReplica:logapp:Ingress replica=")
    finally:
        follow.terminate()
        follow.wait(10)
        reader.join(10)
    assert follow.returncode == 0


def test_logs_help_names_its_options(env: dict[str, str]) -> None:
    text = _ok(env, "logs", "--help")
    for option in ("--app", "--deployment", "--replica", "--follow"):
        assert option in text
