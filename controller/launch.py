"""Finding or starting the instance a driver talks to.

``connect_or_start()`` uses, in order: the instance named by ``SHOAL_ADDRESS`` (its run directory,
or ``ipc://<run dir>/control.sock``); this user's running default instance (``shoal start``); or
a private supervisor started now, which dies with the calling process: it runs in its own session
(so the terminal's Ctrl-C reaches only the driver) and holds the read end of a lifeline pipe
whose write end only the driver holds; when the driver exits or is killed, the pipe reaches EOF
and the supervisor stops its replicas and exits.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.controller import rundir
from shoal.runtime.errors import RayServeException, ShoalConnectionError

logger = logging.getLogger("shoal.serve")

_START_TIMEOUT_S = 30.0


class HTTPBindError(RayServeException):
    """The supervisor could not listen on the HTTP host and port it was given."""


@dataclass
class Instance:
    run_dir: Path
    control_endpoint: str
    process: subprocess.Popen[bytes] | None = None  # set for a private instance
    lifeline_fd: int | None = None
    pid: int | None = None  # the supervisor's, when this process started it
    http_url: str | None = None
    metrics_url: str | None = None
    grpc_url: str | None = None

    @property
    def private(self) -> bool:
        return self.process is not None

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait for the supervisor to exit (after it was asked to). For a private instance,
        close the lifeline first; it is killed if it outlives ``timeout_s``."""
        if self.lifeline_fd is not None:
            os.close(self.lifeline_fd)
            self.lifeline_fd = None
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            return
        pid = rundir.supervisor_pid(self.run_dir)
        if pid is None:
            return
        import psutil  # here: `shoal run` imports this module before it starts the supervisor

        try:
            psutil.Process(pid).wait(timeout_s)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            logger.warning("the shoal supervisor (pid %d) did not stop within %.0fs", pid, timeout_s)


def run_dir_from_address(address: str) -> Path:
    path = Path(address.removeprefix("ipc://"))
    return path.parent if path.name == rundir.CONTROL_SOCKET else path


def find_running(address: str | None = None) -> Instance | None:
    """The instance at ``address`` (or SHOAL_ADDRESS, or the default one) if it runs."""
    address = address or os.environ.get("SHOAL_ADDRESS")
    if address:
        run_dir = run_dir_from_address(address)
        if rundir.supervisor_pid(run_dir) is None:
            raise ShoalConnectionError(
                f"no shoal supervisor runs at {address} (SHOAL_ADDRESS); start one with "
                "`shoal start` or unset SHOAL_ADDRESS to start a private one."
            )
        rundir.check_private_dir(run_dir)
        return Instance(run_dir, rundir.control_endpoint(run_dir))
    default = rundir.base_dir() / "default"
    if default.is_dir() and rundir.supervisor_pid(default) is not None:
        rundir.check_private_dir(default)
        return Instance(default, rundir.control_endpoint(default))
    return None


def crashed(run_dir: Path) -> str | None:
    """What to tell the user if the supervisor of ``run_dir`` died without shutting down (its
    pid file names a process that is gone), else None."""
    pid = rundir.recorded_pid(run_dir)
    if pid is None or rundir.supervisor_pid(run_dir) is not None:
        return None
    return (
        f"the shoal supervisor of {run_dir} (pid {pid}) is no longer running: it stopped without "
        "shutting down (was it killed?). `shoal start` starts it again and brings its applications back."
    )


def start_supervisor(
    run_dir: Path,
    *,
    private: bool,
    http_options: dict[str, Any] | None,
    gpus: Sequence[str] | None = None,
    logging_config: dict[str, Any] | None = None,
    grpc_options: dict[str, Any] | None = None,
) -> Instance:
    """Start a supervisor on ``run_dir`` and wait for its readiness line.

    ``private``: tie it to this process with a lifeline; otherwise it is detached.
    ``http_options``: plain HTTPOptions values; None starts no HTTP proxy.
    ``gpus``: the GPU device ids it uses; None: it detects the machine's.
    ``logging_config``: the instance's LoggingConfig (plain values), which its proxy starts with.
    ``grpc_options``: plain gRPCOptions; with servicer functions, the proxies serve gRPC.
    """
    ready_r, ready_w = os.pipe()
    pass_fds = [ready_w]
    cmd = [sys.executable, "-m", "shoal.controller", "--run-dir", str(run_dir), "--ready-fd", str(ready_w)]
    if http_options is not None:
        cmd += ["--http-options", json.dumps(http_options)]
    if gpus is not None:
        cmd += ["--gpus", json.dumps(list(gpus))]
    if logging_config is not None:
        cmd += ["--logging-config", json.dumps(logging_config)]
    if grpc_options and grpc_options.get("grpc_servicer_functions"):
        cmd += ["--grpc-options", json.dumps(grpc_options)]
    life_r = life_w = None
    if private:
        life_r, life_w = os.pipe()
        pass_fds.append(life_r)
        cmd += ["--lifeline-fd", str(life_r)]
    log = None
    if not private:  # the file itself, until the supervisor takes its output over to rotate it
        log_path = rundir.ensure_private_dir(run_dir / rundir.LOGS) / "supervisor.log"
        log = open(log_path, "ab")  # noqa: SIM115
        cmd += ["--log-file", str(log_path)]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=pass_fds,
            start_new_session=True,
            stdin=None if private else subprocess.DEVNULL,
            stdout=log,
            stderr=None if private else subprocess.STDOUT,
        )
    finally:
        os.close(ready_w)
        if life_r is not None:
            os.close(life_r)
        if log is not None:
            log.close()
    try:
        line = _read_line(ready_r, _START_TIMEOUT_S, proc)
    finally:
        os.close(ready_r)
    info = json.loads(line)
    if "error" in info:
        proc.wait(10)
        if life_w is not None:
            os.close(life_w)
        raise (HTTPBindError if info.get("http_bind_failed") else RayServeException)(info["error"])
    return Instance(
        run_dir, info["control"], proc if private else None, life_w, info["pid"],
        info.get("http_url"), info.get("metrics_url"), info.get("grpc_url"),
    )


def _read_line(fd: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            raise ShoalConnectionError(f"the shoal supervisor did not start within {timeout_s}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait(5)
                raise ShoalConnectionError(f"the shoal supervisor exited with code {code} before it was ready")
            data += chunk
    return data.decode()


def connect_or_start(
    http_options: dict[str, Any] | None,
    *,
    http_required: bool = True,
    gpus: Sequence[str] | None = None,
    logging_config: dict[str, Any] | None = None,
    grpc_options: dict[str, Any] | None = None,
) -> Instance:
    """The running instance, or a new private one (with ``gpus``, ``logging_config`` and
    ``grpc_options``, see
    ``start_supervisor``). If
    ``http_required`` is False and the HTTP port is taken, the private instance starts without
    HTTP (handles still work) and says so."""
    running = find_running()
    if running is not None:
        return running
    try:
        return start_supervisor(
            rundir.new_session_dir(), private=True, http_options=http_options, gpus=gpus, logging_config=logging_config,
            grpc_options=grpc_options,
        )
    except HTTPBindError as exc:
        if http_required or grpc_options:
            raise
        logger.warning("%s Starting without HTTP; handles work.", exc)
        return start_supervisor(
            rundir.new_session_dir(), private=True, http_options=None, gpus=gpus, logging_config=logging_config
        )
