"""LoopBufferedHandler: a size-rotating log file written in batches, once per event-loop turn.

The proxy and every replica write an access line per request on their event loops. Writing each line with its own
``write`` system call costs the loop a few microseconds per request, and a slow disk would stall
every connection at once. This handler instead appends each formatted record (on the loop's
thread) to a list and, when the list stops being empty, schedules one callback that writes the
whole list with a single ``write`` (``RotatingLineFile.write_lines``, which still rotates before
a line that would make the file reach its limit). A busy loop so makes one ``write`` per
iteration for all the requests that ended in it; an idle one writes each line at the end of
the iteration that logged it, so ``shoal logs -f`` sees it at once.

Records from another thread, or before ``bind``, are written at once (with what is buffered
before them, so the file keeps the order of the records). ``flush`` and ``close`` write what is
buffered: the proxy and replicas flush before they exit (they end with ``os._exit``, after
``logging.shutdown()``). At most ``max_buffered`` lines wait; a process killed by SIGKILL loses
the lines of its last iteration.

The file may be shared with writers in other processes (``shared=True``: a replica's file in the
run directory, which the supervisor appends the replica's stderr to): then it is checked for
their growth and rotations every ``recheck_s`` (``runtime/rotation.py`` says what that costs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from shoal.runtime.rotation import RotatingLineFile, RotationLimits

_MAX_BUFFERED = 512  # lines: one loop iteration rarely ends more requests than this


class LoopBufferedHandler(logging.Handler):
    """A ``logging`` handler writing to ``path``, rotating it with ``limits``, in batches per
    loop iteration once ``bind`` names the loop (module doc). ``shared``/``recheck_s``: as
    ``RotatingLineFile``'s (default: this process is the path's only writer)."""

    def __init__(
        self, path: str | os.PathLike[str], limits: RotationLimits, *, max_buffered: int = _MAX_BUFFERED,
        shared: bool = False, recheck_s: float | None = None,
    ) -> None:
        super().__init__()
        self._file = RotatingLineFile(path, limits, shared=shared, recheck_s=recheck_s)
        self._buffer: list[str] = []
        self._max_buffered = max_buffered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1

    @property
    def path(self) -> str:
        return self._file.path

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Buffer the records logged on ``loop``'s thread (call this on that thread)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        # logging.Handler.handle holds self.lock around emit.
        try:
            self._add(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, text: str) -> None:
        """Write ``text``, a line already formatted as this handler's formatter would (access
        lines: ``proxy.access``, ``runtime/logs``), as ``emit`` writes a record's."""
        self.acquire()
        try:
            self._add(text)
        except (OSError, ValueError):
            pass  # as flush: a full or missing disk, or a closed file, does not fail the request
        finally:
            self.release()

    def _add(self, text: str) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and not loop.is_closed():
            if not self._buffer:
                loop.call_soon(self.flush)
            self._buffer.append(text)
            if len(self._buffer) >= self._max_buffered:
                self._write()
        else:
            self._buffer.append(text)
            self._write()

    def _write(self) -> None:
        lines, self._buffer = self._buffer, []
        if lines:
            self._file.write_lines(lines)

    def flush(self) -> None:
        """Write the buffered lines now."""
        self.acquire()
        try:
            self._write()
        except OSError:
            pass  # the disk is full or gone: drop the batch rather than fail the loop's callback
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            try:
                self._write()
            except OSError:
                pass
            self._file.close()
        finally:
            self.release()
        super().close()
