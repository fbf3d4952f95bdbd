"""Replica output: print() and logging reach the driver's console, prefixed with the deployment
and replica, and the replica's log file under the run directory's ``logs/``."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers import DRIVERS_DIR, processes_in_run_dir, python, wait_until

pytestmark = pytest.mark.timeout(60)

_PREFIX = r"\(ServeReplica:talk:Talker pid=\d+, replica=\w+\) "


@pytest.fixture(scope="module")
def talk(run_root: Path) -> tuple[str, str, Path]:
    """Run the ``talk`` driver once; its console output, the token it printed, its run dir."""
    private_run_dir = Path(tempfile.mkdtemp(prefix="talk-", dir=run_root))
    token = uuid.uuid4().hex
    result = subprocess.run(
        [python(), str(DRIVERS_DIR / "talk.py"), token],
        env={**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)},
        cwd=private_run_dir, capture_output=True, text=True, timeout=45,
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "the driver's instance stops")
    return result.stdout + result.stderr, token, private_run_dir


def test_print_reaches_the_driver_console_with_a_prefix(talk: tuple[str, str, Path]) -> None:
    console, token, _ = talk
    assert re.search(_PREFIX + f"print-{token}$", console, re.MULTILINE), console


def test_stderr_reaches_the_driver_console_with_a_prefix(talk: tuple[str, str, Path]) -> None:
    console, token, _ = talk
    assert re.search(_PREFIX + f"stderr-{token}$", console, re.MULTILINE), console


def test_logging_reaches_the_driver_console_with_a_prefix(talk: tuple[str, str, Path]) -> None:
    console, token, _ = talk
    line = re.search(_PREFIX + f".*logging-{token}$", console, re.MULTILINE)
    assert line, console
    assert "WARNING" in line.group(0) and "user.app" in line.group(0)


def test_output_is_written_to_the_replica_log_file(talk: tuple[str, str, Path]) -> None:
    _, token, run_root = talk
    logs = list(run_root.glob("session_*/logs/replica_talk_Talker_*.log"))
    assert len(logs) == 1, list(run_root.rglob("*"))
    text = logs[0].read_text()
    for expected in (f"print-{token}", f"logging-{token}", f"stderr-{token}"):
        assert expected in text, text
    assert oct(os.stat(logs[0].parent).st_mode & 0o777) == oct(0o700)
