"""The controller: in-place updates, rolling updates, failed updates, health checks, crash
restarts, graceful deletion, autoscaling (up, down, from zero) and what ``serve.status()`` shows.

Real supervisor and replica processes: one instance for the module (``serve_instance``). Each
test deploys its own app and waits on results, gates and (for OS or status state) ``wait_until``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import alive, app_status, replica_pids, wait_until

from shoal import serve
from shoal.serve.exceptions import RayServeException, ReplicaDiedError
from shoal.serve.handle import DeploymentHandle
from shoal.serve.schema import DeploymentStatusOverview

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------------


def _deployment(app: str, name: str) -> DeploymentStatusOverview:
    status = app_status(app)
    assert status is not None, f"application {app!r} does not exist"
    return status.deployments[name]


def _running_pids(dep: DeploymentStatusOverview) -> set[int]:
    return {r.pid for r in dep.replicas if r.state == "RUNNING" and r.pid is not None}


def _is_replica_process(pid: int) -> bool:
    try:
        return psutil.Process(pid).name() == "shoal-replica"
    except psutil.NoSuchProcess:
        return False


def _answers_from_each(call: Callable[[], dict[str, Any]], pids: set[int], max_calls: int = 300) -> dict[int, dict[str, Any]]:
    """Call until every replica in ``pids`` answered once (routing is random); the last answer of each."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(max_calls):
        answer = call()
        seen[answer["pid"]] = answer
        if set(seen) >= pids:
            return seen
    raise AssertionError(f"replicas {pids - set(seen)} never answered in {max_calls} calls (saw {set(seen)})")


# -- deployments --------------------------------------------------------------------------------


@serve.deployment(user_config={"v": 1})
class Configurable:
    """Reports its pid, its user_config value and how many times ``reconfigure`` applied one."""

    def __init__(self) -> None:
        self.value: Any = None
        self.reconfigures = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        if config.get("fail"):
            raise ValueError(f"reconfigure refused: {config['fail']}")
        self.value = config["v"]
        self.reconfigures += 1

    def __call__(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "v": self.value, "reconfigures": self.reconfigures}


@serve.deployment(name="Versioned", num_replicas=2, graceful_shutdown_timeout_s=5)
class VersionA:
    async def __call__(self) -> dict[str, Any]:
        await asyncio.sleep(0.005)  # the work: keeps the steady load from spinning the CPU
        return {"version": "A", "pid": os.getpid()}


@serve.deployment(name="Versioned", num_replicas=2, graceful_shutdown_timeout_s=5)
class VersionB:
    async def __call__(self) -> dict[str, Any]:
        await asyncio.sleep(0.005)  # the work
        return {"version": "B", "pid": os.getpid()}


BROKEN_MESSAGE = "the new version's constructor is broken"


@serve.deployment(name="Versioned", num_replicas=1, max_constructor_retry_count=1)
class BrokenVersion:
    def __init__(self) -> None:
        raise RuntimeError(BROKEN_MESSAGE)

    def __call__(self) -> dict[str, Any]:
        return {"version": "broken", "pid": os.getpid()}


@serve.deployment(health_check_period_s=0.2, health_check_timeout_s=0.5, graceful_shutdown_timeout_s=10)
class Patient:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate
        self.failing = ""

    def pid(self) -> int:
        return os.getpid()

    def fail_health(self, token: str) -> None:
        self.failing = token

    def check_health(self) -> None:
        if self.failing:
            raise RuntimeError(f"health check failing on demand: {self.failing}")

    async def block_loop(self, key: str) -> int:
        await self.gate.arrive.remote(key)
        time.sleep(5)  # blocks the event loop: the condition the health check must detect
        return os.getpid()


@serve.deployment
class CrashAfterReady:
    """Appends its start time to ``<log>.starts``, then exits half a second after it is ready,
    appending the time of the exit to ``<log>.exits`` first. Times are ``time.monotonic()``,
    one clock for every process of the machine."""

    async def __init__(self, log: str) -> None:
        _append_time(f"{log}.starts")
        asyncio.get_running_loop().call_later(0.5, self._crash, log)

    @staticmethod
    def _crash(log: str) -> None:
        _append_time(f"{log}.exits")
        os._exit(3)  # the crash under test

    def __call__(self) -> int:
        return os.getpid()


