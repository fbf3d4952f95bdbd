"""What the reliability tests share: one request's outcome, tallies, and a deployment's pids."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

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
