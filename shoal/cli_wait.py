"""What ``shoal run`` becomes once its application serves: a small process holding the lifeline.

``shoal run`` imports the application, and everything the application imports, to build what it
deploys; once the application serves, that memory has no use. So the command replaces itself
(``exec``: same pid, same terminal, same parent) with this script, run by the same interpreter
without site packages (``python -I -S``), which needs only the standard library. It holds the write
end of its private supervisor's lifeline (the supervisor is its child) and waits for Ctrl-C or
SIGTERM, or for the supervisor to exit.

Then it prints ``shoal: draining and stopping`` and stops the supervisor: on SIGTERM (an
orchestrator stopping the container, of which this is the main process) it passes SIGTERM on, so
the supervisor drains as when signalled itself (``/-/healthz`` answers 503 at once, the requests
in flight finish); on Ctrl-C it closes the lifeline (the supervisor drains its replicas and
stops, as on ``serve.shutdown()``). It waits for the supervisor up to ``stop_timeout_s`` (SIGKILL
after that) and exits 0.

As a container's main process (pid 1) it is also the parent of every orphaned process in the
container: it reaps whichever child exits, not only the supervisor, so none stays a zombie.

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
_exited: set[int] = set()  # the children reaped so far


def _reaped(pid: int) -> bool:
    """True once the child ``pid`` exited. Reaps every child that exited (orphans too)."""
    while pid not in _exited:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True  # no child left at all
        if done == 0:
            return False
        _exited.add(done)
    return True


def wait_for_stop(pid: int) -> int:
    """Block until SIGINT or SIGTERM arrives (returns it), or the child ``pid`` exits (0)."""
    while not _reaped(pid):
        signo = signal.sigwaitinfo(WATCHED).si_signo
        if signo != signal.SIGCHLD:
            return signo
    return 0


def stop_supervisor(pid: int, lifeline_fd: int, timeout_s: float, signo: int = 0) -> None:
    """Stop the child ``pid``: SIGTERM if ``signo`` is SIGTERM, else close the lifeline; wait up
    to ``timeout_s`` for it, then SIGKILL it."""
    if signo == signal.SIGTERM:
        try:
            os.kill(pid, signal.SIGTERM)  # still our unreaped child: the pid cannot be reused
        except ProcessLookupError:
            pass
    else:
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
    signo = 0 if "--stop-now" in argv else wait_for_stop(pid)
    print("shoal: draining and stopping", flush=True)
    stop_supervisor(pid, lifeline_fd, timeout_s, signo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
