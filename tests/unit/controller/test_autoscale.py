"""shoal.controller.autoscale and shoal.serve.autoscaling_policy, on a fake clock (plain floats)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from shoal.controller.autoscale import (
    Autoscaler,
    DecisionState,
    MetricsWindow,
    PolicyFn,
    decide,
    load_policy,
)
from shoal.serve.autoscaling_policy import (
    default_autoscaling_policy,
    replica_queue_length_autoscaling_policy,
)
from shoal.serve.config import (
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
)

DEP = DeploymentID("D", "app")


def _config(**kwargs: Any) -> AutoscalingConfig:
    kwargs.setdefault("max_replicas", 100)
    return AutoscalingConfig(**kwargs)


def _ctx(
    config: AutoscalingConfig, *, current: int, target: int | None = None, total: float
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=[],
        total_num_requests=total,
        total_queued_requests=None,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def _run(
    config: AutoscalingConfig,
    ticks: list[float],
    *,
    current: int,
    total: float,
    target: int | None = None,
    policy: PolicyFn | None = None,
    state: DecisionState | None = None,
) -> list[int]:
    """Decide at each time in ``ticks``, feeding each result back as the next target."""
    state = state or DecisionState()
    target = current if target is None else target
    out = []
    for now in ticks:
        ctx = _ctx(config, current=current, target=target, total=total)
        target, state = decide(ctx, config, state, now, policy)
        out.append(target)
    return out


# --- the default policy (steps 1-4) ----------------------------------------------------------


def test_default_policy_aliases() -> None:
    assert default_autoscaling_policy is replica_queue_length_autoscaling_policy


def test_ten_ongoing_on_one_replica_with_target_2_wants_5() -> None:
    ctx = _ctx(_config(target_ongoing_requests=2), current=1, total=10)
    assert replica_queue_length_autoscaling_policy(ctx) == (5, {})


@pytest.mark.parametrize(
    ("factors", "current", "total", "expected"),
    [
        ({"upscaling_factor": 0.5}, 1, 10, 3),  # 1 + 0.5 * (5 - 1) = 3
        ({"upscaling_factor": 2.0}, 1, 10, 9),  # 1 + 2 * 4 = 9
        ({"downscaling_factor": 0.5}, 4, 2, 3),  # ceil(4 + 0.5 * (1 - 4)) = ceil(2.5)
        ({"smoothing_factor": 0.5}, 1, 10, 3),  # deprecated fallback for both factors
        ({"upscaling_factor": 0.5}, 4, 2, 1),  # upscaling factor does not slow a downscale
    ],
)
def test_scaling_factors(
    factors: dict[str, float], current: int, total: float, expected: int
) -> None:
    ctx = _ctx(_config(**factors), current=current, total=total)
    assert replica_queue_length_autoscaling_policy(ctx)[0] == expected


def test_a_small_downscaling_factor_cannot_get_stuck() -> None:
    cfg = _config(downscaling_factor=0.1)
    # desired 3: ceil(4 - 0.1) rounds back to 4, but ceil(desired) < 4, so step down anyway.
    assert replica_queue_length_autoscaling_policy(_ctx(cfg, current=4, total=6))[0] == 3
    # desired 3.5: ceil(desired) == 4 == current, so staying is right.
    assert replica_queue_length_autoscaling_policy(_ctx(cfg, current=4, total=7))[0] == 4


def test_float_noise_does_not_add_a_replica() -> None:
    ctx = _ctx(_config(target_ongoing_requests=0.3), current=1, total=6)  # 6 / 0.3 = 20.0000...4
    assert replica_queue_length_autoscaling_policy(ctx)[0] == 20


def test_no_replicas_no_requests_keeps_the_target() -> None:
    assert (
        replica_queue_length_autoscaling_policy(_ctx(_config(), current=0, target=2, total=0))[0]
        == 2
    )


def test_policy_state_passes_through_unchanged() -> None:
    ctx = _ctx(_config(), current=2, total=4)
    ctx.policy_state = {"k": 1}
    assert replica_queue_length_autoscaling_policy(ctx) == (2, {"k": 1})


# --- the wrapper: cold start, delays, bounds -------------------------------------------------


def test_upscale_is_applied_only_after_upscale_delay_s() -> None:
    cfg = _config(target_ongoing_requests=2, upscale_delay_s=30)
    ticks = [0.0, 10.0, 29.9, 30.0, 30.1]
    assert _run(cfg, ticks, current=1, total=10) == [1, 1, 1, 5, 5]


def test_zero_upscale_delay_applies_at_once() -> None:
    assert _run(_config(upscale_delay_s=0), [0.0], current=1, total=10) == [5]


def test_cold_start_scales_from_zero_immediately() -> None:
    cfg = _config(min_replicas=0, upscale_delay_s=30)
    assert _run(cfg, [0.0], current=0, total=1) == [1]


def test_cold_start_uses_the_upscaling_factor_and_keeps_a_larger_target() -> None:
    cfg = _config(min_replicas=0, upscaling_factor=2.5)
    assert _run(cfg, [0.0], current=0, total=1) == [3]
    assert _run(_config(min_replicas=0), [0.0], current=0, target=4, total=1) == [4]


def test_cold_start_ends_a_pending_streak() -> None:
    cfg = _config(min_replicas=0, upscale_delay_s=30)
    state = DecisionState(direction=-1, since=0.0, policy_state={"x": 1})
    ctx = _ctx(cfg, current=0, target=0, total=3)
    assert decide(ctx, cfg, state, 5.0) == (1, DecisionState(policy_state={"x": 1}))


def test_downscale_to_zero_only_from_one_after_downscale_to_zero_delay_s() -> None:
    cfg = _config(min_replicas=0, downscale_delay_s=600, downscale_to_zero_delay_s=60)
    # From 3 with no load: the first step stops at 1 and takes downscale_delay_s ...
    state = DecisionState()
    target = 3
    for now in (0.0, 300.0, 599.0):
        target, state = decide(_ctx(cfg, current=3, target=target, total=0), cfg, state, now)
        assert target == 3
    target, state = decide(_ctx(cfg, current=3, target=3, total=0), cfg, state, 600.0)
    assert target == 1
    # ... then 1 -> 0 takes downscale_to_zero_delay_s, counted from its own streak.
    for now in (600.5, 659.0):
        target, state = decide(_ctx(cfg, current=1, target=1, total=0), cfg, state, now)
        assert target == 1
    target, state = decide(_ctx(cfg, current=1, target=1, total=0), cfg, state, 660.5)
    assert target == 0


def test_downscale_to_zero_delay_defaults_to_downscale_delay() -> None:
    cfg = _config(min_replicas=0, downscale_delay_s=100)
    assert _run(cfg, [0.0, 99.0, 100.0], current=1, total=0) == [1, 1, 0]


def test_zero_downscale_to_zero_delay_is_honoured() -> None:
    cfg = _config(min_replicas=0, downscale_delay_s=100, downscale_to_zero_delay_s=0)
    assert _run(cfg, [0.0], current=1, total=0) == [0]


def test_min_replicas_above_zero_never_reaches_zero() -> None:
    cfg = _config(min_replicas=1, downscale_delay_s=0)
    assert _run(cfg, [0.0, 1000.0], current=1, total=0) == [1, 1]


def test_downscale_waits_downscale_delay_s() -> None:
    cfg = _config(downscale_delay_s=600)
    assert _run(cfg, [0.0, 599.0, 600.0], current=5, total=4) == [5, 5, 2]


def test_streak_restarts_when_the_direction_flips() -> None:
    cfg = _config(upscale_delay_s=30, downscale_delay_s=30)
    state = DecisionState()
    _, state = decide(_ctx(cfg, current=2, total=10), cfg, state, 0.0)  # up from t=0
    assert (state.direction, state.since) == (1, 0.0)
    _, state = decide(_ctx(cfg, current=2, total=10), cfg, state, 20.0)
    _, state = decide(_ctx(cfg, current=2, total=1), cfg, state, 25.0)  # down from t=25
    assert (state.direction, state.since) == (-1, 25.0)
    up = [decide(_ctx(cfg, current=2, total=10), cfg, state, now)[0] for now in (30.0, 40.0)]
    assert up == [2, 2]  # the upscale streak before the flip does not count
    _, state = decide(_ctx(cfg, current=2, total=10), cfg, state, 40.0)
    assert decide(_ctx(cfg, current=2, total=10), cfg, state, 69.0)[0] == 2
    assert decide(_ctx(cfg, current=2, total=10), cfg, state, 70.0)[0] == 5


def test_streak_resets_when_the_wish_matches_the_target() -> None:
    cfg = _config(upscale_delay_s=30)
    state = DecisionState()
    _, state = decide(_ctx(cfg, current=2, total=10), cfg, state, 0.0)
    _, state = decide(_ctx(cfg, current=2, total=4), cfg, state, 10.0)  # 4 / 2 == 2 replicas
    assert (state.direction, state.since) == (0, None)
    _, state = decide(_ctx(cfg, current=2, total=10), cfg, state, 20.0)
    assert decide(_ctx(cfg, current=2, total=10), cfg, state, 35.0)[0] == 2
    assert decide(_ctx(cfg, current=2, total=10), cfg, state, 50.0)[0] == 5


def test_streak_keeps_its_start_while_the_wanted_number_changes() -> None:
    cfg = _config(upscale_delay_s=30)
    state = DecisionState()
    _, state = decide(_ctx(cfg, current=1, total=4), cfg, state, 0.0)
    n, state = decide(_ctx(cfg, current=1, total=16), cfg, state, 30.0)
    assert n == 8


def test_applying_a_change_ends_the_streak() -> None:
    cfg = _config(upscale_delay_s=10)
    n, state = decide(_ctx(cfg, current=1, total=10), cfg, DecisionState(direction=1, since=0), 10)
    assert (n, state.direction, state.since) == (5, 0, None)


def test_result_is_clamped_to_max_replicas() -> None:
    cfg = _config(max_replicas=3, upscale_delay_s=0)
    assert _run(cfg, [0.0], current=1, total=100) == [3]


def test_a_target_outside_the_bounds_is_clamped_at_once() -> None:
    # The bounds changed under a running deployment: no delay applies to them.
    cfg = _config(min_replicas=2, max_replicas=4)
    assert _run(cfg, [0.0], current=8, target=8, total=16) == [4]
    assert _run(cfg, [0.0], current=1, target=1, total=2) == [2]


def test_the_state_passed_in_is_not_mutated() -> None:
    cfg = _config()
    state = DecisionState()
    decide(_ctx(cfg, current=1, total=10), cfg, state, 0.0)
    assert state == DecisionState()


# --- metrics window --------------------------------------------------------------------------


def test_mean_is_time_weighted() -> None:
    w = MetricsWindow()
    w.record("r1", 4, 0.0)
    w.record("r1", 8, 10.0)
    assert w.total(20.0, 30.0) == pytest.approx(6.0)  # 4 for 10 s, 8 for 10 s
    assert w.total(20.0, 30.0, "max") == 8
    assert w.total(20.0, 30.0, "min") == 4


def test_sources_are_summed_as_step_functions() -> None:
    w = MetricsWindow()
    w.record("r1", 2, 0.0)
    w.record("r2", 1, 0.0)
    w.record("r1", 6, 5.0)
    w.record("r2", 3, 15.0)
    # sum: 3 on [0,5), 7 on [5,15), 9 on [15,20]
    assert w.total(20.0, 30.0) == pytest.approx((3 * 5 + 7 * 10 + 9 * 5) / 20)
    assert w.total(20.0, 30.0, "max") == 9
    assert w.total(20.0, 30.0, "min") == 3


def test_the_window_looks_back_only_look_back_period_s() -> None:
    w = MetricsWindow()
    w.record("r1", 100, 0.0)
    w.record("r1", 2, 10.0)
    w.record("r1", 4, 20.0)
    # window [15, 25]: 2 on [15,20), 4 on [20,25]
    assert w.total(25.0, 10.0) == pytest.approx(3.0)
    assert w.total(25.0, 10.0, "max") == 4
    assert w.total(25.0, 10.0, "min") == 2


def test_the_window_starts_when_the_last_source_first_reported() -> None:
    w = MetricsWindow()
    w.record("r1", 4, 0.0)
    w.record("r2", 2, 10.0)  # r2 is not counted as 0 before it reported
    assert w.total(20.0, 30.0) == pytest.approx(6.0)
    assert w.total(20.0, 30.0, "min") == 6


def test_a_zero_length_window_gives_the_current_sum() -> None:
    w = MetricsWindow()
    w.record("router", 1, 5.0)
    assert w.total(5.0, 30.0) == 1.0


def test_no_sources_gives_zero() -> None:
    assert MetricsWindow().total(0.0, 30.0) == 0.0


def test_stale_sources_are_dropped() -> None:
    w = MetricsWindow()
    w.record("gone", 10, 0.0)
    w.record("live", 1, 50.0)
    assert w.total(60.0, 30.0) == pytest.approx(11.0)  # 60 - 0 == 2 * 30: not yet stale
    assert w.total(60.5, 30.0) == pytest.approx(1.0)
    assert w.sources == {"live"}


def test_explicit_stale_after_s() -> None:
    w = MetricsWindow(stale_after_s=5.0)
    w.record("a", 3, 0.0)
    assert w.total(5.0, 30.0) == 3.0
    assert w.total(5.1, 30.0) == 0.0


def test_forget_drops_a_source_and_its_history() -> None:
    w = MetricsWindow()
    w.record("r1", 3, 0.0)
    w.record("r2", 5, 0.0)
    w.forget("r2")
    w.forget("never-seen")
    assert w.total(10.0, 30.0) == 3.0


def test_out_of_order_samples_and_equal_times() -> None:
    w = MetricsWindow()
    w.record("r1", 8, 10.0)
    w.record("r1", 4, 0.0)  # late arrival
    w.record("r1", 1, 10.0)
    w.record("r1", 2, 10.0)  # same time: the later-recorded value holds
    assert w.total(20.0, 30.0) == pytest.approx(3.0)
    assert w.total(20.0, 30.0, "max") == 4


def test_samples_after_now_are_ignored() -> None:
    w = MetricsWindow()
    w.record("r1", 2, 0.0)
    w.record("r1", 50, 100.0)
    w.record("r2", 7, 100.0)
    assert w.total(10.0, 30.0) == 2.0


def test_sources_filter() -> None:
    w = MetricsWindow()
    w.record("replica", 4, 0.0)
    w.record("router", 1, 0.0)
    assert w.total(10.0, 30.0, sources={"router"}) == 1.0


def test_invalid_inputs() -> None:
    w = MetricsWindow()
    with pytest.raises(ValueError):
        w.record("r", -1, 0.0)
    with pytest.raises(ValueError):
        w.record("r", float("nan"), 0.0)
    with pytest.raises(ValueError):
        w.total(0.0, 0.0)
    with pytest.raises(ValueError):
        w.total(0.0, 1.0, "median")
    with pytest.raises(ValueError):
        MetricsWindow(stale_after_s=0)


def test_history_is_trimmed_to_the_window() -> None:
    w = MetricsWindow()
    w.record("r", 1, 0.0)
    w.total(0.0, 10.0)
    for i in range(1, 1000):
        w.record("r", 1, float(i))
    assert len(w._series["r"]) <= 12


# --- custom policies -------------------------------------------------------------------------

calls: list[AutoscalingContext] = []


def my_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Wants 50 replicas and counts its calls in its state."""
    calls.append(ctx)
    return 50, {"calls": ctx.policy_state.get("calls", 0) + 1}


