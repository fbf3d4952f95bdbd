"""Processes and run directories: nothing outlives shutdown, the driver's exit, Ctrl-C or
SIGKILL of the driver; run directories are private and the supervisor refuses open ones."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    DRIVERS_DIR,
    alive,
    live_children,
    python,
    run_dir_of,
    sockets_in,
    supervisor_of,
    wait_until,
)

from shoal import serve

pytestmark = pytest.mark.timeout(60)


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, x: Any) -> Any:
        return x


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_shutdown_leaves_no_process_and_no_socket(no_processes: None) -> None:
    serve.start(http_options={"port": 0})
    try:
        handle = serve.run(Echo.bind(), name="lifecycle", route_prefix=None)
        assert handle.remote(1).result(timeout_s=10) == 1
        supervisor = supervisor_of(psutil.Process())
        run_dir = run_dir_of(supervisor)
        procs = {p.pid: " ".join(p.cmdline()) for p in live_children()}
        pids = list(procs)
        assert len(pids) >= 3  # the supervisor and two replicas at least
        assert sockets_in(run_dir)
        # The run directory and its logs directory are private.
        assert _mode(run_dir) == 0o700
        assert _mode(run_dir / "logs") == 0o700
        assert _mode(Path(os.environ["SHOAL_RUN_DIR"])) == 0o700
    finally:
        serve.shutdown()
    # shutdown returns once the supervisor and the replicas are gone; multiprocessing's resource
    # tracker (a helper the supervisor's spawns start) exits on its own a moment later.
    assert not [procs[pid] for pid in pids if alive(pid) and "resource_tracker" not in procs[pid]]
    wait_until(lambda: not [pid for pid in pids if alive(pid)], 10, "every process of the instance exits")
    assert not sockets_in(run_dir)
    assert not (run_dir / "supervisor.pid").exists()
    serve.shutdown()  # a second shutdown is a no-op


def _start_driver(mode: str, run_dir: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = {**os.environ, "SHOAL_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen(
        [python(), str(DRIVERS_DIR / "serve_app.py"), mode],
        env=env, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a program started from a shell
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=20)
        raise AssertionError(f"the driver failed before it was ready:\n{err}")
    return proc, json.loads(line)


def _assert_instance_gone(report: dict[str, Any]) -> None:
    pids = report["descendants"]
    assert report["supervisor"] in pids and len(pids) >= 3
    wait_until(lambda: not [pid for pid in pids if alive(pid)], 20, f"processes {pids} exit")
    run_dir = Path(report["run_dir"])
    wait_until(lambda: not sockets_in(run_dir), 5, f"no socket file left in {run_dir}")
    assert _mode(run_dir) == 0o700


@pytest.mark.parametrize(
    ("mode", "signum", "returncodes"),
    [
        pytest.param("exit", None, {0}, id="script exits normally"),
        pytest.param("wait", signal.SIGINT, {-signal.SIGINT, 1}, id="Ctrl-C"),
        pytest.param("wait", signal.SIGKILL, {-signal.SIGKILL}, id="SIGKILL of the driver"),
    ],
)
def test_nothing_outlives_the_driver(
    private_run_dir: Path, mode: str, signum: int | None, returncodes: set[int]
) -> None:
    proc, report = _start_driver(mode, private_run_dir)
    try:
        if signum == signal.SIGINT:
            # Ctrl-C in a terminal signals the driver's whole (foreground) process group.
            os.killpg(os.getpgid(report["pid"]), signal.SIGINT)
        elif signum == signal.SIGKILL:
            os.kill(report["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode in returncodes, err
    _assert_instance_gone(report)


def test_supervisor_refuses_a_run_dir_open_to_others(private_run_dir: Path) -> None:
    run_dir = private_run_dir / "open"
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)
    result = subprocess.run(
        [python(), "-m", "shoal.controller", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=40,
    )
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "mode 755" in message, message
    assert "700" in message
    assert not list(run_dir.iterdir())  # no socket, no pid file


def test_supervisor_refuses_a_symlinked_run_dir(private_run_dir: Path) -> None:
    target = private_run_dir / "real"
    target.mkdir(mode=0o700)
    link = private_run_dir / "link"
    link.symlink_to(target)
    result = subprocess.run(
        [python(), "-m", "shoal.controller", "--run-dir", str(link)],
        capture_output=True, text=True, timeout=40,
    )
    assert result.returncode != 0
    assert "symlink" in result.stderr + result.stdout
    assert not list(target.iterdir())


def test_a_stale_pid_file_is_recognised_at_once(private_run_dir: Path) -> None:
    """A supervisor SIGKILLed and not yet reaped (a zombie) runs nothing: its pid file is stale;
    so is one naming a live process that is not this run directory's supervisor."""
    from shoal.controller import launch, rundir
    from shoal.runtime.errors import ShoalConnectionError

    run_dir = rundir.ensure_private_dir(private_run_dir / "killed")
    instance = launch.start_supervisor(run_dir, private=True, http_options=None)
    assert instance.process is not None and rundir.supervisor_pid(run_dir) == instance.process.pid
    try:
        os.kill(instance.process.pid, signal.SIGKILL)
        wait_until(lambda: psutil.Process(instance.process.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
        assert rundir.recorded_pid(run_dir) == instance.process.pid
        assert rundir.supervisor_pid(run_dir) is None
        with pytest.raises(ShoalConnectionError, match="no shoal supervisor runs"):
            launch.find_running(str(run_dir))
        assert "no longer running" in (launch.crashed(run_dir) or "")
    finally:
        instance.wait_stopped(timeout_s=10)
    other = rundir.ensure_private_dir(private_run_dir / "reused")
    (other / rundir.PID_FILE).write_text(str(os.getpid()))  # a live process, but not a supervisor
    assert rundir.supervisor_pid(other) is None
