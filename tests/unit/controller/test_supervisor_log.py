"""The supervisor's own output (stdout, stderr, Python or raw writes) lands in a size-rotating
``supervisor.log``: a child process takes its output over as the supervisor does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

_CHILD = """
import os, sys
from pathlib import Path
from shoal.controller.supervisor_log import OutputCapture
from shoal.runtime.rotation import RotationLimits

capture = OutputCapture(Path(sys.argv[1]), RotationLimits(max_bytes=100, backup_count=2))
for number in range(40):
    print(f"line-{number:03d}")
os.write(2, b"raw-stderr\\n")
print("last", file=sys.stderr, end="")
capture.close(10)
"""


def test_supervisor_output_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervisor.log", "supervisor.log.1", "supervisor.log.2"]
    for name in ("supervisor.log", "supervisor.log.1", "supervisor.log.2"):
        assert (tmp_path / name).stat().st_size < 100
    assert path.read_text().endswith("line-039\nraw-stderr\nlast\n")
    kept = "".join((tmp_path / name).read_text() for name in ("supervisor.log.2", "supervisor.log.1", "supervisor.log"))
    lines = kept.splitlines()[:-2]
    assert lines == [f"line-{n:03d}" for n in range(40 - len(lines), 40)]  # the newest, in order
    assert lines[0] != "line-000"  # the oldest were dropped
