"""Health checks and routing stats: what the supervisor asks each running replica, periodically.

``monitor_health``: the replica's ``check_health`` every ``health_check_period_s``; each
check's duration in milliseconds and whether it failed go to ``on_checked`` (the metrics).

A check that raises or does not answer within ``health_check_timeout_s`` counts as a failure
(a replica whose event loop is blocked cannot answer, so it fails too); three failures in a row
(Ray's threshold) and ``on_unhealthy`` is called once, ending the loop. A success resets the
count. The caller runs ``monitor_health`` as a task it keeps, and cancels it to stop checking.

``monitor_routing_stats``: the replica's ``record_routing_stats()`` at once, then about every
``request_routing_stats_period_s`` (times 0.9 to 1.1, so replicas do not line up), each call
bounded by ``request_routing_stats_timeout_s``; each result goes to ``on_stats`` (still encoded:
the supervisor never decodes user values), which puts it in the routing snapshot. A failure or
a timeout is logged and the previous stats stay. A deployment without the method is asked once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from shoal.controller.replica_control import HEALTH_METHOD, ROUTING_STATS_METHOD, ReplicaControl

logger = logging.getLogger("shoal.controller")

UNHEALTHY_THRESHOLD = 3


async def monitor_health(
    control: ReplicaControl,
    *,
    period_s: float,
    timeout_s: float,
    on_unhealthy: Callable[[str], None],
    name: str,
    on_checked: Callable[[float, bool], None] = lambda latency_ms, failed: None,
) -> None:
    failures = 0
    while True:
        await asyncio.sleep(period_s)
        started = time.monotonic()
        try:
            await control.call(HEALTH_METHOD, timeout_s=timeout_s)
        except TimeoutError:
            error = f"check_health did not answer within {timeout_s}s (is the event loop blocked?)"
        except Exception as exc:
            text = str(exc).strip()
            error = f"check_health raised: {text.splitlines()[0] if text else type(exc).__name__}"
        else:
            on_checked((time.monotonic() - started) * 1000, False)
            failures = 0
            continue
        on_checked((time.monotonic() - started) * 1000, True)
        failures += 1
        logger.warning("%s: health check failed (%d/%d): %s", name, failures, UNHEALTHY_THRESHOLD, error)
        if failures >= UNHEALTHY_THRESHOLD:
            on_unhealthy(error)
            return


async def monitor_routing_stats(
    control: ReplicaControl,
    *,
    period_s: Callable[[], float],
    timeout_s: Callable[[], float],
    on_stats: Callable[[int, bytes], None],
    name: str,
    rng: random.Random | None = None,
) -> None:
    """``period_s`` and ``timeout_s`` are read before each call (a redeploy may change them)."""
    rng = rng or random.Random()
    while True:
        timeout = timeout_s()
        try:
            encoded: Any = await control.call(ROUTING_STATS_METHOD, timeout_s=timeout)
        except TimeoutError:
            logger.warning("Didn't receive routing stats response for replica %s after %ss, retrying.", name, timeout)
        except Exception as exc:
            text = str(exc).strip()
            logger.warning("record_routing_stats of replica %s raised: %s", name,
                           text.splitlines()[-1] if text else type(exc).__name__)
        else:
            if encoded is None:
                return  # the deployment has no record_routing_stats
            enc, data = encoded
            on_stats(int(enc), bytes(data))
        await asyncio.sleep(period_s() * rng.uniform(0.9, 1.1))
