"""The seed examples run unchanged, as a user runs them: ``python FILE`` from an empty directory."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import processes_in_run_dir, python, sockets_in, wait_until

pytestmark = pytest.mark.timeout(90)

SEEDS = Path("/work/shared/examples/seed")
SEED_FILES = ["01_first_deployment.py", "02_composition.py"]


def _port_8000_taken() -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _run(argv: list[str], run_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**os.environ, "SHOAL_RUN_DIR": str(run_dir)}, cwd=cwd, capture_output=True, text=True, timeout=60,
    )


def _assert_stopped(run_dir: Path) -> None:
    wait_until(lambda: not processes_in_run_dir(run_dir), 20, f"every process of {run_dir} exits")
    wait_until(lambda: not sockets_in(run_dir), 5, f"no socket file left in {run_dir}")


@pytest.fixture
def empty_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


@pytest.mark.parametrize("seed", SEED_FILES)
def test_seed_runs_on_a_private_instance(seed: str, private_run_dir: Path, empty_cwd: Path) -> None:
    # serve.run starts a private instance, with its HTTP proxy on the default port 8000.
    if _port_8000_taken():
        pytest.skip("127.0.0.1:8000 is taken by another program; the default HTTP port cannot be bound")
    result = _run([python(), str(SEEDS / seed)], private_run_dir, empty_cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_stopped(private_run_dir)


@pytest.mark.parametrize("seed", SEED_FILES)
def test_seed_runs_on_a_started_instance(seed: str, private_run_dir: Path, empty_cwd: Path) -> None:
    # `shoal start` (HTTP on port 0, so nothing else on the machine matters), then the unchanged
    # seed deploys to that instance, then `shoal shutdown` stops it.
    shoal = [python(), "-c", "import sys; from shoal.cli import main; sys.exit(main())"]
    started = _run([*shoal, "start", "--http-port", "0"], private_run_dir, empty_cwd)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        result = _run([python(), str(SEEDS / seed)], private_run_dir, empty_cwd)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stopped = _run([*shoal, "shutdown"], private_run_dir, empty_cwd)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    _assert_stopped(private_run_dir)