def _append_time(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{time.monotonic()}\n")


@serve.deployment(graceful_shutdown_timeout_s=20)
class Parked:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate

    async def park(self, key: str) -> str:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return f"finished {key}"


@serve.deployment(
    max_ongoing_requests=10,
    graceful_shutdown_timeout_s=5,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 1,
        "look_back_period_s": 1,
    },
)
class Scaled:
    def __init__(self, gate: DeploymentHandle) -> None:
        self.gate = gate

    async def hold(self, key: str) -> int:
        await self.gate.arrive.remote(key)
        await self.gate.wait.remote(key)
        return os.getpid()


@serve.deployment(
    autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1},
)
class Lazy:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment(num_replicas=2)
class Pids:
    def __call__(self) -> dict[str, Any]:
        return {"pid": os.getpid()}


# -- in-place updates ---------------------------------------------------------------------------


def test_in_place_updates_keep_the_replicas(deploy: Any, app_name: str) -> None:
    handle = deploy(Configurable.bind(), app_name)
    first = handle.remote().result(timeout_s=10)
    assert first["v"] == 1 and first["reconfigures"] == 1
    pid = first["pid"]
    assert _running_pids(_deployment(app_name, "Configurable")) == {pid}

    # Only user_config changes: reconfigure runs in the same process.
    deploy(Configurable.options(user_config={"v": 2}).bind(), app_name)
    assert handle.remote().result(timeout_s=10) == {"pid": pid, "v": 2, "reconfigures": 2}
    assert _running_pids(_deployment(app_name, "Configurable")) == {pid}

    # Only num_replicas changes (1 -> 2): the replica that runs stays; the new one gets the config.
    deploy(Configurable.options(user_config={"v": 2}, num_replicas=2).bind(), app_name)
    pids = _running_pids(_deployment(app_name, "Configurable"))
    assert pid in pids and len(pids) == 2
    answers = _answers_from_each(lambda: handle.remote().result(timeout_s=10), pids)
    assert {p: a["v"] for p, a in answers.items()} == {p: 2 for p in pids}
    assert answers[pid]["reconfigures"] == 2

    # Only max_ongoing_requests changes: no restart.
    deploy(Configurable.options(user_config={"v": 2}, num_replicas=2, max_ongoing_requests=7).bind(), app_name)
    assert _running_pids(_deployment(app_name, "Configurable")) == pids

    # A user_config change reaches every replica, still in place.
    deploy(Configurable.options(user_config={"v": 3}, num_replicas=2, max_ongoing_requests=7).bind(), app_name)
    dep = _deployment(app_name, "Configurable")
    assert _running_pids(dep) == pids
    assert dep.status == "HEALTHY" and dep.restarts == 0
    answers = _answers_from_each(lambda: handle.remote().result(timeout_s=10), pids)
    assert {p: a["v"] for p, a in answers.items()} == {p: 3 for p in pids}
    assert all(alive(p) for p in pids)


def test_new_max_ongoing_requests_takes_effect_in_place(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Parked.options(max_ongoing_requests=1).bind(gate), app_name)
    (pid,) = _running_pids(_deployment(app_name, "Parked"))
    deploy(Parked.options(max_ongoing_requests=3).bind(gate), app_name)
    assert _running_pids(_deployment(app_name, "Parked")) == {pid}
    key = uuid.uuid4().hex
    parked = [handle.park.remote(key) for _ in range(3)]
    try:
        # Three requests run at once on the one replica: the limit of 1 is gone.
        gate.arrived.remote(key, 3).result(timeout_s=10)
    finally:
        gate.open.remote(key).result(timeout_s=10)
    assert [r.result(timeout_s=10) for r in parked] == [f"finished {key}"] * 3


def test_reconfigure_that_raises_keeps_the_old_config(deploy: Any, app_name: str) -> None:
    handle = deploy(Configurable.bind(), app_name)
    pid = handle.remote().result(timeout_s=10)["pid"]
    token = uuid.uuid4().hex
    with pytest.raises(RuntimeError) as info:
        deploy(Configurable.options(user_config={"v": 2, "fail": token}).bind(), app_name)
    assert token in str(info.value)
    dep = _deployment(app_name, "Configurable")
    assert dep.status == "DEPLOY_FAILED"
    assert token in dep.message and token in dep.last_error
    assert app_status(app_name).status == "DEPLOY_FAILED"
    # The replica still runs, with the config it had.
    answer = handle.remote().result(timeout_s=10)
    assert answer["pid"] == pid and answer["v"] == 1
    assert _running_pids(dep) == {pid}

    # A good config afterwards is applied in place and the app recovers.
    deploy(Configurable.options(user_config={"v": 3}).bind(), app_name)
    answer = handle.remote().result(timeout_s=10)
    assert answer["pid"] == pid and answer["v"] == 3
    assert app_status(app_name).status == "RUNNING"


