"""Autoscaling decisions of one deployment: a metrics window, the policy wrapper, policy loading.

Pure and synchronous: nothing here starts a process, awaits, or reads a clock; every method
takes ``now`` (seconds on the controller's clock).

**Metrics** (:class:`MetricsWindow`). Each source reports a number of requests from time to
time: a replica its running plus queued requests, a router (proxy or handle) the requests waiting
in its own queue. A source's samples form a right-continuous step function (a value holds until
the next sample). ``total()`` sums the sources' step functions over the window
``[start, now]``, where ``start`` is ``now - look_back_period_s`` or, if later, the moment the
last of the sources sent its first sample (no source is counted as 0 before it first reported),
and reduces the sum with the aggregation function: the time-weighted mean, or the max or min over
the window. A window of zero length gives the current sum. A source silent for longer than
``stale_after_s`` (default: twice the look-back period) is dropped, so sources must report more
often than that even when their value does not change.

**Decision** (:func:`decide`), once per control-loop tick, for the default policy or a custom one:

1. Cold start: with no running replica and requests waiting, return
   ``max(ceil(upscaling_factor), target)`` at once, without calling the policy or waiting.
2. Ask the policy. The default one (``shoal.serve.autoscaling_policy``) already applies the
   scaling factors; a custom policy's number goes through the same factors here. Both give
   ``scaled``, which is clamped to ``[min_replicas, max_replicas]``.
3. Delay, compared with the current ``target``: a move up must be wanted on every tick for
   ``upscale_delay_s``, a move down for ``downscale_delay_s``; the streak restarts when the
   direction flips and ends when the wanted number equals the target. A move down from more than
   one replica stops at 1; only the step 1 -> 0 reaches zero, after
   ``get_downscale_to_zero_delay_s()``.
4. The result is clamped to ``[min_replicas, max_replicas]`` again, which takes effect at once.

**Target capacity** (Ray's ``target_capacity``, a config file's percentage of every target):
the bounds are ``min_replicas``/``max_replicas`` scaled by :func:`capacity_adjusted`, and while
capacity is scaling up (``direction == "UP"``) the lower bound is the scaled
``initial_replicas`` when that is set. These are ``ctx.capacity_adjusted_min_replicas`` and
``ctx.capacity_adjusted_max_replicas``.

**Application-level policy** (:class:`AppPolicy`, a config file's ``autoscaling_policy`` of an
application): called once per tick with ``{DeploymentID: AutoscalingContext}`` of every
autoscaling deployment of the application, it returns ``({DeploymentID: num_replicas},
{DeploymentID: policy_state})``; each number then goes through steps 1-4 of that deployment, as
Ray's wrapper does, and a deployment it leaves out keeps its target. It replaces the
deployments' own policies.

:class:`Autoscaler` keeps one deployment's window and :class:`DecisionState` between ticks.
"""

from __future__ import annotations

import bisect
import dataclasses
import decimal
import functools
import inspect
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from itertools import groupby
from operator import itemgetter
from typing import Any

from shoal.runtime.imports import import_attr
from shoal.serve.autoscaling_policy import (
    _apply_scaling_factors,
    _ceil,
    _cold_start_replicas,
    replica_queue_length_autoscaling_policy,
)
from shoal.serve.config import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
)

__all__ = [
    "AppPolicy",
    "Autoscaler",
    "DecisionState",
    "MetricsWindow",
    "PolicyFn",
    "capacity_adjusted",
    "decide",
    "decide_desired",
    "load_policy",
]

logger = logging.getLogger("shoal.controller")

PolicyFn = Callable[[AutoscalingContext], Any]
"""A loaded policy: ``policy(ctx)`` returns ``(num_replicas, policy_state)`` or a number."""

_time = itemgetter(0)


def capacity_adjusted(num_replicas: int, target_capacity: float | None) -> int:
    """``num_replicas`` scaled by ``target_capacity`` percent, as Ray scales it.

    None or 100 leave it as it is; 0 (or 0 replicas) gives 0; otherwise
    ``num_replicas * target_capacity / 100`` rounded half up (2.5 -> 3, not Python's 2), and at
    least 1, so only a capacity of 0 takes a deployment to zero.
    """
    if target_capacity is None or target_capacity == 100:
        return num_replicas
    if target_capacity == 0 or num_replicas == 0:
        return 0
    scaled = decimal.Decimal(num_replicas * target_capacity) / decimal.Decimal(100)
    return max(1, int(scaled.to_integral_value(rounding=decimal.ROUND_HALF_UP)))


