"""T17 (plan section 4), scaled down: an open-loop burst well above capacity against 2 replicas
with a small ``max_queued_requests``. The runtime must stay responsive: every request gets an
answer (200 or 503), none hangs, and the proxy's memory comes back. Figures are printed
(``pytest -s``) and repeated in the assertion message.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import supervisor_of
from starlette.requests import Request

from shoal import serve

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
SERVICE_S = 0.05
REPLICAS, SLOTS, QUEUED = 2, 2, 16
CAPACITY_RPS = REPLICAS * SLOTS / SERVICE_S  # 80 requests a second
RATE_RPS = 5 * CAPACITY_RPS
BURST_S = 3.0


@serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=SLOTS, max_queued_requests=QUEUED)
class Work:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(SERVICE_S)  # the work: a fixed service time sets the capacity
        return "done"


async def _get(port: int, path: str) -> tuple[int, float]:
    """One request on its own connection: its status (0 if the connection failed) and latency."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
            await reader.read()
            writer.close()
            status = int(status_line.split()[1])
    except (OSError, TimeoutError, IndexError, ValueError):
        status = 0
    return status, time.monotonic() - started


async def _open_loop(port: int, path: str) -> list[tuple[int, float]]:
    """Arrivals at ``RATE_RPS`` for ``BURST_S``, each sent on schedule whatever came back."""
    loop = asyncio.get_running_loop()
    total = int(RATE_RPS * BURST_S)
    start = loop.time()
    tasks = []
    for i in range(total):
        delay = start + i / RATE_RPS - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival schedule, not a synchronization
        tasks.append(asyncio.create_task(_get(port, path)))
    return list(await asyncio.gather(*tasks))


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_t17_open_loop_overload(serve_instance: Any) -> None:
    serve.run(Work.bind(), name="overload", route_prefix="/work")
    try:
        url = serve.get_http_url()
        assert url is not None
        port = int(url.rsplit(":", 1)[1])
        supervisor = supervisor_of(psutil.Process())
        (proxy,) = [p for p in supervisor.children() if p.name() == "shoal-proxy"]
        before = proxy.memory_info().rss
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], proxy.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            results = asyncio.run(_open_loop(port, "/work"))
        finally:
            done.set()
            sampler.join(5)
        after = proxy.memory_info().rss
        baseline = asyncio.run(_get(port, "/work"))
    finally:
        serve.delete("overload")
    accepted = [t for s, t in results if s == 200]
    rejected = [t for s, t in results if s == 503]
    other = [s for s, _ in results if s not in (200, 503)]
    figures = (
        f"T17 {len(results)} requests at {RATE_RPS:.0f}/s for {BURST_S}s (capacity {CAPACITY_RPS:.0f}/s, "
        f"max_queued_requests={QUEUED}): accepted {len(accepted)} (p50 {_p(accepted, 0.5) * 1000:.0f} ms, "
        f"p99 {_p(accepted, 0.99) * 1000:.0f} ms), rejected 503 {len(rejected)} (p99 "
        f"{_p(rejected, 0.99) * 1000:.0f} ms), other {len(other)}; proxy RSS {before / MiB:.1f} -> peak "
        f"{peak[0] / MiB:.1f} -> after {after / MiB:.1f} MiB; afterwards one request: {baseline[0]} in "
        f"{baseline[1] * 1000:.0f} ms"
    )
    print(figures)
    assert not other, figures
    assert accepted and rejected, figures
    assert baseline[0] == 200, figures
    assert peak[0] - before < 100 * MiB, figures
