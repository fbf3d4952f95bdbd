"""Request routers: the built-in choice, the mixins' tiers, and a Router driving a custom one.

Fake replicas on real ``inproc://`` sockets, a fake clock, and a fake sleep for backoffs.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, ClassVar

import cloudpickle
import pytest
from inproc import FakeClock, FakeReplica, request_id, run

from shoal.runtime import wire
from shoal.runtime.context import ReplicaID
from shoal.runtime.errors import DeploymentUnavailableError, RequestCancelledError
from shoal.runtime.reply import ReplySink
from shoal.runtime.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    PowerOfTwoChoicesRequestRouter,
    ReplicaResult,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
)
from shoal.runtime.router import Call, Router
from shoal.serve.config import DeploymentID

pytestmark = pytest.mark.timeout(60)


# -- the built-in router's synchronous choice ----------------------------------------------------


def test_choose_now_prefers_holders_then_the_replicas_with_fewest_models() -> None:
    models = {"a": ("m1", "m2"), "b": ("m3",), "c": ()}
    rng = random.Random(0)

    def choose(available: list[str], model_id: str) -> str | None:
        return PowerOfTwoChoicesRequestRouter.choose_now(available, model_id, models.__getitem__, lambda _: 0, rng)

    assert {choose(["a", "b", "c"], "m1") for _ in range(20)} == {"a"}
    assert {choose(["a", "b", "c"], "m3") for _ in range(20)} == {"b"}
    assert {choose(["a", "b", "c"], "new") for _ in range(20)} == {"c"}  # where a new model goes
    assert {choose(["b", "c"], "m1") for _ in range(20)} == {"c"}  # the holder has no room
    assert {choose(["a", "b"], "m9") for _ in range(20)} == {"b"}
    assert choose([], "m1") is None
    assert {choose(["a", "b", "c"], "") for _ in range(50)} == {"a", "b", "c"}  # no id: p2c over all


# -- the mixins ------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Policy(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return [candidate_replicas]


def _replica(unique_id: str, models: tuple[str, ...] = (), limit: int = 5, queue_len: int = 0) -> RunningReplica:
    replica = RunningReplica(ReplicaID(unique_id, "D", "app"), limit, lambda: queue_len)
    replica._update(limit, models, None)
    return replica


def _pending(model_id: str = "") -> PendingRequest:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    return PendingRequest(RequestMetadata("r", "r:1", multiplexed_model_id=model_id), 0.0, future)


def test_multiplex_routing_tries_holders_then_fewest_models_then_all_after_the_timeout() -> None:
    clock = _Clock()
    policy = _Policy(deployment_id=DeploymentID("D", "app"), get_curr_time_s=clock)
    a, b, c = _replica("a", ("m1", "m2")), _replica("b", ("m3",)), _replica("c", ("m4",))
    policy.update_replicas([a, b, c])
    ids = {r.replica_id: r.replica_id.unique_id for r in (a, b, c)}

    def names(found: set[ReplicaID]) -> set[str]:
        return {ids[i] for i in found}

    request = _pending("m1")
    assert names(policy.apply_multiplex_routing(request)) == {"a"}  # the holder first
    assert names(policy.apply_multiplex_routing(request)) == {"b", "c"}  # then fewest models
    clock.now += 2.0  # past the matching timeout (1 to 2 s)
    assert names(policy.apply_multiplex_routing(request)) == {"b", "c"}  # fewest once more
    assert names(policy.apply_multiplex_routing(request)) == {"a", "b", "c"}  # then all
    assert names(policy.apply_multiplex_routing(_pending("new"))) == {"b", "c"}  # nobody has it
    ranked = policy.rank_replicas_via_multiplex([a, b, c], "m3")
    assert [[r.replica_id.unique_id for r in tier] for tier in ranked] == [["b"], ["c"], ["a"]]


def test_locality_tiers_collapse_to_every_replica_on_one_machine() -> None:
    policy = _Policy(deployment_id=DeploymentID("D", "app"), prefer_local_node_routing=True)
    replicas = [_replica("a"), _replica("b")]
    policy.update_replicas(replicas)
    assert policy.rank_replicas_via_locality(replicas) == [replicas, [], []]
    request = _pending()
    assert policy.apply_locality_routing(request) == policy.replica_id_set  # same node: everyone
    assert not request.routing_context.should_backoff  # no backoff before trying all
    assert policy.apply_locality_routing(request) == policy.replica_id_set
    assert request.routing_context.should_backoff


def test_select_available_replicas_and_the_backoff_schedule() -> None:
    policy = _Policy(deployment_id=DeploymentID("D", "app"), initial_backoff_s=0.01, backoff_multiplier=3, max_backoff_s=0.05)
    free, full = _replica("free", queue_len=1), _replica("full", queue_len=5)
    policy.update_replicas([free, full])
    assert policy.select_available_replicas() == [free]
    assert policy.curr_replicas == {free.replica_id: free, full.replica_id: full}
    assert [policy._compute_backoff_s(i) for i in range(4)] == pytest.approx([0.01, 0.03, 0.05, 0.05])


def test_power_of_two_choices_picks_two_distinct_candidates() -> None:
    async def main() -> None:
        policy = PowerOfTwoChoicesRequestRouter(deployment_id=DeploymentID("D", "app"))
        replicas = [_replica(str(i)) for i in range(5)]
        policy.update_replicas(replicas)
        for _ in range(20):
            [tier] = await policy.choose_replicas(replicas, None)
            assert len(tier) == 2 and tier[0] is not tier[1] and set(tier) <= set(replicas)
        policy.update_replicas(replicas[:1])
        assert await policy.choose_replicas(replicas[:1], None) == [replicas[:1]]

    run(main)


# -- a Router driving a custom router ---------------------------------------------------------------


class Pinned(FIFOMixin, RequestRouter):
    """Everything to the replica named by ``initialize_state(target=...)``, while ``open``."""

    routed: ClassVar[list[tuple[str, str]]] = []
    died: ClassVar[list[str]] = []

    def initialize_state(self, target: str = "") -> None:
        self.target = target
        self.open = True

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not self.open:
            return []
        return [[r for r in candidate_replicas if r.replica_id.unique_id == self.target]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        Pinned.routed.append((pending_request.metadata.request_id, replica_id.unique_id))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        Pinned.died.append(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)


class FakeSleep:
    """Backoffs that end only when the test says so; records their lengths."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.started = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.started.set()
        await waiter

    async def next(self) -> None:
        """Wait for a backoff to start, then end it."""
        await self.started.wait()
        self.started.clear()
        waiter = self._waiters.pop(0)
        waiter.set_result(None)


