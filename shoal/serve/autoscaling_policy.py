"""Autoscaling policies (Ray Serve's ``ray.serve.autoscaling_policy``).

A policy is a pure function of an :class:`~shoal.serve.config.AutoscalingContext` that returns
``(num_replicas, policy_state)``. The default, :func:`replica_queue_length_autoscaling_policy`
(also exported as ``default_autoscaling_policy``), sizes a deployment so that each replica holds
about ``target_ongoing_requests`` requests (running plus queued):

1. Cold start: with no running replica and at least one request anywhere, ask for
   ``max(ceil(upscaling_factor), target_num_replicas)`` replicas.
2. No running replica and no request: keep ``target_num_replicas``.
3. Otherwise the ideal size is ``desired = total_num_requests / target_ongoing_requests``.
4. Move only part of the way there: ``ceil(current + factor * (desired - current))``, where
   ``factor`` is the upscaling or the downscaling factor (1.0 unless configured). When that rounds
   back to ``current`` although ``ceil(desired) < current``, step down by one anyway, so a small
   downscaling factor cannot leave a deployment stuck one replica too large.

The policy does not wait or clamp. The controller's wrapper (``shoal.controller.autoscale``) runs
every policy, this one and custom ones, behind the same cold-start path, upscale/downscale delays
and ``[min_replicas, max_replicas]`` bounds.
"""

from __future__ import annotations

import math
from typing import Any

from shoal.serve.config import AutoscalingConfig, AutoscalingContext

__all__ = ["default_autoscaling_policy", "replica_queue_length_autoscaling_policy"]

# Float noise must not cost a replica: 6 / 0.3 is 20.000000000000004, which is 20 replicas.
_CEIL_TOLERANCE = 1e-9


def _ceil(x: float) -> int:
    """``math.ceil`` that ignores float noise of up to 1e-9 above an integer."""
    return math.ceil(x - _CEIL_TOLERANCE)


def _cold_start_replicas(config: AutoscalingConfig, target_num_replicas: int) -> int:
    """Step 1: replicas to start at once when requests wait for a deployment with none running."""
    return max(_ceil(1 * config.get_upscaling_factor()), target_num_replicas)


def _apply_scaling_factors(desired: float, current: int, config: AutoscalingConfig) -> int:
    """Step 4: move from ``current`` (> 0) towards ``desired`` by the configured factor."""
    delta = desired - current
    factor = config.get_upscaling_factor() if delta > 0 else config.get_downscaling_factor()
    scaled = _ceil(current + factor * delta)
    if _ceil(desired) < current and scaled == current:
        scaled -= 1  # avoid getting stuck one replica above the goal
    return max(0, scaled)


def replica_queue_length_autoscaling_policy(
    ctx: AutoscalingContext,
) -> tuple[int, dict[str, Any]]:
    """Return ``(num_replicas, policy_state)`` for ``ctx`` (steps 1-4 of the module docstring).

    Reads ``ctx.config`` (an ``AutoscalingConfig``; defaults when None), ``current_num_replicas``,
    ``target_num_replicas`` and ``total_num_requests``. The result is neither delayed nor
    clamped; ``policy_state`` is returned unchanged (this policy keeps no state).
    """
    config = ctx.config if isinstance(ctx.config, AutoscalingConfig) else AutoscalingConfig()
    state = dict(ctx.policy_state)
    current = ctx.current_num_replicas
    if current == 0:
        if ctx.total_num_requests > 0:
            return _cold_start_replicas(config, ctx.target_num_replicas), state
        return ctx.target_num_replicas, state
    desired = ctx.total_num_requests / config.get_target_ongoing_requests()
    return _apply_scaling_factors(desired, current, config), state


default_autoscaling_policy = replica_queue_length_autoscaling_policy