# -- code updates -------------------------------------------------------------------------------


class _SteadyLoad:
    """Threads calling the handle back to back until stopped; every outcome is recorded."""

    def __init__(self, handle: DeploymentHandle, threads: int = 2) -> None:
        self.handle = handle
        self.stop = threading.Event()
        self.results: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._first_b = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.handle.remote().result(timeout_s=10)
            except Exception as exc:  # every failure is a finding; the assertion shows them
                with self._lock:
                    self.errors.append(exc)
                continue
            with self._lock:
                self.results.append(answer)
                if answer["version"] == "B":
                    self._first_b.set()

    def __enter__(self) -> _SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=20)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not stop"

    def calls(self) -> int:
        with self._lock:
            return len(self.results) + len(self.errors)


def test_code_change_rolls_out_without_failed_requests(deploy: Any, app_name: str) -> None:
    handle = deploy(VersionA.bind(), app_name)
    old_pids = _running_pids(_deployment(app_name, "Versioned"))
    assert len(old_pids) == 2
    with _SteadyLoad(handle) as load:
        wait_until(lambda: load.calls() >= 20, 10, "the load is running against version A")
        before_update = load.calls()
        deploy(VersionB.bind(), app_name)
        during_update = load.calls() - before_update
        # Keep the load on a little after the update, through the new replicas.
        mark = load.calls()
        wait_until(lambda: load.calls() >= mark + 20, 10, "the load keeps running after the update")
    assert not load.errors, f"{len(load.errors)} of {load.calls()} calls failed during the update: {load.errors[:3]!r}"
    assert during_update > 0, "no call overlapped the update"
    assert {r["version"] for r in load.results} == {"A", "B"}

    dep = _deployment(app_name, "Versioned")
    new_pids = _running_pids(dep)
    assert len(new_pids) == 2 and not new_pids & old_pids
    assert dep.status == "HEALTHY"
    assert dep.restarts == 0 and dep.last_error == ""  # replicas stopped by an update are no restarts
    # Only the new version answers now.
    answers = [handle.remote().result(timeout_s=10) for _ in range(20)]
    assert {a["version"] for a in answers} == {"B"}
    assert {a["pid"] for a in answers} <= new_pids
    wait_until(lambda: not any(alive(p) for p in old_pids), 20, "the old replicas exit")


def test_failing_new_version_leaves_the_old_one_serving(deploy: Any, app_name: str) -> None:
    handle = deploy(VersionA.options(num_replicas=1).bind(), app_name)
    old = handle.remote().result(timeout_s=10)
    with pytest.raises(RuntimeError) as info:
        deploy(BrokenVersion.bind(), app_name)
    assert BROKEN_MESSAGE in str(info.value)
    app = app_status(app_name)
    assert app.status == "DEPLOY_FAILED"
    dep = app.deployments["Versioned"]
    assert dep.status == "DEPLOY_FAILED"
    assert BROKEN_MESSAGE in dep.message
    assert BROKEN_MESSAGE in dep.last_error
    # The old replica keeps serving the old code.
    answers = [handle.remote().result(timeout_s=10) for _ in range(5)]
    assert answers == [old] * 5
    assert _running_pids(dep) == {old["pid"]}


# -- health -------------------------------------------------------------------------------------


def test_failing_health_check_replaces_the_replica(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Patient.bind(gate), app_name)
    old = handle.pid.remote().result(timeout_s=10)
    token = uuid.uuid4().hex
    handle.fail_health.remote(token).result(timeout_s=10)
    messages: set[str] = set()

    def replaced() -> DeploymentStatusOverview | None:
        dep = _deployment(app_name, "Patient")
        messages.add(dep.message)
        pids = _running_pids(dep)
        done = dep.restarts >= 1 and dep.status == "HEALTHY" and len(pids) == 1 and old not in pids
        return dep if done else None

    dep = wait_until(replaced, 20, "a new replica replaces the unhealthy one")
    assert token in dep.last_error, dep.last_error
    # While it was being replaced the status said why (UNHEALTHY lasts a replica's start-up).
    assert any(token in m for m in messages), messages
    assert "check_health" in dep.last_error
    assert str(old) in dep.last_error
    new = handle.pid.remote().result(timeout_s=10)
    assert new != old and _running_pids(dep) == {new}
    wait_until(lambda: not alive(old), 20, "the unhealthy replica exits")