def _call(name: str, *args: Any) -> tuple[Call, ReplySink]:
    sink = ReplySink()
    return Call(wire.RequestHeader("__call__", name), wire.dumps_args(args, {})[1], sink), sink


def _entry(*replicas: tuple[str, FakeReplica], cls: Any = Pinned, kwargs: dict[str, Any] | None = None,
           limit: int = 5) -> wire.DeploymentEntry:
    spec = wire.RouterSpec(cloudpickle.dumps(cls), kwargs or {}, 0.01, 3.0, 0.05)
    return wire.DeploymentEntry(
        replicas=tuple(r.address(f"app#D#{name}") for name, r in replicas), max_ongoing_requests=limit, router=spec,
    )


def test_a_custom_router_chooses_and_is_told_what_happened() -> None:
    async def main() -> None:
        a, b = FakeReplica(), FakeReplica()
        Pinned.routed.clear()
        router = Router("app", "D", asyncio.get_running_loop(), clock=FakeClock())
        router.update(_entry(("a", a), ("b", b), kwargs={"target": "b"}))
        assert isinstance(router.policy, Pinned) and router.policy.target == "b"
        calls = [_call(f"c{i}", i) for i in range(3)]
        for call, _ in calls:
            router.submit(call)
        for i, (_, sink) in enumerate(calls):
            identity, msg = await b.next()
            assert request_id(msg) == f"c{i}"  # FIFO
            b.answer(identity, msg, wire.Kind.RESULT, i)
            assert await sink.result() == i
        assert Pinned.routed == [("c0", "b"), ("c1", "b"), ("c2", "b")]
        assert a.received.empty()
        router.close()
        a.close()
        b.close()

    run(main)


