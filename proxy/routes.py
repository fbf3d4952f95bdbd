"""RoutingTable: which application serves a path (longest route prefix first).

A prefix ``p`` matches path ``t`` when ``t`` starts with ``p`` and the match ends at a segment
boundary: ``/a`` matches ``/a``, ``/a/`` and ``/a/x`` but not ``/ab``; ``/`` matches everything.
Tables come from the controller's snapshots; ``version`` says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shoal.runtime.wire import RouteEntry


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    app_name: str
    ingress: str


class RoutingTable:
    def __init__(self, version: int = 0, routes: Mapping[str, RouteEntry] | None = None) -> None:
        self.version = version
        entries = [Route(prefix, v.app_name, v.ingress) for prefix, v in (routes or {}).items()]
        self._routes = sorted(entries, key=lambda r: len(r.prefix), reverse=True)

    def match(self, path: str) -> Route | None:
        for route in self._routes:
            p = route.prefix
            if p == "/" or path == p or (path.startswith(p) and path[len(p)] == "/"):
                return route
        return None

    def as_json(self) -> dict[str, str]:
        """``/-/routes``: prefix -> application name."""
        return {r.prefix: r.app_name for r in sorted(self._routes, key=lambda r: r.prefix)}