# --- metrics ---------------------------------------------------------------------------------


def _trim(series: list[tuple[float, float]], cutoff: float) -> None:
    """Drop samples older than the last one at or before ``cutoff`` (it still gives the value)."""
    i = bisect.bisect_right(series, cutoff, key=_time) - 1
    if i > 0:
        del series[:i]


class MetricsWindow:
    """Time series of request counts per source, reduced over a look-back window.

    Sources are opaque ids (replica ids, router ids). Samples of one source may arrive out of
    order; two samples at the same time keep the later-recorded value.
    """

    def __init__(self, stale_after_s: float | None = None) -> None:
        if stale_after_s is not None and stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}.")
        self.stale_after_s = stale_after_s
        self._series: dict[str, list[tuple[float, float]]] = {}
        self._keep_s: float | None = None  # last look-back used; bounds memory between totals

    @property
    def sources(self) -> frozenset[str]:
        """Ids of the sources currently held (stale ones go at the next ``total()``)."""
        return frozenset(self._series)

    def record(self, source_id: str, value: float, now: float) -> None:
        """Record that ``source_id`` had ``value`` (>= 0, finite) requests at time ``now``."""
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a request count must be finite and >= 0, got {value}.")
        series = self._series.setdefault(source_id, [])
        if not series or series[-1][0] <= now:
            series.append((now, float(value)))
        else:
            bisect.insort_right(series, (now, float(value)), key=_time)
        if self._keep_s is not None:
            _trim(series, series[-1][0] - self._keep_s)

    def forget(self, source_id: str) -> None:
        """Drop every sample of ``source_id`` (the replica stopped, the router went away)."""
        self._series.pop(source_id, None)

    def total(
        self,
        now: float,
        look_back_period_s: float,
        aggregation: AggregationFunction | str = AggregationFunction.MEAN,
        *,
        sources: Collection[str] | None = None,
    ) -> float:
        """Summed requests over ``[start, now]`` reduced by ``aggregation`` (module docstring).

        Drops stale sources and samples older than the window. ``sources`` restricts the sum to
        those ids (the window then starts when the last of *them* first reported). Samples
        after ``now`` are ignored. No live source gives 0.0.
        """
        if look_back_period_s <= 0:
            raise ValueError(f"look_back_period_s must be positive, got {look_back_period_s}.")
        agg = AggregationFunction(aggregation)
        self._keep_s = look_back_period_s
        cutoff = now - look_back_period_s
        stale_s = self.stale_after_s if self.stale_after_s is not None else 2 * look_back_period_s
        live: dict[str, list[tuple[float, float]]] = {}
        for sid, series in list(self._series.items()):
            _trim(series, cutoff)
            n = bisect.bisect_right(series, now, key=_time)
            if n == 0:
                continue  # only samples from the future
            if now - series[n - 1][0] > stale_s:
                del self._series[sid]
            elif sources is None or sid in sources:
                live[sid] = series[:n]
        if not live:
            return 0.0
        start = max(cutoff, max(series[0][0] for series in live.values()))
        current: dict[str, float] = {}
        events: list[tuple[float, str, float]] = []
        for sid, series in live.items():
            i = bisect.bisect_right(series, start, key=_time)
            current[sid] = series[i - 1][1]
            events.extend((t, sid, v) for t, v in series[i:])
        events.sort(key=_time)  # stable: equal times keep their recording order
        value = sum(current.values())
        low = high = value
        area, prev = 0.0, start
        for t, group in groupby(events, key=_time):
            area += value * (t - prev)
            for _, sid, v in group:
                current[sid] = v
            value = sum(current.values())
            low, high = min(low, value), max(high, value)
            prev = t
        area += value * (now - prev)
        if agg is AggregationFunction.MAX:
            return high
        if agg is AggregationFunction.MIN:
            return low
        return area / (now - start) if now > start else value


# --- policies --------------------------------------------------------------------------------


def _import_attr(path: str) -> Any:
    """Resolve a policy's import path; ImportError names the path."""
    try:
        return import_attr(path)
    except ImportError as exc:
        raise ImportError(f"Failed to import autoscaling policy {path!r}: {exc}") from exc


