"""Log files that rotate by size, so a long-running instance cannot fill the disk.

Every log file shoal writes goes through ``RotatingLineFile`` (the supervisor's copy of each
replica's output) or a ``logging`` handler on one (``LoopBufferedHandler``, the proxy's and a
replica's files; ``RotatingLineHandler``, local testing mode's). They follow the
contract of Python's ``logging.handlers.RotatingFileHandler``: before a write that would make the
file reach ``max_bytes``, ``file.log`` becomes ``file.log.1``, ``file.log.1`` becomes
``file.log.2`` ... and ``file.log.<backup_count>`` is dropped; ``max_bytes`` or ``backup_count``
0 means the file never rotates. A single line longer than ``max_bytes`` is written whole, so a
file exceeds the limit by at most one line (a shared file: see below).

Unlike ``RotatingFileHandler`` they may share a path with other writers of this module in other
processes (the supervisor and a replica both append to the replica's file): a rotation is made
under an exclusive ``flock`` on the file being rotated, after a fresh look at the file's real
size, and a writer learns of the others' growth and rotations by ``stat``-ing the path, which
tells it both the file's size and whether another writer rotated it away (then it reopens the
path). Between two ``stat`` calls a writer counts the bytes it writes itself. How often it looks
is its ``recheck_s``:

- ``0`` (``EVERY_WRITE_S``, the default of a ``shared`` writer: the supervisor's copies of a
  replica's output, its own log): before every write; such a writer never overshoots by more
  than one line.
- ``SHARED_RECHECK_S`` (0.1 s: a replica's access lines, one per request, written in batches by
  ``runtime/buffered_log.py``): the ``stat`` is paid ten times a second, not per line. The cost:
  a file shared with such a writer may exceed ``max_bytes`` by one line plus what the other
  writers appended in the last ``SHARED_RECHECK_S`` (the writer does not see it yet; the
  others, which look before every write, rotate it at their next write), and for up to
  ``SHARED_RECHECK_S`` after another writer rotated the file, this writer's lines still go to
  the rotated file (``file.log.1``): none is lost.
- ``LONE_RECHECK_S`` (1 s, the default with ``shared=False``: a file this process alone writes,
  the proxy's, a file under a ``logs_dir``), in case something else moved or truncated it.

So a write costs one system call, the ``write``, but once per ``recheck_s``; ``write_lines``
writes a batch of lines in one.

The limits are Ray's, under Ray's names: ``RAY_ROTATION_MAX_BYTES`` (default 512 MiB,
``ray_constants.LOGGING_ROTATE_BYTES``) and ``RAY_ROTATION_BACKUP_COUNT`` (default 5,
``LOGGING_ROTATE_BACKUP_COUNT``). The supervisor reads them once from its environment
(``limits_from_env``) and hands them to each replica in its spec (``RotationLimits.to_spec``), so
every file of an instance rotates with the same limits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.runtime.errors import RayServeException

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # Ray's LOGGING_ROTATE_BYTES
DEFAULT_BACKUP_COUNT = 5  # Ray's LOGGING_ROTATE_BACKUP_COUNT
MAX_BYTES_ENV = "RAY_ROTATION_MAX_BYTES"
BACKUP_COUNT_ENV = "RAY_ROTATION_BACKUP_COUNT"
EVERY_WRITE_S = 0.0  # a shared writer's default: it stats the path before every write
SHARED_RECHECK_S = 0.1  # a shared writer on a request path (a replica's access lines)
LONE_RECHECK_S = 1.0  # a writer alone on its path checks the path this often


class LogRotationConfigError(RayServeException, ValueError):
    """A ``RAY_ROTATION_*`` variable is not a non-negative integer."""


@dataclass(frozen=True)
class RotationLimits:
    """``max_bytes``: a file rotates before it would reach this size; ``backup_count``: how many
    rotated files (``.1`` newest ... ``.<backup_count>`` oldest) are kept. Either 0: no rotation."""

    max_bytes: int = DEFAULT_MAX_BYTES
    backup_count: int = DEFAULT_BACKUP_COUNT

    def to_spec(self) -> dict[str, int]:
        return {"max_bytes": self.max_bytes, "backup_count": self.backup_count}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> RotationLimits:
        """The limits a replica's spec carries (the defaults when it carries none)."""
        if not spec:
            return cls()
        return cls(int(spec["max_bytes"]), int(spec["backup_count"]))


