"""Log rotation: with tiny ``RAY_ROTATION_*`` limits, a replica that prints a lot leaves its log
file plus at most ``backup_count`` rotated files under the run directory's ``logs/``, each within
the size limit (plus one line), with the newest lines in the current file."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers import DRIVERS_DIR, processes_in_run_dir, python, wait_until

pytestmark = pytest.mark.timeout(60)

_MAX_BYTES = 4096
_BACKUP_COUNT = 2
_LINES = 600  # about 25 KiB of output: the file rotates several times


def test_a_chatty_replica_log_rotates_within_the_limits(run_root: Path) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="rotate-", dir=run_root))
    token = uuid.uuid4().hex
    env = {
        **os.environ, "SHOAL_RUN_DIR": str(run_dir),
        "RAY_ROTATION_MAX_BYTES": str(_MAX_BYTES), "RAY_ROTATION_BACKUP_COUNT": str(_BACKUP_COUNT),
    }
    result = subprocess.run(
        [python(), str(DRIVERS_DIR / "chatty.py"), token, str(_LINES)],
        env=env, cwd=run_dir, capture_output=True, text=True, timeout=45,
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not processes_in_run_dir(run_dir), 20, "the driver's instance stops")

    current = list(run_dir.glob("session_*/logs/replica_chatty_Chatty_*.log"))
    assert len(current) == 1, sorted(str(p) for p in run_dir.rglob("*"))
    base = current[0]
    logs = base.parent
    family = sorted(p.name for p in logs.iterdir() if p.name.startswith(base.name))
    assert family == [base.name, base.name + ".1", base.name + ".2"]
    longest_line = max(len(line) + 1 for p in logs.glob(base.name + "*") for line in p.read_bytes().split(b"\n"))
    for name in family:
        assert (logs / name).stat().st_size <= _MAX_BYTES + longest_line, name
    newest = base.read_text()
    assert f"last-{token}" in newest
    kept = "".join((logs / name).read_text() for name in reversed(family))
    numbers = [int(line.split("-")[-2]) for line in kept.splitlines() if line.startswith("line-")]
    assert numbers == sorted(numbers) and numbers[-1] == _LINES - 1  # in order, the oldest dropped
    assert numbers[0] > 0
