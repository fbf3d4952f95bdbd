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
import atexit
import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import mmap
import os
import re
import shutil
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from shoal.runtime.wire import Buffer, SegmentRef

logger = logging.getLogger("shoal.shm")

# Buffers of this size or more travel in a segment. Measured (an echo of a float32 array
# through a handle, frames against segments interleaved, medians of 6 x 30 echoes, shared
# 2-core machine, frames / segment): at load 18, 0.5 MiB 1.73 / 1.51 ms, 1 MiB 6.62 / 9.55,
# 2 MiB 7.03 / 5.53, 4 MiB 10.19 / 6.51; at load 8 (with spares and the split copy), 0.5 MiB
# 2.10 / 3.73, 1 MiB 2.10 / 2.47, 2 MiB 6.49 / 7.40, 4 MiB 11.53 / 6.20. Up to 2 MiB the two
# are within the noise or frames win; from 4 MiB up the segment wins both times, and the gap
# grows with the size (a socket moves the bytes through the kernel twice, in chunks).
THRESHOLD_BYTES = 4 * 1024 * 1024

SWEEP_INTERVAL_S = 2.0

_SHM_ROOT = "/dev/shm"
_NAME = re.compile(r"^(\d+)-(\d+)-(spare)?(\d+)$")

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


def place(
    buffers: Sequence[Any], receiver_pid: int = 0, reuse: Sequence[SegmentRef] = ()
) -> tuple[tuple[Buffer, ...], tuple[str, ...]]:
    """The buffers of a message to send: each of ``THRESHOLD_BYTES`` or more copied into a new
    segment (replaced by its ``SegmentRef``), the others as they are (frames, not copied).
    Returns them and the paths of the segments created, which the caller must ``release`` as
    the module's docstring says. ``receiver_pid``: 0 if the creator removes the segments,
    else the process that removes each once it has mapped it.

    ``reuse``: segments of the request being answered (their creator, the caller, removes them
    only when the call has ended, after it has mapped the reply): a buffer that is the whole
    of one of them (a method returning its argument) goes as that segment again, uncopied."""
    directory_ = _directory
    out: list[Buffer] = []
    created: list[str] = []
    try:
        for buffer in buffers:
            view = buffer.raw() if hasattr(buffer, "raw") else memoryview(buffer).cast("B")
            same = _segment_of(view) if reuse else None
            if same is not None and same in reuse and same.nbytes == view.nbytes:
                out.append(same)
                continue
            if directory_ is None or view.nbytes < THRESHOLD_BYTES:
                out.append(view)
                continue
            name = f"{os.getpid()}-{receiver_pid}-{next(_counter)}"
            path = os.path.join(directory_, name)
            created.append(path)
            spare = _spares.take(directory_, view.nbytes)
            if spare is not None:
                os.rename(spare, path)
            _write(path, view, spare is not None)
            _spares.prepare(directory_, view.nbytes)
            out.append(SegmentRef(name, view.nbytes))
    except BaseException:
        release(created)
        raise
    return tuple(out), tuple(created)


def _write(path: str, view: memoryview, allocated: bool) -> None:
    """Write ``view`` into a new file at ``path``, or (``allocated``) over the start of a
    spare file there, cut to its size."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if allocated else os.O_CREAT | os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        if view.nbytes >= _SPLIT_BYTES:
            # Two threads copy a half each (``pwrite`` lets the GIL go): the copy is most of
            # the cost, and a second core halves it.
            half = view.nbytes // 2
            other = _copier().submit(_pwrite, fd, view[half:], half)
            _pwrite(fd, view[:half], 0)
            other.result()
        else:
            _pwrite(fd, view, 0)
        if allocated:
            os.ftruncate(fd, view.nbytes)
    finally:
        os.close(fd)


_SPLIT_BYTES = 16 * 1024 * 1024
_copier_lock = threading.Lock()
_copier_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _copier() -> concurrent.futures.ThreadPoolExecutor:
    global _copier_pool
    with _copier_lock:
        if _copier_pool is None:
            _copier_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoal-shm-copy")
        return _copier_pool


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


class _Spares:
    """One segment file allocated ahead of need, on a thread of its own.

    Most of the cost of writing a large buffer into a new segment is the kernel allocating and
    zeroing its pages, not the copy. After each segment it writes, a process has a file of the
    same size (rounded up to a MiB) allocated in the background (``posix_fallocate``); the next
    segment of a size that fits (up to twice smaller) takes it over (waiting for it if it is
    still being allocated) and only copies. A spare is
    never one that was shared: every segment a receiver maps is written once. Named like the
    process's other segments (``<pid>-0-spare<n>``), so the supervisor's sweep removes it when
    the process dies; ``discard`` (at exit) removes it sooner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: concurrent.futures.Future[tuple[str, int]] | None = None
        self._next_size = 0

    def take(self, directory_: str, nbytes: int) -> str | None:
        """The path of a ready spare for ``nbytes`` in ``directory_`` (now the caller's), or None."""
        with self._lock:
            future = self._next
            if future is None or not (future.done() or nbytes <= self._next_size <= 2 * nbytes):
                return None
            self._next = None
        try:
            path, size = future.result()  # still allocating one that fits: cheaper to wait for it
        except OSError:
            return None
        if os.path.dirname(path) == directory_ and nbytes <= size <= 2 * nbytes:
            return path
        release([path])
        return None

    def prepare(self, directory_: str, nbytes: int) -> None:
        """Start allocating a spare for a segment of ``nbytes`` unless one is already there."""
        with self._lock:
            if self._next is not None:
                return
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoal-shm")
                atexit.register(self.discard)
            size = self._next_size = -(-nbytes // _SPARE_ROUND_BYTES) * _SPARE_ROUND_BYTES
            path = os.path.join(directory_, f"{os.getpid()}-0-{SPARE}{next(_counter)}")
            self._next = self._executor.submit(_allocate, path, size)

    def discard(self) -> None:
        """Remove the spare, if one was made."""
        with self._lock:
            future, self._next = self._next, None
        if future is not None:
            with contextlib.suppress(OSError, concurrent.futures.CancelledError):
                release([future.result()[0]])


_SPARE_ROUND_BYTES = 1024 * 1024
SPARE = "spare"  # in the name of a spare file (``<pid>-0-spare<n>``); a segment's has none


def _allocate(path: str, size: int) -> tuple[str, int]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        release([path])
        raise
    os.close(fd)
    return path, size


_spares = _Spares()


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
    if _directory is None or match is None or match.group(3):
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
    _mapped[mapping] = ref
    return memoryview(mapping)


# The segment each live mapping of this process shows (for ``place``'s ``reuse``).
_mapped: weakref.WeakKeyDictionary[mmap.mmap, SegmentRef] = weakref.WeakKeyDictionary()


def _segment_of(view: memoryview) -> SegmentRef | None:
    """The segment whose mapping ``view`` (a buffer of an array, a memoryview ...) is built on."""
    obj: Any = view.obj
    for _ in range(8):
        if isinstance(obj, mmap.mmap):
            return _mapped.get(obj)
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            return None
    return None


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
