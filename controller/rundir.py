"""Run directories: where an instance's sockets, pid file and logs live.

    $SHOAL_RUN_DIR or /tmp/shoal-<uid>/          base, 0700, owned by this user
        default/                                  the instance `shoal start` runs
        session_<pid>_<time>/                     a private instance started by serve.run
            control.sock  supervisor.pid  instance.key  r<incarnation>.sock ...  logs/  metrics/

Every directory is created 0700 and checked to be exactly that: owned by this user, not a
symlink, no access for group or others. A supervisor refuses to start on a directory that is
not, since any local user who can reach the sockets could make replicas unpickle their data.

``instance.key`` holds the instance's secret (created 0600 by the supervisor as it starts,
removed as it stops): every process that joins the instance signs its frames with it, so the
directory's permissions are not the only wall (``wire.sign``, ``transport.read_key``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import time
from pathlib import Path

from shoal.runtime.errors import RayServeException

# psutil, and the key's name and size (``transport``, ``wire``: ZeroMQ, asyncio), are imported
# where used: ``shoal run`` imports this module before it starts the supervisor, which waits on it.

CONTROL_SOCKET = "control.sock"
PID_FILE = "supervisor.pid"
LOGS = "logs"
METRICS = "metrics"  # every process's metric samples (runtime/metrics.py)
_KEEP_SESSIONS = 10


class UnsafeRunDirError(RayServeException):
    """A run directory that other users could reach, or that is not ours."""


def base_dir() -> Path:
    configured = os.environ.get("SHOAL_RUN_DIR")
    return Path(configured) if configured else Path("/tmp") / f"shoal-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` 0700 if missing; raise UnsafeRunDirError unless it is ours and 0700."""
    try:
        path.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRunDirError(f"run directory {path} is a symlink; remove it and start again.")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRunDirError(f"run directory {path} is not a directory.")
    if st.st_uid != os.getuid():
        raise UnsafeRunDirError(
            f"run directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "use another SHOAL_RUN_DIR."
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise UnsafeRunDirError(
            f"run directory {path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 700 "
            f"(run `chmod 700 {path}`) so that other users cannot reach shoal's sockets."
        )


def instance_dir(name: str) -> Path:
    base = ensure_private_dir(base_dir())
    return ensure_private_dir(base / name)


def new_session_dir() -> Path:
    base = ensure_private_dir(base_dir())
    _prune_sessions(base)
    name = f"session_{os.getpid()}_{time.strftime('%Y%m%d-%H%M%S')}_{os.urandom(2).hex()}"
    return ensure_private_dir(base / name)


def control_endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir / CONTROL_SOCKET}"


def replica_endpoint(run_dir: Path, incarnation: int) -> str:
    return f"ipc://{run_dir / f'r{incarnation}.sock'}"


def create_key(run_dir: Path) -> bytes:
    """Create the instance's secret key file in ``run_dir`` (mode 600; never over an existing
    file or through a symlink: FileExistsError) and return the key."""
    from shoal.runtime.transport import KEY_FILE
    from shoal.runtime.wire import KEY_BYTES

    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(run_dir / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(key)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return key


def supervisor_pid(run_dir: Path) -> int | None:
    """The pid of the live supervisor of ``run_dir``, or None: a pid file whose process is
    gone, a zombie, or another program (the pid was reused) is stale."""
    pid = recorded_pid(run_dir)
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        argv = proc.cmdline()
    except psutil.Error:
        return None
    if "shoal.controller" not in argv or "--run-dir" not in argv or argv.index("--run-dir") + 1 >= len(argv):
        return None
    if os.path.realpath(argv[argv.index("--run-dir") + 1]) != os.path.realpath(run_dir):
        return None
    return pid


def recorded_pid(run_dir: Path) -> int | None:
    """The pid in ``run_dir``'s pid file, alive or not; None without one."""
    try:
        return int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def remove_sockets(run_dir: Path) -> None:
    """Remove the sockets, pid file and key of a stopped instance; logs stay."""
    from shoal.runtime.transport import KEY_FILE

    for entry in run_dir.iterdir():
        if entry.suffix == ".sock" or entry.name in (PID_FILE, KEY_FILE):
            try:
                entry.unlink()
            except FileNotFoundError:
                pass


def _prune_sessions(base: Path) -> None:
    """Clean stale sockets of dead private sessions and keep only the newest few session dirs."""
    sessions = sorted(
        (p for p in base.iterdir() if p.name.startswith("session_") and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    for index, path in enumerate(sessions):
        if supervisor_pid(path) is not None:
            continue
        if index < len(sessions) - _KEEP_SESSIONS:
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                remove_sockets(path)
            except OSError:
                pass
