"""The seed examples run unchanged, as a user runs them: ``python FILE`` from an empty directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import processes_in_run_dir, python, sockets_in, wait_until

pytestmark = pytest.mark.timeout(90)

SEEDS = Path("/work/shared/examples/seed")


@pytest.mark.parametrize("seed", ["01_first_deployment.py", "02_composition.py"])
def test_seed_example_runs(seed: str, private_run_dir: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [python(), str(SEEDS / seed)],
        env={**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)},
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The private instance serve.run started dies with the script.
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "the script's instance stops")
    wait_until(lambda: not sockets_in(private_run_dir), 5, f"no socket file left in {private_run_dir}")