def _non_negative(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise LogRotationConfigError(f"{name} must be a non-negative integer, got {raw!r}")
    return value


def limits_from_env(environ: Mapping[str, str] | None = None) -> RotationLimits:
    """Ray's ``RAY_ROTATION_MAX_BYTES`` / ``RAY_ROTATION_BACKUP_COUNT`` from ``environ`` (default
    ``os.environ``), Ray's defaults where unset; ``LogRotationConfigError`` names a bad one."""
    env = os.environ if environ is None else environ
    return RotationLimits(
        _non_negative(env, MAX_BYTES_ENV, DEFAULT_MAX_BYTES),
        _non_negative(env, BACKUP_COUNT_ENV, DEFAULT_BACKUP_COUNT),
    )


class RotatingLineFile:
    """Appends text to ``path`` (created if missing), rotating it by size as the module says.
    ``write`` takes a whole record (one line, or several for a traceback) and adds the newline;
    ``write_lines`` writes many records with one ``write`` per run between rotations.
    Not thread-safe: one writer object per thread (``RotatingLineHandler`` locks).

    What a write costs besides the ``write`` itself: a ``stat`` of the path when ``recheck_s``
    (of ``clock``) have passed since the last one, which tells both whether another writer
    rotated the file away and how large it is; in between the writer adds the bytes it writes
    to the size it knows. ``recheck_s`` None: ``EVERY_WRITE_S`` for a ``shared`` writer (another
    process may append to or rotate the same path), ``LONE_RECHECK_S`` for one alone on its
    path (``shared=False``). The module says what a longer ``recheck_s`` costs in overshoot."""

    def __init__(
        self, path: str | os.PathLike[str], limits: RotationLimits, *, shared: bool = True,
        recheck_s: float | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.fspath(path)
        self.limits = limits
        self._recheck_s = (EVERY_WRITE_S if shared else LONE_RECHECK_S) if recheck_s is None else recheck_s
        self._clock = clock
        self._rotating = limits.max_bytes > 0 and limits.backup_count > 0
        self._fd = -1
        self._inode = 0
        self._size = 0  # of the path's file, as far as this writer knows
        self._recheck_at = 0.0
        self._open()

    @property
    def recheck_s(self) -> float:
        return self._recheck_s

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stat = os.fstat(fd)
        self._fd, self._inode, self._size = fd, stat.st_ino, stat.st_size
        self._recheck_at = self._clock() + self._recheck_s

    def _refresh(self) -> None:
        """Learn the path's file and its size (one ``stat``): if another writer rotated it away
        from our file, write to the path's file again."""
        try:
            stat: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if stat is None or stat.st_ino != self._inode:
            os.close(self._fd)
            self._open()
        else:
            self._size = stat.st_size
            self._recheck_at = self._clock() + self._recheck_s

    def _rotate(self, incoming: int) -> None:
        """Rotate, under an exclusive lock on the current file, unless another writer did first
        (then the path names a fresh file with room, which ``_refresh`` opens)."""
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                current = os.stat(self.path).st_ino == self._inode
            except FileNotFoundError:
                current = False
            if current and os.fstat(fd).st_size + incoming >= self.limits.max_bytes:
                for index in range(self.limits.backup_count - 1, 0, -1):
                    source = f"{self.path}.{index}"
                    if os.path.exists(source):
                        os.replace(source, f"{self.path}.{index + 1}")
                os.replace(self.path, f"{self.path}.1")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._refresh()

    def _check(self) -> None:
        if self._fd < 0:
            raise ValueError(f"write to closed log file {self.path}")
        if self._recheck_s <= 0 or self._clock() >= self._recheck_at:
            self._refresh()

    def _append(self, data: bytes) -> None:
        """Write ``data`` (whole lines), rotating first if it would make the file reach the limit."""
        if self._rotating and self._size > 0 and self._size + len(data) >= self.limits.max_bytes:
            self._rotate(len(data))
        written = os.write(self._fd, data)
        if written < len(data):  # a short write (a full disk, a signal): the rest, in order
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self._fd, view):]
        self._size += len(data)

    def write(self, text: str) -> None:
        self._check()
        self._append((text + "\n").encode("utf-8", "replace"))

    def write_lines(self, texts: Sequence[str]) -> None:
        """``write`` each of ``texts``, in as few system calls as the limits allow: the lines
        that fit before the next rotation go out in one ``write``."""
        self._check()
        if not texts:
            return
        data = ("\n".join(texts) + "\n").encode("utf-8", "replace")
        if not self._rotating or self._size + len(data) < self.limits.max_bytes:
            self._append(data)  # the whole batch fits: no line-by-line sizes needed
            return
        run: list[bytes] = []
        run_bytes = 0
        max_bytes = self.limits.max_bytes
        for text in texts:
            data = (text + "\n").encode("utf-8", "replace")
            if run and self._rotating and self._size + run_bytes + len(data) >= max_bytes:
                self._append(b"".join(run))  # the run fits; the next line rotates first
                run, run_bytes = [], 0
            run.append(data)
            run_bytes += len(data)
        if run:
            self._append(b"".join(run))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RotatingLineHandler(logging.Handler):
    """A ``logging`` handler writing each formatted record to a ``RotatingLineFile``."""

    def __init__(
        self, path: str | os.PathLike[str], limits: RotationLimits, *, shared: bool = True,
        recheck_s: float | None = None,
    ) -> None:
        super().__init__()
        self._file = RotatingLineFile(path, limits, shared=shared, recheck_s=recheck_s)

    @property
    def path(self) -> str:
        return self._file.path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            with self.lock or _NO_LOCK:
                self._file.write(text)
        except Exception:
            self.handleError(record)

    def write_line(self, text: str) -> None:
        """Write ``text``, a line already formatted as this handler's formatter would (a
        replica's access lines, see ``runtime/logs``), as ``emit`` writes a record's."""
        try:
            with self.lock or _NO_LOCK:
                self._file.write(text)
        except (OSError, ValueError):
            pass  # a full or missing disk, or a closed file, does not fail the request

    def close(self) -> None:
        with self.lock or _NO_LOCK:
            self._file.close()
        super().close()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
