"""Shared-memory segments for large out-of-band buffers (numpy arrays, big bytes).

A buffer of ``THRESHOLD_BYTES`` or more that a handle call sends or returns is written once
into a segment: a file in the instance's segment directory, which the receiver maps
(``mmap``) instead of reading it through a socket. Below the threshold a buffer goes as a
ZeroMQ frame of its own (``wire``); a socket cannot carry 64 MiB as fast as one copy into
memory that the receiver maps.

Where: ``directory_for(run_dir)``: ``/dev/shm/shoal-<uid>-<digest of the run directory>``
(memory, not disk), created 0700 by the supervisor as it starts and removed as it stops; other
users cannot open what is in it. Each segment is a 0600 file named
``<creator pid>-<receiver pid>-<n>``.

Who removes a segment (every path ends with the file gone; a mapping already made stays valid
after its file is unlinked, so removal never pulls memory from under an array):

- receiver pid 0 (a request's arguments: the caller may send them again to another replica
  after a REJECTED): the creator, when the call ends (result, error, cancellation, replica
  death: ``Call`` releases them); the replica maps them and leaves the file;
- receiver pid set (a result or stream item, for the caller that sent the request): the
  receiver, as soon as it has mapped it (``attach``); the creator if the send fails (the
  caller is gone);
- a process that dies before either: the supervisor's ``sweep`` removes every segment whose
  creator is dead, or whose receiver is dead (it runs periodically and when a worker exits);
- instance stop: the supervisor removes the directory and whatever is left in it.

A creator that dies with a reply segment in flight to a live caller loses that reply to the
sweep if the caller had not mapped it yet (the caller then gets an error for a call whose
replica died anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import mmap
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from shoal.runtime.wire import Buffer, SegmentRef

logger = logging.getLogger("shoal.shm")

# Buffers of this size or more travel in a segment. Measured with benchmarks/arrays.py (an
# echo through a handle, 2-core machine): at 1 MiB a frame and a segment cost about the same
# per round trip; from 4 MiB up the segment wins and the gap grows with the size.
THRESHOLD_BYTES = 4 * 1024 * 1024

SWEEP_INTERVAL_S = 2.0

_SHM_ROOT = "/dev/shm"
_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")

_directory: str | None = None  # this process's segment directory; None: segments are off
_counter = itertools.count(1)


class SegmentError(OSError):
    """A segment that is missing (its creator removed it: the call ended) or not one of ours."""


def directory_for(run_dir: str) -> str:
    """The segment directory of the instance whose run directory is ``run_dir``."""
    digest = hashlib.sha256(os.path.realpath(run_dir).encode()).hexdigest()[:16]
    if os.path.isdir(_SHM_ROOT):
        return os.path.join(_SHM_ROOT, f"shoal-{os.getuid()}-{digest}")
    return os.path.join(run_dir, "shm")


def create_directory(run_dir: str) -> str:
    """Create the instance's segment directory 0700 (the supervisor, as it starts), emptied of
    what a previous supervisor of ``run_dir`` may have left; returns its path."""
    path = directory_for(run_dir)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not _private(path):
        raise PermissionError(f"{path} must be a directory of yours with mode 700; remove it and start again")
    for name in os.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    return path


def remove_directory(run_dir: str) -> None:
    """Remove the instance's segment directory and every segment left in it (instance stop)."""
    path = directory_for(run_dir)
    if _private(path):
        shutil.rmtree(path, ignore_errors=True)


def configure(run_dir: str | None) -> None:
    """Use the segment directory of the instance at ``run_dir`` in this process (None, or a
    directory that is missing or not private: no segments; large buffers go as frames)."""
    global _directory
    path = directory_for(run_dir) if run_dir else None
    _directory = path if path is not None and _private(path) else None


def configure_from_endpoint(control_endpoint: str) -> None:
    """``configure`` for the instance whose control socket is ``ipc://<run dir>/control.sock``."""
    configure(os.path.dirname(control_endpoint.removeprefix("ipc://")) if control_endpoint.startswith("ipc://") else None)


def directory() -> str | None:
    return _directory


def _private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


# -- sending ------------------------------------------------------------------------------------


def place(buffers: Sequence[Any], receiver_pid: int = 0) -> tuple[tuple[Buffer, ...], tuple[str, ...]]:
    """The buffers of a message to send: each of ``THRESHOLD_BYTES`` or more copied into a new
    segment (replaced by its ``SegmentRef``), the others as they are (frames, not copied).
    Returns them and the paths of the segments created, which the caller must ``release`` as
    the module's docstring says. ``receiver_pid``: 0 if the creator removes the segments,
    else the process that removes each once it has mapped it."""
    directory_ = _directory
    out: list[Buffer] = []
    created: list[str] = []
    try:
        for buffer in buffers:
            view = buffer.raw() if hasattr(buffer, "raw") else memoryview(buffer).cast("B")
            if directory_ is None or view.nbytes < THRESHOLD_BYTES:
                out.append(view)
                continue
            name = f"{os.getpid()}-{receiver_pid}-{next(_counter)}"
            path = os.path.join(directory_, name)
            created.append(path)
            _write(path, view)
            out.append(SegmentRef(name, view.nbytes))
    except BaseException:
        release(created)
        raise
    return tuple(out), tuple(created)


def _write(path: str, view: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def release(paths: Iterable[str]) -> None:
    """Remove segments this process created (those already removed are skipped)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def release_refs(buffers: Iterable[Buffer]) -> None:
    """Remove the segments among a message's buffers that this process created."""
    directory_ = _directory
    if directory_ is None:
        return
    prefix = f"{os.getpid()}-"
    release(os.path.join(directory_, b.name) for b in buffers if type(b) is SegmentRef and b.name.startswith(prefix))


# -- receiving ----------------------------------------------------------------------------------


def attach(ref: SegmentRef) -> memoryview:
    """A read-only view of a segment's memory, without a copy; the mapping lives as long as the
    view (and whatever was built on it), whether or not the file is removed. Removes the file
    if this process is the segment's receiver (see the module's docstring). SegmentError if
    the segment is missing or not a regular file of this user of the announced size."""
    match = _NAME.match(ref.name)
    if _directory is None or match is None:
        raise SegmentError(f"no shared-memory segment {ref.name!r} for this process")
    path = os.path.join(_directory, ref.name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"the shared-memory segment {ref.name} is gone (its call ended)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != ref.nbytes:
            raise SegmentError(f"{path} is not a segment of {ref.nbytes} bytes of yours")
        mapping = mmap.mmap(fd, ref.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        if int(match.group(2)) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return memoryview(mapping)


# -- the supervisor's sweep ---------------------------------------------------------------------


def sweep(directory_: str, alive: Callable[[int], bool] = psutil.pid_exists) -> list[str]:
    """Remove the segments in ``directory_`` whose creator is dead or whose receiver (if it has
    one) is dead; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory_)
    except FileNotFoundError:
        return removed
    verdicts: dict[int, bool] = {}

    def dead(pid: int) -> bool:
        if pid not in verdicts:
            verdicts[pid] = not alive(pid)
        return verdicts[pid]

    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        creator, receiver = int(match.group(1)), int(match.group(2))
        if dead(creator) or (receiver != 0 and dead(receiver)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory_, name))
                removed.append(name)
    return removed


async def sweep_forever(directory_: str, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """``sweep`` every ``interval_s`` (the supervisor's task, until cancelled)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = sweep(directory_)
        except OSError:
            logger.exception("could not sweep %s", directory_)
            continue
        if removed:
            logger.info("removed %d segment(s) of dead processes: %s", len(removed), ", ".join(removed[:5]))