def bare_int_policy(ctx: AutoscalingContext) -> int:
    return 3


def kwarg_policy(ctx: AutoscalingContext, *, n: int) -> int:
    return n


class FixedPolicy:
    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        return self.replicas, {}


def failing_policy(ctx: AutoscalingContext) -> int:
    raise RuntimeError("policy bug")


def test_load_policy_resolves_the_default_path() -> None:
    assert load_policy(AutoscalingPolicy()) is replica_queue_length_autoscaling_policy


@pytest.mark.parametrize("path", [f"{__name__}:my_policy", f"{__name__}.my_policy"])
def test_load_policy_by_import_path(path: str) -> None:
    assert load_policy(AutoscalingPolicy(policy_function=path)) is my_policy


def test_load_policy_instantiates_a_class_with_policy_kwargs() -> None:
    policy = load_policy(
        AutoscalingPolicy(policy_function=f"{__name__}:FixedPolicy", policy_kwargs={"replicas": 7})
    )
    assert isinstance(policy, FixedPolicy) and policy.replicas == 7


def test_load_policy_accepts_a_callable_and_binds_function_kwargs() -> None:
    assert load_policy(my_policy) is my_policy
    bound = load_policy(AutoscalingPolicy(policy_function=kwarg_policy, policy_kwargs={"n": 4}))
    assert bound(_ctx(_config(), current=1, total=0)) == 4