def test_blocked_event_loop_is_detected(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Patient.bind(gate), app_name)
    old = handle.pid.remote().result(timeout_s=10)
    key = uuid.uuid4().hex
    blocked = handle.block_loop.remote(key)
    gate.arrived.remote(key).result(timeout_s=10)  # the replica's loop is blocked from now on
    # Three health checks of 0.2 s + 0.5 s time out well within the 5 s the loop is blocked.
    dep = wait_until(lambda: (d := _deployment(app_name, "Patient")).restarts >= 1 and d, 10,
                     "the blocked replica is found unhealthy")
    declared = time.monotonic()
    assert "did not answer" in dep.last_error, dep.last_error
    assert str(old) in dep.last_error
    # A replica declared unhealthy is killed at once: the request it held fails now, instead of
    # waiting for a graceful stop the blocked replica could not do.
    with pytest.raises(ReplicaDiedError):
        blocked.result(timeout_s=30)
    assert time.monotonic() - declared < 5.0

    def replaced() -> bool:
        dep = _deployment(app_name, "Patient")
        pids = _running_pids(dep)
        return dep.status == "HEALTHY" and len(pids) == 1 and old not in pids

    wait_until(replaced, 20, "a new replica replaces the blocked one")
    assert handle.pid.remote().result(timeout_s=10) != old


# -- crash restarts -----------------------------------------------------------------------------


