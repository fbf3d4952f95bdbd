"""Logging inside shoal processes.

Replicas log to stderr, which is a pipe to the supervisor; the supervisor prefixes every line with
the deployment and replica, writes it to the replica's log file under the run directory and echoes
it to its own console (the driver's, for a private instance). Log records carry the request id of
the request being served, so a line can be traced back to an HTTP request or handle call.
"""

from __future__ import annotations

import logging
import sys

from shoal.runtime.context import current_request

_FORMAT = "%(levelname)s %(asctime)s %(name)s %(request_id)s -- %(message)s"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request().request_id or "-"
        return True


def install_replica_logging(*, deployment: str, replica: str, level: str = "INFO") -> None:
    """Route the root logger (and so ``logging.getLogger("ray.serve")``) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def replica_prefix(app: str, deployment: str, replica_id: str, pid: int) -> str:
    """The prefix the supervisor puts on a replica's output lines (Ray's format)."""
    return f"(ServeReplica:{app}:{deployment} pid={pid}, replica={replica_id.rsplit('#', 1)[-1]})"
