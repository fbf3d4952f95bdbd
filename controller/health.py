"""Health checks: each running replica's ``check_health`` every ``health_check_period_s``.

A check that raises or does not answer within ``health_check_timeout_s`` counts as a failure
(a replica whose event loop is blocked cannot answer, so it fails too); three failures in a row
(Ray's threshold) and ``on_unhealthy`` is called once. A success resets the count.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from shoal.controller.replica_control import HEALTH_METHOD, ReplicaControl

logger = logging.getLogger("shoal.controller")

UNHEALTHY_THRESHOLD = 3


class HealthMonitor:
    def __init__(
        self,
        control: ReplicaControl,
        *,
        period_s: float,
        timeout_s: float,
        on_unhealthy: Callable[[str], None],
        name: str,
    ) -> None:
        self._control = control
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._on_unhealthy = on_unhealthy
        self._name = name
        self.failures = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self._control.call(HEALTH_METHOD, timeout_s=self._timeout_s)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                error = f"check_health did not answer within {self._timeout_s}s (is the event loop blocked?)"
            except Exception as exc:
                error = f"check_health raised: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            else:
                self.failures = 0
                continue
            self.failures += 1
            logger.warning("%s: health check failed (%d/%d): %s", self._name, self.failures, UNHEALTHY_THRESHOLD, error)
            if self.failures >= UNHEALTHY_THRESHOLD:
                self._on_unhealthy(error)
                return

    def stop(self) -> None:
        self._task.cancel()