def test_crash_restarts_back_off(deploy: Any, app_name: str, tmp_path: Path) -> None:
    """A replica that crashes soon after every start is restarted, each time no sooner than its
    backoff (0.1 s doubling) after the crash. Only lower bounds are checked: a start-up may take
    any time on a busy machine, but the controller never starts a replacement early. The
    schedule itself is checked with a fake clock in tests/unit/controller/test_reconcile.py."""
    log = tmp_path / "crash"
    deploy(CrashAfterReady.bind(str(log)), app_name)

    def times(kind: str) -> list[float]:
        path = Path(f"{log}.{kind}")
        return [float(line) for line in path.read_text().split()] if path.exists() else []

    wait_until(lambda: len(times("starts")) >= 6, 60, "six starts")
    starts, exits = times("starts"), times("exits")
    dep = _deployment(app_name, "CrashAfterReady")
    assert dep.restarts >= 5
    assert "exit code 3" in dep.last_error
    waits = [start - crash for crash, start in zip(exits[:5], starts[1:6], strict=True)]
    backoffs = [0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(w >= b for w, b in zip(waits, backoffs, strict=True)), (
        f"a replica restarted before its backoff: waits {[round(w, 2) for w in waits]}, backoffs {backoffs}")


# -- graceful deletion --------------------------------------------------------------------------


def test_delete_waits_for_the_request_in_flight(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Parked.bind(gate), app_name)
    key = uuid.uuid4().hex
    response = handle.park.remote(key)
    gate.arrived.remote(key).result(timeout_s=10)  # the request runs on the replica
    (pid,) = _running_pids(_deployment(app_name, "Parked"))
    deleted = threading.Event()
    errors: list[BaseException] = []

    def delete() -> None:
        try:
            serve.delete(app_name)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            deleted.set()

    deleter = threading.Thread(target=delete, daemon=True)
    deleter.start()
    try:
        wait_until(lambda: (a := app_status(app_name)) is not None and a.status == "DELETING", 10,
                   "the app is being deleted")
        # The request is still parked, so the delete cannot have finished, nor the replica gone.
        assert not deleted.is_set(), "serve.delete returned while a request was still running"
        assert alive(pid)
    finally:
        gate.open.remote(key).result(timeout_s=10)
    assert response.result(timeout_s=20) == f"finished {key}"
    assert deleted.wait(timeout=30), "serve.delete did not return after the request finished"
    deleter.join(timeout=5)
    assert not errors, errors
    assert app_status(app_name) is None
    wait_until(lambda: not alive(pid), 10, "the replica exits")


def test_delete_cancels_a_request_past_the_grace_period(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Parked.options(graceful_shutdown_timeout_s=1).bind(gate), app_name)
    key = uuid.uuid4().hex
    response = handle.park.remote(key)
    try:
        gate.arrived.remote(key).result(timeout_s=10)
        (pid,) = _running_pids(_deployment(app_name, "Parked"))
        started = time.monotonic()
        serve.delete(app_name)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"serve.delete took {elapsed:.1f}s with graceful_shutdown_timeout_s=1"
        with pytest.raises(RayServeException):  # ReplicaDiedError: the request did not complete
            response.result(timeout_s=10)
        assert app_status(app_name) is None
        wait_until(lambda: not alive(pid), 10, "the replica exits")
    finally:
        gate.open.remote(key).result(timeout_s=10)  # the Gate replica lets its waiter go


# -- autoscaling --------------------------------------------------------------------------------


def test_autoscaling_follows_the_load(deploy: Any, app_name: str, gate: DeploymentHandle) -> None:
    handle = deploy(Scaled.bind(gate), app_name)
    assert _deployment(app_name, "Scaled").replica_states == {"RUNNING": 1}
    key = uuid.uuid4().hex
    held = [handle.hold.remote(key) for _ in range(4)]
    try:
        gate.arrived.remote(key, 4).result(timeout_s=10)  # four requests run: a steady load of 4
        seen: list[tuple[str, str]] = []

        def scaled_up() -> bool:
            dep = _deployment(app_name, "Scaled")
            seen.append((dep.status, dep.status_trigger))
            assert len(dep.replicas) <= 3, dep.replicas  # never above max_replicas
            return len(_running_pids(dep)) >= 2

        wait_until(scaled_up, 20, "the deployment scales up under load")
        assert ("UPSCALING", "AUTOSCALING") in seen, seen
    finally:
        gate.open.remote(key).result(timeout_s=10)
    pids = [r.result(timeout_s=10) for r in held]
    assert all(isinstance(p, int) for p in pids)

    def scaled_down() -> bool:
        dep = _deployment(app_name, "Scaled")
        return dep.replica_states == {"RUNNING": 1} and dep.status == "HEALTHY"

    wait_until(scaled_down, 20, "the deployment scales back down to min_replicas=1")
    assert _deployment(app_name, "Scaled").restarts == 0


def test_scale_from_zero_serves_the_first_call(deploy: Any, app_name: str, serve_instance: Any) -> None:
    handle = deploy(Lazy.bind(), app_name)
    dep = _deployment(app_name, "Lazy")
    assert dep.replica_states == {} and dep.replicas == []
    assert app_status(app_name).status == "RUNNING"
    pid = handle.remote().result(timeout_s=30)
    assert pid in replica_pids(serve_instance.supervisor)
    assert _running_pids(_deployment(app_name, "Lazy")) == {pid}


# -- status -------------------------------------------------------------------------------------


def test_status_shows_replicas_restarts_and_last_error(deploy: Any, app_name: str, serve_instance: Any) -> None:
    handle = deploy(Pids.bind(), app_name)
    dep = _deployment(app_name, "Pids")
    assert dep.replica_states == {"RUNNING": 2}
    assert dep.restarts == 0 and dep.last_error == ""
    pids = _running_pids(dep)
    assert len(pids) == 2 and len(dep.replicas) == 2
    assert all(r.replica_id.startswith(f"{app_name}#Pids#") and r.version for r in dep.replicas)
    assert pids <= replica_pids(serve_instance.supervisor)
    assert all(_is_replica_process(p) for p in pids)
    assert set(_answers_from_each(lambda: handle.remote().result(timeout_s=10), pids)) == pids
    # The JSON form carries the same fields.
    as_dict = serve.status().to_dict()["applications"][app_name]["deployments"]["Pids"]
    assert {r["pid"] for r in as_dict["replicas"]} == pids
    assert as_dict["restarts"] == 0 and as_dict["last_error"] == ""

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> DeploymentStatusOverview | None:
        dep = _deployment(app_name, "Pids")
        running = _running_pids(dep)
        return dep if dep.restarts == 1 and len(running) == 2 and victim not in running else None

    dep = wait_until(replaced, 20, "the killed replica is replaced and counted")
    assert str(victim) in dep.last_error and "died unexpectedly" in dep.last_error, dep.last_error
    assert dep.status == "HEALTHY"
