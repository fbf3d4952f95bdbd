"""What ``shoal run`` becomes once its application serves: a small process holding the lifeline.

``shoal run`` imports the application, and everything the application imports, to build what it
deploys; once the application serves, that memory has no use. So the command replaces itself
(``exec``: same pid, same terminal, same parent) with this script, run by the same interpreter
without site packages (``python -I -S``), which needs only the standard library. It holds the write
end of its private supervisor's lifeline (the supervisor is its child) and waits for Ctrl-C or
SIGTERM, or for the supervisor to exit.

Then it prints ``shoal: draining and stopping``, closes the lifeline (the supervisor drains its
replicas and stops, as on ``serve.shutdown()``), waits for the supervisor up to ``stop_timeout_s``
(SIGKILL after that) and exits 0.

SIGINT, SIGTERM and SIGCHLD arrive blocked (``shoal run`` blocks them before the exec, and the
mask survives it): one sent during the exec stays pending and is taken here, never lost.

    python -I -S cli_wait.py SUPERVISOR_PID LIFELINE_FD STOP_TIMEOUT_S [--stop-now]
"""

from __future__ import annotations

import os
import signal
import sys
import time

WATCHED = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}


def _reaped(pid: int) -> bool:
    """True once the child ``pid`` exited (it is reaped here)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def wait_for_stop(pid: int) -> None:
    """Block until SIGINT or SIGTERM arrives, or the child ``pid`` exits."""
    while not _reaped(pid):
        if signal.sigwaitinfo(WATCHED).si_signo != signal.SIGCHLD:
            return


def stop_supervisor(pid: int, lifeline_fd: int, timeout_s: float) -> None:
    """Close the lifeline and wait up to ``timeout_s`` for the child ``pid``; then SIGKILL it."""
    os.close(lifeline_fd)
    deadline = time.monotonic() + timeout_s
    while not _reaped(pid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        signal.sigtimedwait({signal.SIGCHLD}, remaining)


def main(argv: list[str]) -> int:
    pid, lifeline_fd, timeout_s = int(argv[1]), int(argv[2]), float(argv[3])
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # already blocked when exec'd by `shoal run`
    if "--stop-now" not in argv:
        wait_for_stop(pid)
    print("shoal: draining and stopping", flush=True)
    stop_supervisor(pid, lifeline_fd, timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
