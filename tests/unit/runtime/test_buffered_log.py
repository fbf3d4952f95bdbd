"""LoopBufferedHandler: records logged on the loop's thread are written together at the end of
the loop iteration, in order; others at once; flush and close write what waits."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.rotation import RotationLimits


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 0, message, None, None)


def test_lines_logged_on_the_loop_are_written_once_the_iteration_ends(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    handler = LoopBufferedHandler(path, RotationLimits())

    async def main() -> list[str]:
        handler.bind(asyncio.get_running_loop())
        for number in range(3):
            handler.handle(_record(f"line-{number}"))
        during = path.read_text()
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)  # after the flush callback
        await done
        return [during, path.read_text()]

    during, after = asyncio.run(main())
    assert during == ""
    assert after == "line-0\nline-1\nline-2\n"
    handler.close()


def test_other_threads_write_at_once_after_what_waits(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    handler = LoopBufferedHandler(path, RotationLimits())

    async def main() -> str:
        handler.bind(asyncio.get_running_loop())
        handler.handle(_record("from-loop"))
        thread = threading.Thread(target=handler.handle, args=(_record("from-thread"),))
        thread.start()
        thread.join()
        return path.read_text()

    assert asyncio.run(main()) == "from-loop\nfrom-thread\n"
    handler.close()


def test_a_full_buffer_is_written_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    handler = LoopBufferedHandler(path, RotationLimits(), max_buffered=2)
    loop = asyncio.new_event_loop()
    try:
        handler.bind(loop)
        for number in range(3):
            handler.handle(_record(f"line-{number}"))
        assert path.read_text() == "line-0\nline-1\n"
        handler.close()  # before the loop ran its callback
        assert path.read_text() == "line-0\nline-1\nline-2\n"
    finally:
        loop.close()


def test_a_shared_file_is_checked_for_other_writers_every_recheck_s(tmp_path: Path) -> None:
    """A replica's run-directory file: the supervisor appends to it too; the batches go to the
    path's current file once the writer has looked again."""
    path = tmp_path / "replica.log"
    handler = LoopBufferedHandler(path, RotationLimits(), shared=True, recheck_s=3600.0)
    handler.handle(_record("one"))
    path.rename(tmp_path / "replica.log.1")  # another writer rotated it
    handler.handle(_record("two"))  # not looked yet: still the rotated file
    assert (tmp_path / "replica.log.1").read_text() == "one\ntwo\n" and not path.exists()
    handler.close()