def test_a_custom_router_backs_off_and_a_rejected_call_is_routed_again() -> None:
    async def main() -> None:
        a, sleep = FakeReplica(), FakeSleep()
        router = Router("app", "D", asyncio.get_running_loop(), clock=FakeClock(), sleep=sleep)
        router.update(_entry(("a", a), kwargs={"target": "a"}))
        assert isinstance(router.policy, Pinned)
        router.policy.open = False  # nothing to choose: the routing task backs off
        call, sink = _call("c1")
        router.submit(call)
        for _ in range(4):
            await sleep.next()
        await sleep.started.wait()
        assert sleep.delays == pytest.approx([0.01, 0.03, 0.05, 0.05, 0.05])  # initial * 3**n, capped
        router.policy.open = True
        sleep.started.clear()
        router.wake_routing()  # a slot freed up: the backoff ends early
        identity, msg = await a.next()
        a.answer(identity, msg, wire.Kind.REJECTED, q=5)  # full with other callers' requests
        await sleep.started.wait()  # back in the queue; the replica said it is full: back off
        assert call.conn is None and list(router.queue) == [call]
        a.answer(*(await _resent(a, router)), wire.Kind.RESULT, "ok")
        assert await sink.result() == "ok"
        router.close()
        a.close()

    async def _resent(a: FakeReplica, router: Router) -> tuple[bytes, wire.Message]:
        # The replica said 5 ongoing (its limit): this caller waits for a report below it.
        router.replicas["app#D#a"].reported_at = -10.0
        router.wake_routing()
        return await a.next()

    run(main)


def test_cancel_a_waiting_call_death_and_a_router_that_cannot_load() -> None:
    async def main() -> None:
        a, sleep = FakeReplica(), FakeSleep()
        Pinned.died.clear()
        router = Router("app", "D", asyncio.get_running_loop(), clock=FakeClock(), sleep=sleep)
        router.update(_entry(("a", a), kwargs={"target": "nobody"}))
        call, sink = _call("c1")
        router.submit(call)
        router.cancel(call)
        with pytest.raises(RequestCancelledError):
            await sink.result()
        assert not router.queue
        assert isinstance(router.policy, Pinned)
        router.policy.target = "a"
        sent, sent_sink = _call("c2")
        router.submit(sent)
        await a.next()
        conn = router.replicas["app#D#a"]
        conn.dead = True
        router.on_death(conn)  # what the connection reports when the replica's process exits
        with pytest.raises(Exception, match="died"):
            await sent_sink.result()
        assert Pinned.died == ["a"]
        router.update(_entry(cls=_NotARouter))
        late, late_sink = _call("c3")
        router.submit(late)
        with pytest.raises(DeploymentUnavailableError, match=r"request router could not be created.*not a subclass of RequestRouter"):
            await late_sink.result()
        router.close()
        a.close()

    run(main)


class _NotARouter:
    pass


# -- the built-in router and multiplexed model ids ----------------------------------------------------


def test_the_builtin_router_sends_a_model_where_replies_or_snapshots_say_it_is() -> None:
    async def main() -> None:
        a, b = FakeReplica(), FakeReplica()
        router = Router("app", "D", asyncio.get_running_loop(), clock=FakeClock())
        router._rng = random.Random(0)
        entry = wire.DeploymentEntry(
            replicas=(a.address("app#D#a"), b.address("app#D#b")), max_ongoing_requests=5,
            model_ids={"app#D#a": wire.ModelIds(1, ("m1",))},
        )
        router.update(entry)
        assert router.routing is None  # the built-in router: no routing tasks
        for _ in range(5):
            call, sink = _call("m1-call")
            call.header = wire.request_header("__call__", "m1-call", mx="m1")
            router.submit(call)
            identity, msg = await a.next()  # a holds m1 (from the snapshot)
            a.answer(identity, msg, wire.Kind.RESULT, 1)
            await sink.result()
        # b loads m2: its reply says so at once, before any snapshot does.
        call, sink = _call("m2-call")
        call.header = wire.request_header("__call__", "m2-call", mx="m2")
        router.submit(call)  # nobody holds m2: it goes to the replica with the fewest models, b
        identity, msg = await b.next()
        b.channel.send_message(
            wire.reply(wire.Kind.RESULT, msg.incarnation, msg.call_id, *wire.dumps(2), model_ids=wire.ModelIds(1, ("m2",))),
            identity,
        )
        await sink.result()
        assert router.replicas["app#D#b"].model_ids.ids == ("m2",)
        router.update(entry)  # an older snapshot does not undo what the reply said
        assert router.replicas["app#D#b"].model_ids.ids == ("m2",)
        router.close()
        a.close()
        b.close()

    run(main)


