"""A driver whose supervisor dies while it waits for a deploy gets an error, not a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import DRIVERS_DIR, python, wait_until

pytestmark = pytest.mark.timeout(90)


def test_serve_run_fails_when_the_supervisor_dies_mid_deploy(private_run_dir: Path) -> None:
    marker = private_run_dir / "constructing"
    proc = subprocess.Popen(
        [python(), str(DRIVERS_DIR / "deploy_without_supervisor.py"), str(marker)],
        env={**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        wait_until(marker.exists, 30, "the replica's constructor runs")
        os.kill(started["supervisor"], signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    outcome = json.loads(out.splitlines()[-1])
    assert outcome["error"] == "RayServeException", err
    assert f"The shoal supervisor (pid {started['supervisor']}) exited with code -9" in outcome["message"]
    assert "was being deployed" in outcome["message"]