def test_load_policy_errors() -> None:
    with pytest.raises(ImportError, match="no_such_module"):
        load_policy("no_such_module_xyz:f")
    with pytest.raises(ImportError, match="missing"):
        load_policy(f"{__name__}:missing")
    with pytest.raises(TypeError):
        load_policy(f"{__name__}:DEP")


def test_custom_policy_gets_delays_bounds_and_its_state() -> None:
    cfg = _config(max_replicas=10, upscale_delay_s=30)
    calls.clear()
    state = DecisionState()
    n, state = decide(_ctx(cfg, current=2, total=0), cfg, state, 0.0, my_policy)
    assert (n, state.policy_state) == (2, {"calls": 1})
    n, state = decide(_ctx(cfg, current=2, total=0), cfg, state, 30.0, my_policy)
    assert (n, state.policy_state) == (10, {"calls": 2})
    assert calls[1].policy_state == {"calls": 1} and calls[1].current_time == 30.0
    assert calls[1].config is cfg


def test_custom_policy_is_bypassed_on_cold_start() -> None:
    cfg = _config(min_replicas=0, upscale_delay_s=30)
    calls.clear()
    assert _run(cfg, [0.0], current=0, total=1, policy=my_policy) == [1]
    assert calls == []


def test_custom_policy_result_goes_through_scaling_factors() -> None:
    cfg = _config(upscaling_factor=0.5, upscale_delay_s=0)
    assert _run(cfg, [0.0], current=1, total=0, policy=FixedPolicy(5)) == [3]


