"""What the reliability tests share: one request's outcome, tallies, and a deployment's pids."""

from __future__ import annotations

import abc
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from shoal import serve


@dataclass
class Outcome:
    """One HTTP request: when it started and ended (monotonic seconds), its status (None: no
    response, a connection error or a hang), the start of its body or the error's name, and
    the replica pid or JSON body it answered with."""

    started: float
    ended: float
    status: int | None
    error: str = ""
    pid: int | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def hung(self) -> bool:
        return self.error == "timeout"


def kinds(outcomes: list[Outcome]) -> dict[str, int]:
    """How many outcomes of each kind: ``200``, ``500 Internal Server Error``, ``ReadError``..."""
    return dict(Counter("200" if o.status == 200 else f"{o.status or ''} {o.error[:60]}".strip() for o in outcomes))


def running_pids(app: str, deployment: str) -> set[int]:
    dep = serve.status().applications[app].deployments[deployment]
    return {r.pid for r in dep.replicas if r.state == "RUNNING" and r.pid}


class Poller(abc.ABC):
    """A thread that runs ``_run`` while the ``with`` block lasts; ``_run`` returns once
    ``self._stop`` is set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @abc.abstractmethod
    def _run(self) -> None:
        """Poll until ``self._stop`` is set."""


class StatusPoll(Poller):
    """Polls ``serve.status()`` for one deployment every 20 ms, handing each sample (or None
    while it does not exist) to ``on_sample(dep, now)``."""

    def __init__(self, app: str, deployment: str, on_sample: Callable[[Any, float], None]) -> None:
        super().__init__()
        self.app, self.deployment, self.on_sample = app, deployment, on_sample

    def _run(self) -> None:
        while not self._stop.is_set():
            app = serve.status().applications.get(self.app)
            self.on_sample(app.deployments.get(self.deployment) if app is not None else None, time.monotonic())
            self._stop.wait(0.02)
