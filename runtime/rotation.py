"""Log files that rotate by size, so a long-running instance cannot fill the disk.

Every log file shoal writes goes through ``RotatingLineFile`` (the supervisor's copy of each
replica's output) or ``RotatingLineHandler`` (a replica's ``logging`` file). Both follow the
contract of Python's ``logging.handlers.RotatingFileHandler``: before a write that would make the
file reach ``max_bytes``, ``file.log`` becomes ``file.log.1``, ``file.log.1`` becomes
``file.log.2`` ... and ``file.log.<backup_count>`` is dropped; ``max_bytes`` or ``backup_count``
0 means the file never rotates. A single line longer than ``max_bytes`` is written whole, so a
file exceeds the limit by at most one line.

Unlike ``RotatingFileHandler`` they may share a path with other writers of this module in other
processes (the supervisor and a replica both append to the replica's file): a rotation is made
under an exclusive ``flock`` on the file being rotated, and before each write a writer reopens the
path if another writer has rotated it away.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.runtime.errors import RayServeException

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # Ray's LOGGING_ROTATE_BYTES
DEFAULT_BACKUP_COUNT = 5  # Ray's LOGGING_ROTATE_BACKUP_COUNT
MAX_BYTES_ENV = "RAY_ROTATION_MAX_BYTES"
BACKUP_COUNT_ENV = "RAY_ROTATION_BACKUP_COUNT"


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
    ``write`` takes a whole record (one line, or several for a traceback) and adds the newline.
    Not thread-safe: one writer object per thread (``RotatingLineHandler`` locks)."""

    def __init__(self, path: str | os.PathLike[str], limits: RotationLimits) -> None:
        self.path = os.fspath(path)
        self.limits = limits
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _reopen_if_moved(self) -> None:
        """Another writer rotated the path away from our file: write to the path's file again."""
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self._fd)
            self._fd = self._open()

    def _rotate(self, incoming: int) -> None:
        """Rotate, under an exclusive lock on the current file, unless another writer did first
        (then the path names a fresh file with room, which the next write reopens)."""
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
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
        self._reopen_if_moved()

    def write(self, text: str) -> None:
        data = (text + "\n").encode("utf-8", "replace")
        if self._fd < 0:
            raise ValueError(f"write to closed log file {self.path}")
        self._reopen_if_moved()
        limits = self.limits
        if limits.max_bytes > 0 and limits.backup_count > 0:
            size = os.fstat(self._fd).st_size
            if size > 0 and size + len(data) >= limits.max_bytes:
                self._rotate(len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RotatingLineHandler(logging.Handler):
    """A ``logging`` handler writing each formatted record to a ``RotatingLineFile``."""

    def __init__(self, path: str | os.PathLike[str], limits: RotationLimits) -> None:
        super().__init__()
        self._file = RotatingLineFile(path, limits)

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
