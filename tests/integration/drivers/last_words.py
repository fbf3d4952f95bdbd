"""A driver for the ordering tests, run as ``python last_words.py ROUNDS``.

Each round starts a ``WorkerProcess`` whose worker writes last words (100 bytes, or 1 MB: more
than a pipe holds) and exits 1 at once, and prints one JSON line: the events the supervisor side
saw, in order. A separate program, so the multiprocessing helper process it starts ends with it.
"""

import asyncio
import json
import os
import sys

from shoal.controller.process import WorkerProcess
from shoal.runtime.worker_main import PassFd


def last_words_then_exit(spec: bytes, output: PassFd, lifeline: PassFd, last_words: PassFd) -> None:
    fd, view = last_words.detach(), memoryview(b"w" * int(spec))
    while view:
        view = view[os.write(fd, view):]
    os._exit(1)


async def one_round(size: int) -> list[list[object]]:
    events: list[list[object]] = []
    exited = asyncio.Event()

    def on_exit(code: int) -> None:
        events.append(["exit", code])
        exited.set()

    process = WorkerProcess(
        str(size).encode(), on_output=lambda line: None, on_exit=on_exit,
        on_last_words=lambda data: events.append(["last words", len(data)]),
        target=last_words_then_exit,
    )
    process.start()
    async with asyncio.timeout(60):
        await exited.wait()
    return events


async def main(rounds: int) -> None:
    for index in range(rounds):
        size = 1_000_000 if index % 2 else 100
        print(json.dumps({"size": size, "events": await one_round(size)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