def test_custom_policy_may_return_a_bare_number() -> None:
    cfg = _config(upscale_delay_s=0)
    state = DecisionState(policy_state={"kept": True})
    n, state = decide(_ctx(cfg, current=1, total=0), cfg, state, 0.0, bare_int_policy)
    assert (n, state.policy_state) == (3, {"kept": True})


@pytest.mark.parametrize("bad", ["3", None, (1, 2, 3), (1, "state"), float("inf"), True])
def test_custom_policy_bad_return_values(bad: Any) -> None:
    cfg = _config()
    with pytest.raises((TypeError, ValueError)):
        decide(_ctx(cfg, current=1, total=0), cfg, DecisionState(), 0.0, lambda ctx: bad)


# --- Autoscaler ------------------------------------------------------------------------------


def test_autoscaler_scales_up_after_the_delay_and_feeds_back_the_target() -> None:
    scaler = Autoscaler(DEP, _config(target_ongoing_requests=2, upscale_delay_s=30))
    target = 1
    for now in (0.0, 10.0, 20.0, 29.0):
        scaler.observe("r1", 10, now)
        target = scaler.target(now, current_num_replicas=1, current_target=target)
        assert target == 1
    scaler.observe("r1", 10, 30.0)
    assert scaler.target(30.0, current_num_replicas=1, current_target=target) == 5
    assert scaler.last_scale_up_time == 30.0 and scaler.last_scale_down_time is None


