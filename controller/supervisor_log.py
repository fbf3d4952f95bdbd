"""The supervisor's own log file, ``logs/supervisor.log``, rotating by size.

A supervisor started for ``shoal start``/``shoal run`` (not a driver's private one, whose output is
the driver's console) writes everything to ``logs/supervisor.log``: its own log lines and the
replica and proxy lines it echoes. The launcher first makes that file the process's stdout and
stderr, so a failure before this module takes over still lands there; ``OutputCapture`` then
points file descriptors 1 and 2 at a pipe and a thread appends each line that comes out of it to
a ``RotatingLineFile`` on the same path, so the file rotates with the instance's limits (see
``runtime/rotation.py``) whoever wrote the line (Python code, a C extension, a warning).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from shoal.runtime.rotation import RotatingLineFile, RotationLimits


class OutputCapture:
    """Route this process's stdout and stderr, from now on, through a size-rotating ``path``."""

    def __init__(self, path: Path, limits: RotationLimits) -> None:
        self._file = RotatingLineFile(path, limits)
        read_fd, write_fd = os.pipe()
        os.set_inheritable(read_fd, False)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name="shoal-supervisor-log", daemon=True)
        self._thread.start()

    def _write(self, line: bytes) -> None:
        try:
            self._file.write(line.decode("utf-8", "replace"))
        except OSError:
            pass  # the disk is full or gone: keep draining the pipe so writers never block

    def _pump(self, read_fd: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_fd, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._write(line)
            if pending:
                self._write(pending)
        finally:
            os.close(read_fd)
            self._file.close()

    def close(self, timeout_s: float) -> None:
        """Flush, point stdout and stderr at /dev/null (ending the pipe unless a child still holds
        it) and wait up to ``timeout_s`` for the last lines to be written."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        self._thread.join(timeout_s)
