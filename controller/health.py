"""Health checks: a running replica's ``check_health`` every ``health_check_period_s``.

A check that raises or does not answer within ``health_check_timeout_s`` counts as a failure
(a replica whose event loop is blocked cannot answer, so it fails too); three failures in a row
(Ray's threshold) and ``on_unhealthy`` is called once, ending the loop. A success resets the
count. The caller runs ``monitor_health`` as a task it keeps, and cancels it to stop checking.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shoal.controller.replica_control import HEALTH_METHOD, ReplicaControl

logger = logging.getLogger("shoal.controller")

UNHEALTHY_THRESHOLD = 3


async def monitor_health(
    control: ReplicaControl,
    *,
    period_s: float,
    timeout_s: float,
    on_unhealthy: Callable[[str], None],
    name: str,
) -> None:
    failures = 0
    while True:
        await asyncio.sleep(period_s)
        try:
            await control.call(HEALTH_METHOD, timeout_s=timeout_s)
        except TimeoutError:
            error = f"check_health did not answer within {timeout_s}s (is the event loop blocked?)"
        except Exception as exc:
            text = str(exc).strip()
            error = f"check_health raised: {text.splitlines()[0] if text else type(exc).__name__}"
        else:
            failures = 0
            continue
        failures += 1
        logger.warning("%s: health check failed (%d/%d): %s", name, failures, UNHEALTHY_THRESHOLD, error)
        if failures >= UNHEALTHY_THRESHOLD:
            on_unhealthy(error)
            return
