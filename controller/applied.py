"""What the controller was asked to run, kept in the run directory so that a supervisor started
again on it (after a crash) brings every application back.

The file holds the application specs as last deployed (each with its deployment definitions,
code references, ``sys_path`` and config-file source), msgpack-encoded. It is written after
every deploy and delete, atomically (a temporary file, 0600, fsynced, then ``os.replace``), so
a crash mid-write leaves the previous version; an orderly shutdown removes it (the applications
were deleted). Only this user can read it: the run directory is 0700.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from shoal.runtime import wire

APPLIED_FILE = "applied.msgpack"


def save(run_dir: Path, specs: list[dict[str, Any]]) -> None:
    """Replace the saved specs of ``run_dir`` with ``specs`` (atomically)."""
    data = wire.pack(specs)
    final = run_dir / APPLIED_FILE
    temp = run_dir / f".{APPLIED_FILE}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)


def load(run_dir: Path) -> list[dict[str, Any]]:
    """The saved specs of ``run_dir`` ([] if none); ValueError if the file is unreadable."""
    try:
        data = (run_dir / APPLIED_FILE).read_bytes()
    except FileNotFoundError:
        return []
    try:
        specs = wire.unpack(data)
    except Exception as exc:
        raise ValueError(f"{run_dir / APPLIED_FILE} is not a saved application list: {exc}") from exc
    if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s for s in specs):
        raise ValueError(f"{run_dir / APPLIED_FILE} is not a saved application list")
    return specs


def clear(run_dir: Path) -> None:
    """Forget the saved specs (the applications were deleted at shutdown)."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / APPLIED_FILE).unlink()
