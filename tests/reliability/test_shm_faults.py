"""Shared-memory segments are removed in every fault path: the receiving replica crashes, the
sending driver is killed mid-call, the driver a result is for is killed before it arrives, and
the instance stops (in order, or because its driver was killed). Each prints how long the
removal took."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import processes_in_run_dir, wait_until

from shoal import serve
from shoal.runtime import shm
from shoal.serve.exceptions import RayServeException

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)

NBYTES = shm.THRESHOLD_BYTES + 1024 * 1024
DRIVER = str(Path(__file__).parent / "drivers" / "shm_driver.py")


@serve.deployment(max_ongoing_requests=20)
class Holder:
    def __init__(self, gate: Any) -> None:
        self.gate = gate

    async def hold(self, x: Any, key: str) -> float:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return float(x[0])

    async def produce(self, key: str, nbytes: int) -> Any:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return np.ones(nbytes // 8)

    async def crash(self, x: Any) -> None:
        os._exit(3)


@pytest.fixture(scope="module")
def holder(serve_instance: Any, gate: Any) -> Any:
    handle = serve.run(Holder.bind(gate), name="holder", route_prefix=None)
    yield handle
    serve.delete("holder")


def segments() -> list[str]:
    directory = shm.directory()
    assert directory is not None
    return [n for n in os.listdir(directory) if shm.SPARE not in n]


def removed_within(predicate: Any, what: str) -> None:
    started = time.monotonic()
    wait_until(predicate, 30, what)
    print(f"{what}: {(time.monotonic() - started) * 1000:.0f} ms")


def start_driver(serve_instance: Any, mode: str, key: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SHOAL_ADDRESS": str(serve_instance.run_dir)}
    driver = subprocess.Popen(
        [sys.executable, DRIVER, mode, key, str(NBYTES)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert driver.stdout is not None
    assert driver.stdout.readline().strip() == "sent"
    return driver


def stop(driver: subprocess.Popen[str]) -> None:
    driver.kill()
    driver.wait(timeout=30)
    for stream in (driver.stdin, driver.stdout):
        if stream is not None:
            stream.close()


def test_a_replica_that_crashes_holding_a_segment_leaves_none(holder: Any) -> None:
    with pytest.raises(RayServeException):
        holder.crash.remote(np.ones(NBYTES // 8)).result(timeout_s=60)
    removed_within(lambda: not segments(), "segment removed after the replica crashed")


def test_a_driver_killed_mid_call_leaves_no_segment(serve_instance: Any, holder: Any, gate: Any) -> None:
    driver = start_driver(serve_instance, "send", "killed-sender")
    try:
        gate.arrived.remote("killed-sender").result(timeout_s=60)  # the replica has mapped it
        assert [n for n in segments() if n.startswith(f"{driver.pid}-")]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        removed_within(lambda: not segments(), "sender's segment swept after it was killed")
    finally:
        stop(driver)
        gate.open.remote("killed-sender").result(timeout_s=30)


def test_a_result_for_a_killed_driver_leaves_no_segment(serve_instance: Any, holder: Any, gate: Any) -> None:
    driver = start_driver(serve_instance, "receive", "killed-receiver")
    try:
        gate.arrived.remote("killed-receiver").result(timeout_s=60)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop(driver)
    gate.open.remote("killed-receiver").result(timeout_s=30)  # now the replica sends the result
    removed_within(lambda: not segments(), "result's segment removed after its receiver was killed")


@pytest.mark.parametrize("how", ["shutdown", "driver killed"])
def test_an_instance_that_stops_leaves_no_segment_directory(private_run_dir: Path, how: str) -> None:
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    env.pop("SHOAL_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, DRIVER, "own", "-", str(NBYTES)], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )
    assert driver.stdout is not None and driver.stdin is not None
    try:
        directory = driver.stdout.readline().strip()
        assert directory.startswith("/") and os.path.isdir(directory)
        if how == "shutdown":
            driver.stdin.close()
        else:
            driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=60) in (0, -signal.SIGKILL)
        removed_within(lambda: not os.path.exists(directory), f"segment directory removed ({how})")
        wait_until(lambda: not processes_in_run_dir(private_run_dir), 30, "the instance exited")
    finally:
        stop(driver)
