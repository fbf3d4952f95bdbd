"""Ordering, not timers: what the controller learns arrives in an order it does not have to wait
out. Each test repeats its scenario on a loaded machine (busy processes on every core), where a
timer-based wait loses the race."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DRIVERS_DIR, app_status, python, wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(180)

_ROUNDS = 6


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """Three busy processes per core for the duration of the test."""
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(3 * (os.cpu_count() or 1))
    ]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
        for proc in busy:
            proc.wait(timeout=10)


def test_a_workers_last_words_are_read_before_its_exit_is_reported(cpu_load: None) -> None:
    """Small and large (beyond a pipe's buffer) last words arrive in full, then the exit."""
    done = subprocess.run(
        [python(), str(DRIVERS_DIR / "last_words.py"), "4"], capture_output=True, text=True, timeout=150, check=True
    )
    rounds = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rounds) == 4
    for entry in rounds:
        assert entry["events"] == [["last words", entry["size"]], ["exit", 1]]


def test_a_constructor_error_reaches_serve_run_before_the_exit_counts(
    serve_instance: Any, app_name: str, cpu_load: None
) -> None:
    """The replica's last words (its traceback) are read before its exit is reported, so the
    failed start carries the constructor's message. (Before: it went on the control socket, and
    a replica that failed at once could exit before its socket had sent it.)"""

    class Broken:  # defined here: pickled by value, so the replica imports nothing to build it
        def __init__(self, token: str) -> None:
            raise ValueError(f"constructor broken: {token}")

    deployment = serve.deployment(Broken, max_constructor_retry_count=1)
    for _ in range(_ROUNDS):
        token = uuid.uuid4().hex
        with pytest.raises(RuntimeError) as info:
            serve.run(deployment.bind(token), name=app_name, route_prefix=None)
        assert f"constructor broken: {token}" in str(info.value)


@serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1})
class LoopBlocker:
    async def hold_loop(self, halfway: str) -> None:
        """Holds the replica's event loop for 0.8 s, so the controller's metrics call waits."""
        time.sleep(0.4)  # blocks the loop: the workload of this test, not a synchronisation
        Path(halfway).touch()
        time.sleep(0.4)


@serve.deployment(
    autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 2,
        "downscale_delay_s": 0, "upscale_delay_s": 0, "metrics_interval_s": 0.1, "look_back_period_s": 0.2,
    }
)
class Idle:
    def __call__(self) -> str:
        return "idle"


def test_autoscaling_survives_a_redeploy_that_clears_an_autoscaler_mid_tick(
    serve_instance: Any, app_name: str, tmp_path: Path
) -> None:
    """A redeploy that turns autoscaling off while the autoscaling task awaits the replica's
    metrics must not end that task: another deployment still scales down afterwards."""
    other = f"{app_name}_other"
    try:
        handle = serve.run(LoopBlocker.bind(), name=app_name, route_prefix=None)
        halfway = tmp_path / "halfway"
        response = handle.hold_loop.remote(str(halfway))
        # The loop is held for 0.8 s; a tick (every 0.25 s) is waiting on its metrics by now.
        wait_until(halfway.exists, 10, "the replica holds its loop")
        serve.run(LoopBlocker.options(autoscaling_config=None, num_replicas=1).bind(), name=app_name, route_prefix=None)
        response.result(timeout_s=10)
        serve.run(Idle.bind(), name=other, route_prefix=None)
        wait_until(
            lambda: app_status(other).deployments["Idle"].replica_states == {"RUNNING": 1}, 20,
            "the other deployment scales down to min_replicas",
        )
    finally:
        serve.delete(other)
