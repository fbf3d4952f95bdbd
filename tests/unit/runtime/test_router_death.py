"""A router learns that a replica died from its connection, not from a timer (issue 7, 2b).

The replica is a small process serving a ROUTER socket on ``ipc://``; no supervisor and no
snapshot change tell the router anything. The machine is kept busy by busy-loop processes, which
is when timers and orderings that only usually hold go wrong.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.runtime import transport, wire
from shoal.runtime.errors import ReplicaDiedError
from shoal.runtime.reply import ReplySink
from shoal.runtime.router import Call, Router

pytestmark = pytest.mark.timeout(90)

# Serves one request: says "got" when it arrives, then (argv[2] == "reply") answers it and exits
# the way a replica stops gracefully (close with linger, exit), or ("hold") waits to be killed.
FAKE_REPLICA = r"""
import os, sys, zmq
from shoal.runtime import wire
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print("ready", flush=True)
identity, frame = sock.recv_multipart()
msg = wire.decode([frame])
print("got", flush=True)
if sys.argv[2] == "reply":
    sock.send_multipart([identity, *wire.encode(wire.reply(wire.Kind.RESULT, msg.incarnation, msg.call_id, *wire.dumps("done")))])
    sock.close(linger=2000)
    ctx.term()
    os._exit(0)
sys.stdin.read()
"""

_REPETITIONS = 8


@pytest.fixture
def busy_cpus() -> Iterator[None]:
    """Keep every CPU busy for the duration of the test."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 2) + 1)
    ]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
        for proc in spinners:
            proc.wait(10)


def _entry(endpoint: str) -> wire.DeploymentEntry:
    return wire.DeploymentEntry(replicas=(wire.ReplicaAddress("app#D#r1", 1, endpoint),), max_ongoing_requests=5)


async def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return (await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)).strip()


async def _one_call(tmp_path: Path, mode: str, index: int) -> tuple[subprocess.Popen[str], Call, ReplySink, Router]:
    endpoint = f"ipc://{tmp_path}/r{index}.sock"
    proc = subprocess.Popen([sys.executable, "-c", FAKE_REPLICA, endpoint, mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    async with asyncio.timeout(30):
        assert await _line(proc) == "ready"
    router = Router("app", "D", asyncio.get_running_loop())
    router.update(_entry(endpoint))
    sink = ReplySink()
    call = Call(wire.RequestHeader("__call__", f"req-{index}"), wire.dumps_args((), {})[1], sink)
    router.submit(call)
    async with asyncio.timeout(30):
        assert await _line(proc) == "got"
    return proc, call, sink, router


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def test_a_killed_replica_fails_its_call_without_any_snapshot(tmp_path: Path, busy_cpus: None) -> None:
    async def main() -> None:
        for index in range(_REPETITIONS):
            proc, _call, sink, router = await _one_call(tmp_path, "hold", index)
            try:
                os.kill(proc.pid, signal.SIGKILL)
                # Nothing else happens: no snapshot drops the replica. The connection tells.
                async with asyncio.timeout(10):
                    with pytest.raises(ReplicaDiedError, match="died while handling request"):
                        await sink.result()
            finally:
                router.close()
                _reap(proc)

    try:
        asyncio.run(main())
    finally:
        transport.terminate_context()


def test_a_reply_sent_before_the_replica_exits_is_never_lost(tmp_path: Path, busy_cpus: None) -> None:
    async def main() -> None:
        for index in range(_REPETITIONS):
            proc, _call, sink, router = await _one_call(tmp_path, "reply", index)
            try:
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(30):
                    assert await loop.run_in_executor(None, proc.wait) == 0
                # The controller's snapshot without the replica may arrive before the reply is
                # read; the reply still wins.
                router.update(wire.DeploymentEntry())
                async with asyncio.timeout(10):
                    assert await sink.result() == "done"
            finally:
                router.close()
                _reap(proc)

    try:
        asyncio.run(main())
    finally:
        transport.terminate_context()