# -- what travels: snapshots, replies, reports ---------------------------------------------------------


def test_router_specs_model_ids_and_routing_stats_round_trip_through_a_snapshot() -> None:
    entry = wire.DeploymentEntry(
        replicas=(wire.ReplicaAddress("app#D#a", 3, "ipc://a"),),
        router=wire.RouterSpec(b"pickled class", {"k": [1, "x"]}, 0.01, 3.0, 0.2),
        model_ids={"app#D#a": wire.ModelIds(4, ("m1", "m2"))},
        routing_stats={"app#D#a": (int(wire.Encoding.PICKLE), b"\x80stats")},
    )
    snapshot = wire.Snapshot(7, {"app#D": entry})
    assert wire.Snapshot.from_wire(wire.unpack(wire.pack(snapshot.to_wire()))) == snapshot
    assert wire.RouterSpec(wire.DEFAULT_ROUTER).is_default and not entry.router.is_default
    old = {key: value for key, value in snapshot.to_wire()["deployments"]["app#D"].items()
           if key not in ("router", "model_ids", "routing_stats")}
    assert wire.Snapshot.from_wire({"version": 1, "deployments": {"app#D": old}}).deployments["app#D"].router.is_default


def test_model_ids_ride_on_replies_and_routing_info() -> None:
    ids = wire.ModelIds(2, ("a", "b"))
    [frame] = wire.encode(wire.reply(wire.Kind.RESULT, 1, 9, *wire.dumps("v"), q=3, model_ids=ids))
    msg = wire.decode([frame])
    assert wire.reply_model_ids(msg.meta) == ids
    assert wire.ReplyHeader.from_meta(msg.meta).q == 3
    assert wire.reply_model_ids(wire.decode(wire.encode(wire.reply(wire.Kind.RESULT, 1, 9, q=0))).meta) is None
    assert wire.routing_info_model_ids(wire.routing_info(ids)) == ids
    with pytest.raises(wire.ProtocolError):
        wire.routing_info_model_ids({"mx": "nonsense"})


def test_the_supervisor_polls_routing_stats_and_keeps_going_after_a_failure() -> None:
    from shoal.controller.health import monitor_routing_stats

    class FakeControl:
        def __init__(self) -> None:
            self.answers: list[Any] = [TimeoutError(), [0, b"first"], RuntimeError("boom"), [1, b"second"], None]
            self.timeouts: list[float] = []

        async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
            self.timeouts.append(timeout_s)
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer

    async def main() -> None:
        control, got = FakeControl(), []
        await monitor_routing_stats(
            control,  # type: ignore[arg-type]
            period_s=lambda: 0.0, timeout_s=lambda: 7.5, on_stats=lambda enc, data: got.append((enc, data)), name="r",
        )
        assert got == [(0, b"first"), (1, b"second")]  # failures keep the previous stats
        assert control.timeouts == [7.5] * 5  # and it stopped once the replica said it has none

    run(main)


class RaisesOnce(RequestRouter):
    calls = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        RaisesOnce.calls += 1
        if RaisesOnce.calls == 1:
            raise RuntimeError("a bug in the router")
        return [candidate_replicas]


def test_a_router_that_raises_is_logged_and_its_call_routed_by_the_next_task() -> None:
    async def main() -> None:
        a = FakeReplica()
        RaisesOnce.calls = 0
        router = Router("app", "D", asyncio.get_running_loop(), clock=FakeClock())
        router.update(_entry(("a", a), cls=RaisesOnce))
        call, sink = _call("c1")
        router.submit(call)
        identity, msg = await a.next()  # after the restart delay (max_backoff_s), not at once
        a.answer(identity, msg, wire.Kind.RESULT, "ok")
        assert await sink.result() == "ok"
        assert RaisesOnce.calls == 2
        router.close()
        a.close()

    run(main)