def test_autoscaler_cold_start_from_a_queued_request() -> None:
    scaler = Autoscaler(DEP, _config(min_replicas=0, upscale_delay_s=30))
    assert scaler.target(0.0, 0, 0) == 0
    scaler.observe("proxy", 1, 1.0, queued=True)
    assert scaler.target(1.0, 0, 0) == 1


def test_autoscaler_scales_to_zero_after_forgetting_load() -> None:
    cfg = _config(min_replicas=0, downscale_to_zero_delay_s=60, look_back_period_s=10)
    scaler = Autoscaler(DEP, cfg)
    scaler.observe("r1", 3, 0.0)
    assert scaler.target(0.0, 1, 1) == 1  # 2 wanted, but the upscale is delayed
    scaler.forget("r1")
    assert scaler.target(10.0, 1, 1) == 1
    assert scaler.target(70.0, 1, 1) == 0
    assert scaler.last_scale_down_time == 70.0


def test_autoscaler_passes_queued_and_total_requests_to_the_policy() -> None:
    cfg = _config(policy=AutoscalingPolicy(policy_function=my_policy))
    scaler = Autoscaler(DEP, cfg)
    scaler.observe("r1", 4, 0.0)
    scaler.observe("proxy", 2, 0.0, queued=True)
    calls.clear()
    scaler.target(0.0, 1, 1, running_replicas=["r1"])
    ctx = calls[-1]
    assert (ctx.total_num_requests, ctx.total_queued_requests, ctx.total_running_requests) == (
        6.0,
        2.0,
        4.0,
    )
    assert ctx.deployment_name == "D" and ctx.running_replicas == ["r1"]
    assert scaler.state.policy_state == {"calls": 1}


def test_autoscaler_keeps_the_target_when_the_policy_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scaler = Autoscaler(DEP, _config(policy=AutoscalingPolicy(policy_function=failing_policy)))
    with caplog.at_level(logging.ERROR, logger="shoal.controller"):
        assert scaler.target(0.0, 2, 2) == 2
    assert "policy bug" in caplog.text


def test_autoscaler_reconfigure_drops_the_streak_and_a_replaced_policys_state() -> None:
    cfg = _config(policy=AutoscalingPolicy(policy_function=my_policy))
    scaler = Autoscaler(DEP, cfg)
    scaler.target(0.0, 1, 1)
    assert scaler.state.direction == 1 and scaler.state.policy_state == {"calls": 1}
    scaler.reconfigure(cfg.model_copy(update={"upscale_delay_s": 5.0}))
    assert scaler.state == DecisionState(policy_state={"calls": 1})
    scaler.reconfigure(_config())
    assert scaler.state == DecisionState()
