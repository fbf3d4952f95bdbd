"""Process faults under load, scaled down from the plan (T01, T03, T06, T08): each test prints
its figures (run with ``-s``) and puts them in its assertion messages.

Load is closed-loop HTTP (httpx) from this process, bounded in count and time; faults are real
signals. The module shares one private instance; each test deploys its own application.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest
from harness import Outcome, StatusPoll, kinds, running_pids
from helpers import alive, wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(60)

_CLIENT_TIMEOUT_S = 8.0  # a request still unanswered then counts as hung


# -- load and observation -------------------------------------------------------------------------


@dataclass
class Load:
    """Closed-loop HTTP load: ``concurrency`` clients, each sending ``path`` again as soon as it
    has its answer, until ``duration_s`` passed, ``max_requests`` were sent or ``until()``."""

    url: str
    path: str
    concurrency: int
    duration_s: float
    max_requests: int = 5000
    until: Callable[[], bool] = lambda: False
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0

    async def run(self, faults: Sequence[tuple[float, Callable[[], None]]] = ()) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        for at_s, fault in faults:
            loop.call_later(at_s, fault)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=_CLIENT_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._client(client, start) for _ in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, start: float) -> None:
        while time.monotonic() - start < self.duration_s and len(self.outcomes) < self.max_requests and not self.until():
            began = time.monotonic()
            self.in_flight += 1
            try:
                response = await client.get(self.path)
                pid = response.json().get("pid") if response.status_code == 200 else None
                self.outcomes.append(Outcome(began, time.monotonic(), response.status_code, response.text[:200], pid))
            except httpx.TimeoutException:
                self.outcomes.append(Outcome(began, time.monotonic(), None, "timeout"))
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(began, time.monotonic(), None, type(exc).__name__))
            finally:
                self.in_flight -= 1

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]


class StatusWatch(StatusPoll):
    """Polls ``serve.status()`` in a thread and records when ``predicate(deployment)`` first held
    for each named condition (monotonic seconds)."""

    def __init__(self, app: str, deployment: str, conditions: dict[str, Callable[[Any], bool]]) -> None:
        super().__init__(app, deployment, self._record)
        self.conditions = dict(conditions)
        self.seen: dict[str, float] = {}

    def _record(self, dep: Any, now: float) -> None:
        if dep is None:
            return
        for name, predicate in self.conditions.items():
            if name not in self.seen and predicate(dep):
                self.seen[name] = now


def proxy_process(supervisor: psutil.Process) -> psutil.Process | None:
    for child in supervisor.children():
        try:
            if child.name() == "shoal-proxy" and alive(child.pid):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@serve.deployment(num_replicas=4, max_ongoing_requests=8)
class Sleeper:
    async def __call__(self, request: Any) -> dict[str, int]:
        await asyncio.sleep(0.05)
        return {"pid": os.getpid()}


# -- T01 ----------------------------------------------------------------------------------------


def test_t01_replica_sigkill_under_load(http_app: Any, url: str) -> None:
    """T01: 3 s of load at concurrency 16 over 4 replicas; SIGKILL one at 1.5 s."""
    http_app(Sleeper.bind(), "t01")
    before = running_pids("t01", "Sleeper")
    assert len(before) == 4
    victim = sorted(before)[1]
    killed_at: list[float] = []
    in_flight_at_kill: list[int] = []
    load = Load(url, "/t01", concurrency=16, duration_s=3.0)

    def kill() -> None:
        in_flight_at_kill.append(load.in_flight)
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)

    conditions = {
        "detected": lambda d: victim not in {r.pid for r in d.replicas},
        "replaced": lambda d: victim not in {r.pid for r in d.replicas} and d.replica_states == {"RUNNING": 4},
    }
    with StatusWatch("t01", "Sleeper", conditions) as watch:
        asyncio.run(load.run([(1.5, kill)]))
        wait_until(lambda: len(watch.seen) == 2, 20, "the killed replica is replaced")
    after = running_pids("t01", "Sleeper")
    failed = load.failed()
    served_by_victim_after = [o for o in load.outcomes if o.pid == victim and o.started > watch.seen["detected"]]
    figures = (
        f"T01: {len(load.outcomes)} requests, {len(failed)} failed "
        f"(in flight at the kill: {in_flight_at_kill[0]} in all, max_ongoing_requests 8 on the victim); "
        f"detection {1000 * (watch.seen['detected'] - killed_at[0]):.0f} ms (status poll, 20 ms period); "
        f"replacement RUNNING after {1000 * (watch.seen['replaced'] - killed_at[0]):.0f} ms; "
        f"hung {sum(o.hung for o in failed)}; failures {kinds(failed)}; "
        f"other replicas' pids unchanged: {before - {victim} <= after}"
    )
    print(figures)
    assert len(failed) <= 8, figures
    assert not [o for o in failed if o.hung], figures
    assert before - {victim} <= after and victim not in after, figures
    assert not served_by_victim_after, figures


# -- T08 ----------------------------------------------------------------------------------------


@serve.deployment(num_replicas=2)
class Pid:
    async def __call__(self, request: Any) -> dict[str, int]:
        return {"pid": os.getpid()}


def test_t08_proxy_sigkill_under_load(http_app: Any, url: str, serve_instance: Any) -> None:
    """T08: SIGKILL the proxy under light load (concurrency 4): HTTP serves again within a
    bound, connections made meanwhile end (refused, reset or 503) rather than hang, no replica
    restarts, and every request after the recovery succeeds."""
    http_app(Pid.bind(), "t08")
    replicas_before = running_pids("t08", "Pid")
    proxy = proxy_process(serve_instance.supervisor)
    assert proxy is not None
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        proxy.kill()

    bound_s = 15.0

    def served_again_a_while_ago() -> bool:
        return bool(killed_at) and any(
            o.status == 200 and o.started > killed_at[0] and time.monotonic() > o.ended + 1.0 for o in load.outcomes
        )

    load = Load(url, "/t08", concurrency=4, duration_s=1.0 + bound_s, until=served_again_a_while_ago)
    asyncio.run(load.run([(1.0, kill)]))
    after_kill = [o for o in load.outcomes if o.ended > killed_at[0]]
    served = [o for o in after_kill if o.status == 200 and o.started > killed_at[0]]
    failed = [o for o in after_kill if o.status != 200]
    window = f"{1000 * (served[0].ended - killed_at[0]):.0f} ms" if served else f"never within {bound_s:.0f} s"
    figures = (
        f"T08: unavailability window {window}; after the kill {len(after_kill)} requests, "
        f"{len(failed)} failed ({kinds(failed)}), "
        f"{sum(o.hung for o in failed)} hung (no answer in {_CLIENT_TIMEOUT_S:.0f} s)"
    )
    print(figures)
    assert served, figures
    assert not [o for o in failed if o.hung], figures
    with httpx.Client(base_url=url, timeout=_CLIENT_TIMEOUT_S) as client:
        statuses = [client.get("/t08").status_code for _ in range(20)]
    replicas_after = running_pids("t08", "Pid")
    print(f"T08: after recovery {statuses.count(200)}/20 succeeded; replica pids unchanged: {replicas_after == replicas_before}")
    assert statuses == [200] * 20, figures
    assert replicas_after == replicas_before, figures
    wait_until(lambda: serve.status().proxies == {"local": "HEALTHY"}, 10, "the proxy reports HEALTHY")



# -- T03 ----------------------------------------------------------------------------------------


@serve.deployment(num_replicas=3, max_ongoing_requests=4, health_check_period_s=0.5, health_check_timeout_s=0.5)
class Freezable:
    async def __call__(self, request: Any) -> dict[str, int]:
        await asyncio.sleep(0.05)
        return {"pid": os.getpid()}


def test_t03_frozen_replica_is_killed_when_declared_unhealthy(http_app: Any, url: str) -> None:
    """T03: SIGSTOP one of 3 replicas under load (concurrency 6, health checks every 0.5 s): it
    is declared unhealthy within 3 x (period + timeout) + 1 s, killed at once, so the requests
    it holds fail then rather than after a graceful stop; it is replaced."""
    http_app(Freezable.bind(), "t03")
    before = running_pids("t03", "Freezable")
    victim = sorted(before)[0]
    stopped_at: list[float] = []

    def freeze() -> None:
        stopped_at.append(time.monotonic())
        os.kill(victim, signal.SIGSTOP)

    conditions = {
        "unhealthy": lambda d: victim not in {r.pid for r in d.replicas if r.state == "RUNNING"},
        "replaced": lambda d: victim not in {r.pid for r in d.replicas} and d.replica_states == {"RUNNING": 3},
    }
    load = Load(url, "/t03", concurrency=6, duration_s=4.5)
    try:
        with StatusWatch("t03", "Freezable", conditions) as watch:
            asyncio.run(load.run([(0.5, freeze)]))
            wait_until(lambda: len(watch.seen) == 2, 20, "the frozen replica is replaced")
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGKILL)
    unhealthy_s = watch.seen["unhealthy"] - stopped_at[0]
    stuck = [o for o in load.outcomes if o.ended - o.started > 0.5]  # the others took about 50 ms
    failed = load.failed()
    max_stuck_s = max((o.ended - o.started for o in stuck), default=0.0)
    figures = (
        f"T03: {len(load.outcomes)} requests, {len(failed)} failed "
        f"({kinds(failed)}); time to unhealthy {unhealthy_s:.2f} s; "
        f"replacement RUNNING after {watch.seen['replaced'] - stopped_at[0]:.2f} s; "
        f"{len(stuck)} requests stuck on the frozen replica, max latency {max_stuck_s:.2f} s; "
        f"hung {sum(o.hung for o in failed)}"
    )
    print(figures)
    assert unhealthy_s < 3 * (0.5 + 0.5) + 1.0 + 2.0, figures  # 2 s of slack for a busy machine
    assert not [o for o in failed if o.hung], figures
    assert max_stuck_s < unhealthy_s + 1.5, figures  # they ended when it was declared unhealthy
    assert before - {victim} <= running_pids("t03", "Freezable"), figures


# -- T06 ----------------------------------------------------------------------------------------


@serve.deployment(num_replicas=2)
class Crashy:
    """Exits (code 3) half a second after it is built once ``flag`` exists; logs each start."""

    def __init__(self, flag: str, starts: str) -> None:
        with open(starts, "a") as f:
            f.write(f"{time.monotonic()}\n")
        if os.path.exists(flag):
            threading.Timer(0.5, os._exit, (3,)).start()

    async def __call__(self, request: Any) -> dict[str, int]:
        return {"pid": os.getpid()}


def test_t06_crash_loop_is_reported_and_fails_requests_quickly(http_app: Any, url: str, tmp_path: Any) -> None:
    """T06: replicas that exit soon after READY: the deployment turns UNHEALTHY with the exit
    reason, requests to it end with 503 within a bound (none hangs), restarts back off, and a
    healthy deployment beside it sees no error."""
    flag, starts = tmp_path / "crash", tmp_path / "starts"
    http_app(Crashy.bind(str(flag), str(starts)), "t06")
    http_app(Pid.bind(), "t06ok")
    flag.touch()
    conditions = {
        "unhealthy": lambda d: d.status == "UNHEALTHY",
        "crash loop": lambda d: "exit code 3" in d.message and "in a row" in d.message,
    }
    triggered = time.monotonic()
    for pid in running_pids("t06", "Crashy"):
        os.kill(pid, signal.SIGKILL)  # their replacements see the flag and crash-loop
    with StatusWatch("t06", "Crashy", conditions) as watch:

        def reported_a_while_ago() -> bool:  # then the load has seen what follows the report
            return "crash loop" in watch.seen and time.monotonic() > watch.seen["crash loop"] + 1.5

        crashing = Load(url, "/t06", concurrency=2, duration_s=20.0, until=reported_a_while_ago)
        healthy = Load(url, "/t06ok", concurrency=2, duration_s=20.0, until=reported_a_while_ago)

        async def both() -> None:
            await asyncio.gather(crashing.run(), healthy.run())

        asyncio.run(both())
        assert len(watch.seen) == 2, f"the crash loop was not reported within 20 s: {watch.seen}"
    dep = serve.status().applications["t06"].deployments["Crashy"]
    looped_at = watch.seen["crash loop"]
    late = [o for o in crashing.outcomes if o.started > looped_at + 0.5]
    late_503 = [o for o in late if o.status == 503]
    start_times = sorted(float(line) for line in starts.read_text().split())
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(start_times)]
    figures = (
        f"T06: status UNHEALTHY {watch.seen['unhealthy'] - triggered:.2f} s after the trigger, crash loop "
        f"reported after {looped_at - triggered:.2f} s; restarts {dep.restarts}; starts at intervals {gaps} s; "
        f"crashing app: {len(crashing.outcomes)} requests, statuses "
        f"{kinds(crashing.outcomes)}, "
        f"max latency {max(o.ended - o.started for o in crashing.outcomes):.2f} s, "
        f"{len(late_503)}/{len(late)} answered 503 once the loop was reported "
        f"(max {max((o.ended - o.started for o in late_503), default=0.0) * 1000:.0f} ms); "
        f"healthy app: {len(healthy.outcomes)} requests, {len(healthy.failed())} errors; message: {dep.message!r}"
    )
    print(figures)
    assert dep.status == "UNHEALTHY" and "exit code 3" in dep.message, figures
    assert not [o for o in crashing.outcomes if o.hung], figures
    assert late_503, figures
    assert not healthy.failed(), figures


# -- T04 ----------------------------------------------------------------------------------------


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=1.0)
class Flaky:
    """``check_health`` fails every other call while flaky, every call once broken."""

    def __init__(self) -> None:
        self.checks = 0
        self.broken = False

    def check_health(self) -> None:
        self.checks += 1
        if self.broken or self.checks % 2 == 0:
            raise RuntimeError(f"check {self.checks} fails")

    def count(self) -> int:
        return self.checks

    def pid(self) -> int:
        return os.getpid()

    def break_health(self) -> None:
        self.broken = True


def test_t04_flaky_check_is_tolerated_a_failing_one_is_not(serve_instance: Any, deploy: Any) -> None:
    """T04: a check failing every other call for 20 periods never gets the replica replaced;
    one that keeps failing gets it replaced after three failures in a row."""
    handle = deploy(Flaky.bind(), "t04")
    pid = handle.pid.remote().result(timeout_s=10)
    wait_until(lambda: handle.count.remote().result(timeout_s=10) >= 20, 15, "20 health checks ran")
    dep = serve.status().applications["t04"].deployments["Flaky"]
    flaky_figures = f"T04: after 20 flaky checks: restarts {dep.restarts}, same pid {handle.pid.remote().result(timeout_s=10) == pid}"
    print(flaky_figures)
    assert dep.restarts == 0 and running_pids("t04", "Flaky") == {pid}, flaky_figures
    broken_at = time.monotonic()
    handle.break_health.remote().result(timeout_s=10)
    wait_until(lambda: (pids := running_pids("t04", "Flaky")) and pid not in pids, 15, "the replica is replaced")
    dep = serve.status().applications["t04"].deployments["Flaky"]
    figures = f"T04: a check failing every time: replaced after {time.monotonic() - broken_at:.2f} s; last error {dep.last_error!r}"
    print(figures)
    assert dep.restarts == 1 and "check_health raised" in dep.last_error, figures


# -- T12 ----------------------------------------------------------------------------------------


@serve.deployment(num_replicas=4, max_ongoing_requests=2)
class Parked:
    def __init__(self, gate: Any) -> None:
        self.gate = gate

    async def __call__(self, key: str) -> int:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return os.getpid()


def test_t12_scale_down_with_parked_requests_loses_none(serve_instance: Any, deploy: Any, gate: Any) -> None:
    """T12: 8 requests parked on 4 replicas (2 each); scale to 1; release: all 8 complete, the
    3 removed replicas stop once they finished theirs."""
    handle = deploy(Parked.bind(gate), "t12")
    key = uuid.uuid4().hex
    calls = [handle.remote(key) for _ in range(8)]
    gate.arrived.remote(key, 8).result(timeout_s=15)
    before = running_pids("t12", "Parked")
    deploy(Parked.options(num_replicas=1).bind(gate), "t12")
    released_at = time.monotonic()
    gate.open.remote(key).result(timeout_s=10)
    results: list[Any] = []
    for call in calls:
        try:
            results.append(call.result(timeout_s=15))
        except Exception as exc:
            results.append(exc)
    failed = [r for r in results if isinstance(r, Exception)]

    def settled() -> bool:
        dep = serve.status().applications["t12"].deployments["Parked"]
        return dep.replica_states == {"RUNNING": 1}

    wait_until(settled, 20, "the removed replicas stop")
    figures = (
        f"T12: {len(failed)} of 8 parked requests failed ({failed}); served by {len(set(results) - set(failed))} "
        f"replicas; the 3 removed replicas were gone {time.monotonic() - released_at:.2f} s after the release"
    )
    print(figures)
    assert not failed and set(results) == before, figures
    assert running_pids("t12", "Parked") < before, figures