def load_policy(policy: AutoscalingPolicy | str | Callable[..., Any]) -> PolicyFn:
    """Return the callable that ``policy`` names.

    An import path is imported; a class is constructed with ``policy_kwargs`` and the instance is
    returned (it is called once per tick); a function with non-empty ``policy_kwargs`` is bound
    to them as keyword arguments. Raises ImportError for a path that does not resolve and
    TypeError for something that cannot be called.
    """
    if isinstance(policy, AutoscalingPolicy):
        target, kwargs = policy.policy_function, dict(policy.policy_kwargs)
    else:
        target, kwargs = policy, {}
    obj = _import_attr(target) if isinstance(target, str) else target
    if inspect.isclass(obj):
        obj = obj(**kwargs)
        kwargs = {}
    if not callable(obj):
        raise TypeError(f"Autoscaling policy {target!r} is not callable: {obj!r}.")
    return functools.partial(obj, **kwargs) if kwargs else obj


def _normalize(result: Any, previous_state: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """A policy's return value as ``(num_replicas, policy_state)``; a bare number keeps state."""
    pair = isinstance(result, (tuple, list)) and len(result) == 2
    value, state = result if pair else (result, None)
    state = previous_state if state is None else state
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a policy must return (num_replicas, policy_state), got {result!r}.")
    if not isinstance(state, Mapping):
        raise TypeError(f"policy state must be a dict, got {type(state).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"an autoscaling policy returned {value} replicas.")
    return float(value), dict(state)


# --- decision --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecisionState:
    """What :func:`decide` carries from one tick to the next.

    ``direction`` is +1 during an upscale streak, -1 during a downscale streak, else 0;
    ``since`` is when the streak started (None without one); ``policy_state`` is the dict the
    policy returned last, handed back to it as ``ctx.policy_state``.
    """

    direction: int = 0
    since: float | None = None
    policy_state: dict[str, Any] = dataclasses.field(default_factory=dict)


def _delay(
    scaled: int, target: int, state: DecisionState, now: float, config: AutoscalingConfig
) -> tuple[int, int, float | None]:
    """Step 3: ``(result, direction, since)``; ``result`` is ``target`` until the delay passed."""
    if scaled == target:
        return target, 0, None
    direction = 1 if scaled > target else -1
    since = state.since if state.direction == direction and state.since is not None else now
    if direction > 0:
        delay_s = config.upscale_delay_s
    elif target == 1:
        delay_s = config.get_downscale_to_zero_delay_s()
    else:
        delay_s = config.downscale_delay_s
        scaled = max(1, scaled)  # only the step 1 -> 0 reaches zero
    return (scaled if now - since >= delay_s else target), direction, since


def decide(
    ctx: AutoscalingContext,
    config: AutoscalingConfig,
    state: DecisionState,
    now: float,
    policy: PolicyFn | None = None,
) -> tuple[int, DecisionState]:
    """One tick: return ``(num_replicas, next_state)`` for ``ctx`` (:func:`decide_desired`)."""
    result, _desired, next_state = decide_desired(ctx, config, state, now, policy)
    return result, next_state


def decide_desired(
    ctx: AutoscalingContext,
    config: AutoscalingConfig,
    state: DecisionState,
    now: float,
    policy: PolicyFn | None = None,
) -> tuple[int, int, DecisionState]:
    """One tick: return ``(num_replicas, desired, next_state)`` for ``ctx`` (module docstring,
    steps 1-4). ``desired`` is Ray's "raw decision": the policy's number after the scaling
    factors and the delay, before the bounds (the cold-start number; the target while a move
    waits out its delay or the bounds allow none; Ray's also shows a wish beyond the bounds).

    ``policy`` None means the default policy. Reads ``ctx.current_num_replicas``,
    ``target_num_replicas``, ``total_num_requests`` and the capacity-adjusted bounds; the
    policy sees ``ctx`` with ``config``, ``now`` and ``state.policy_state`` filled in. Exceptions
    of a custom policy propagate; ``state`` is never mutated.
    """
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    target, current = ctx.target_num_replicas, ctx.current_num_replicas

    def clamp(n: int) -> int:
        return min(max(n, low), high)

    if current == 0 and ctx.total_num_requests > 0:
        cold = _cold_start_replicas(config, target)
        return clamp(cold), cold, DecisionState(policy_state=state.policy_state)

    ctx = dataclasses.replace(
        ctx, config=config, current_time=now, policy_state=dict(state.policy_state)
    )
    if policy is None or policy is replica_queue_length_autoscaling_policy:
        scaled, policy_state = replica_queue_length_autoscaling_policy(ctx)
    else:
        wanted, policy_state = _normalize(policy(ctx), state.policy_state)
        scaled = _apply_scaling_factors(wanted, current, config) if current else _ceil(wanted)
    delayed, direction, since = _delay(clamp(scaled), target, state, now, config)
    move = max(1, scaled) if direction < 0 and target > 1 else scaled  # down from more than one stops at one
    desired = target if delayed == target else move  # no move (yet), or the move before the bounds
    result = clamp(delayed)
    if result != target:
        direction, since = 0, None  # applied: the next move starts a new streak
    return result, desired, DecisionState(direction, since, policy_state)


class Autoscaler:
    """The autoscaling state of one deployment: its metrics window, streak and policy.

    ``observe``/``forget`` feed the window as metrics arrive; ``target`` runs one tick. A custom
    policy that raises is logged and leaves the target unchanged for that tick.
    ``target_capacity``/``capacity_direction`` scale the bounds (module docstring);
    ``app_policy``, when set, decides instead of the deployment's own policy (the poller calls
    :meth:`AppPolicy.targets` for the whole application).
    """

    def __init__(
        self,
        deployment_id: DeploymentID,
        config: AutoscalingConfig,
        *,
        stale_after_s: float | None = None,
        target_capacity: float | None = None,
        capacity_direction: str | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self.window = MetricsWindow(stale_after_s=stale_after_s)
        self.state = DecisionState()
        self.last_scale_up_time: float | None = None
        self.last_scale_down_time: float | None = None
        self.target_capacity = target_capacity
        self.capacity_direction = capacity_direction
        self.app_policy: AppPolicy | None = None
        self.last_desired: int | None = None  # the last decision's (``decide_desired``), for metrics
        self.last_total_requests = 0.0
        self.last_policy_execution_ms = 0.0  # timed by the caller (``controller/scaling.py``)
        self.last_policy_scope = "deployment"  # or "application": an application-level policy decided
        self._routers: set[str] = set()
        self._policy: PolicyFn | None = None
        self.config = config
        self.reconfigure(config)

    def reconfigure(self, config: AutoscalingConfig) -> None:
        """Use ``config`` from now on. Metrics are kept; a pending streak is dropped, and so is
        the policy state when the policy changed. Raises like :func:`load_policy`."""
        default = config.policy.is_default_policy_function()
        policy = None if default else load_policy(config.policy)
        keep = config.policy == self.config.policy
        self.config, self._policy = config, policy
        self.state = DecisionState(policy_state=self.state.policy_state if keep else {})

    @property
    def lower_bound(self) -> int:
        """``min_replicas`` (``initial_replicas`` while capacity scales up) scaled by capacity."""
        initial = self.config.initial_replicas
        low = initial if initial is not None and self.capacity_direction == "UP" else self.config.min_replicas
        return capacity_adjusted(low, self.target_capacity)

    @property
    def upper_bound(self) -> int:
        """``max_replicas`` scaled by capacity."""
        return capacity_adjusted(self.config.max_replicas, self.target_capacity)

    def apply_bounds(self, num_replicas: int) -> int:
        """``num_replicas`` clamped to the capacity-adjusted bounds."""
        return max(self.lower_bound, min(self.upper_bound, num_replicas))

    def observe(self, source_id: str, value: float, now: float, *, queued: bool = False) -> None:
        """Record a sample; ``queued=True`` marks a router's queue (else a replica's load)."""
        self.window.record(source_id, value, now)
        (self._routers.add if queued else self._routers.discard)(source_id)

    def forget(self, source_id: str) -> None:
        """Drop a replica or router that went away, with its samples."""
        self.window.forget(source_id)
        self._routers.discard(source_id)

    def context(
        self,
        now: float,
        current_num_replicas: int,
        current_target: int,
        running_replicas: Iterable[Any] = (),
    ) -> AutoscalingContext:
        """What a policy sees this tick (its ``policy_state`` is this deployment's last one)."""
        cfg, dep = self.config, self.deployment_id
        look_back_s, agg = cfg.look_back_period_s, cfg.aggregation_function
        total = self.window.total(now, look_back_s, agg)
        self._routers &= self.window.sources
        queued = self.window.total(now, look_back_s, agg, sources=self._routers)
        return AutoscalingContext(
            deployment_id=dep,
            deployment_name=dep.name,
            app_name=dep.app_name,
            current_num_replicas=current_num_replicas,
            target_num_replicas=current_target,
            running_replicas=list(running_replicas),
            total_num_requests=total,
            total_queued_requests=queued if self._routers else None,
            aggregated_metrics={},
            raw_metrics={},
            capacity_adjusted_min_replicas=self.lower_bound,
            capacity_adjusted_max_replicas=self.upper_bound,
            policy_state=dict(self.state.policy_state),
            last_scale_up_time=self.last_scale_up_time,
            last_scale_down_time=self.last_scale_down_time,
            current_time=now,
            config=cfg,
        )

    def target(
        self,
        now: float,
        current_num_replicas: int,
        current_target: int,
        running_replicas: Iterable[Any] = (),
        *,
        policy: PolicyFn | None = None,
    ) -> int:
        """Run one tick and return the new target number of replicas.

        ``current_num_replicas`` counts running replicas, ``current_target`` is the target the
        controller is working towards. ``policy`` replaces the deployment's own policy for this
        tick (an application-level decision).
        """
        ctx = self.context(now, current_num_replicas, current_target, running_replicas)
        try:
            result, desired, self.state = decide_desired(ctx, self.config, self.state, now, policy or self._policy)
        except Exception:
            logger.exception("autoscaling policy of %s failed; target stays", self.deployment_id)
            return current_target
        self.last_desired, self.last_total_requests = desired, ctx.total_num_requests
        if result > current_target:
            self.last_scale_up_time = now
        elif result < current_target:
            self.last_scale_down_time = now
        return result


class AppPolicy:
    """An application-level autoscaling policy (module docstring), shared by the autoscalers of
    one application's deployments. Raises like :func:`load_policy` when made."""

    def __init__(self, app_name: str, policy: AutoscalingPolicy) -> None:
        self.app_name = app_name
        self.policy = policy
        self._fn = load_policy(policy)

    def targets(self, members: Mapping[DeploymentID, tuple[Autoscaler, int, int]], now: float) -> dict[DeploymentID, int]:
        """New targets for ``{deployment_id: (autoscaler, running replicas, target)}``.

        A policy that raises or returns something malformed is logged and every target stays.
        """
        contexts = {dep: a.context(now, current, target) for dep, (a, current, target) in members.items()}
        unchanged = {dep: target for dep, (_, _, target) in members.items()}
        try:
            decisions, states = self._decisions(contexts)
        except Exception:
            logger.exception("autoscaling policy of application '%s' failed; targets stay", self.app_name)
            return unchanged
        result = dict(unchanged)
        for dep, (autoscaler, current, target) in members.items():
            policy_state = dict(states.get(dep) or {})
            if dep in decisions:
                result[dep] = autoscaler.target(now, current, target, policy=_Fixed(decisions[dep], policy_state))
            else:
                autoscaler.state = dataclasses.replace(autoscaler.state, policy_state=policy_state)
        return result

    def _decisions(
        self, contexts: dict[DeploymentID, AutoscalingContext]
    ) -> tuple[Mapping[DeploymentID, float], Mapping[DeploymentID, Any]]:
        fn: Callable[[dict[DeploymentID, AutoscalingContext]], Any] = self._fn  # type: ignore[assignment]
        returned = fn(contexts)
        if not (isinstance(returned, (tuple, list)) and len(returned) == 2):
            raise TypeError(
                "an application-level autoscaling policy must return "
                f"(Dict[DeploymentID, int], Dict[DeploymentID, dict]), got {returned!r}."
            )
        decisions, states = returned[0], returned[1] or {}
        if not isinstance(decisions, Mapping) or not isinstance(states, Mapping):
            raise TypeError(
                "Autoscaling policy must return a dictionary of deployment_name -> decision_num_replicas"
            )
        for dep in list(decisions) + list(states):
            if dep not in contexts:
                raise ValueError(f"Deployment {dep} is not registered")
        return decisions, states


@dataclasses.dataclass(frozen=True)
class _Fixed:
    """A policy that returns one application-level decision for one deployment."""

    num_replicas: float
    policy_state: dict[str, Any]

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        return self.num_replicas, self.policy_state
