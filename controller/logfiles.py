"""Reading an instance's log files, for ``shoal logs``: which files, their labels, filters, and
the merge of their lines in time order.

``<run dir>/logs/`` holds ``replica_<app>_<deployment>_<replica>.log`` (a replica's output, as
the supervisor received it, and its access lines), ``proxy_<host>.log`` (the proxy's access
lines; its other lines reach the supervisor's console) and, for a detached instance,
``supervisor.log`` (the supervisor's console: its own lines, the proxy's lines prefixed
``(ProxyActor)``, and the replicas' lines again, which are skipped here since their files hold
them). Each line is printed behind a label like the console's prefixes:
``(ServeReplica:<app>:<deployment> replica=<id>)``, ``(ProxyActor)`` for the proxy's; supervisor
lines keep the prefix they have, or get ``(shoal supervisor)``. Without filters every file is
shown; ``--app``/``--deployment``/``--replica`` select replica files only, and ``proxy`` (``shoal
logs --proxy``) the proxy's file and the proxy's lines in the supervisor's.

Lines are merged by their timestamp (a TEXT line's ``asctime``, a JSON line's ``asctime`` key):
a line without one keeps the time of the line before it in its file (lines before the first
timestamp sort first), and the lines of one file always stay in their order. Everything here but
``Tail.poll`` (which reads files) is pure.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SUPERVISOR_LOG = "supervisor.log"
_REPLICA_FILE = re.compile(r"^replica_(?P<middle>.+)_(?P<replica>[^_]+)\.log$")
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:[,.](\d{1,6}))?")
_TIMESTAMP_WITHIN_CHARS = 120  # a TEXT line's asctime follows its level (and a console prefix)
_REPLICA_ECHO = "(ServeReplica:"
_PROXY_FILE = re.compile(r"^proxy_.+\.log$")
PROXY_LABEL = "(ProxyActor)"  # the supervisor's prefix for the proxy's console lines
_EARLIEST = datetime.min


@dataclass(frozen=True)
class LogFile:
    """One log file: ``app``/``deployment``/``replica`` for a replica's, all None otherwise.

    A replica file's name cannot say where the application name ends when names hold ``_``;
    ``candidates`` are every (app, deployment) split of it and filters match any of them."""

    path: Path
    candidates: tuple[tuple[str, str], ...] = ()
    replica: str | None = None
    is_proxy: bool = False

    @property
    def is_replica(self) -> bool:
        return self.replica is not None

    def label(self, app: str | None = None, deployment: str | None = None) -> str:
        """The console-style prefix of this file's lines (with filters, of the split they chose);
        ``""`` for the supervisor's, whose lines keep their own prefix (see ``keyed``)."""
        if self.is_proxy:
            return PROXY_LABEL
        if not self.is_replica:
            return "" if self.path.name == SUPERVISOR_LOG else f"({self.path.stem})"
        chosen = [c for c in self.candidates if _split_matches(c, app, deployment)] or list(self.candidates)
        app_name, dep_name = chosen[0]
        return f"(ServeReplica:{app_name}:{dep_name} replica={self.replica})"

    def matches(self, app: str | None, deployment: str | None, replica: str | None, proxy: bool = False) -> bool:
        """Whether the filters select this file: with ``proxy``, the proxy's and the
        supervisor's (for its ``(ProxyActor)`` lines, see ``keyed``); with any other filter,
        only replica files match."""
        if proxy:
            return self.is_proxy or self.path.name == SUPERVISOR_LOG
        if app is None and deployment is None and replica is None:
            return True
        if not self.is_replica:
            return False
        if replica is not None and replica.rsplit("#", 1)[-1] != self.replica:
            return False
        return any(_split_matches(c, app, deployment) for c in self.candidates)


def _split_matches(candidate: tuple[str, str], app: str | None, deployment: str | None) -> bool:
    return (app is None or candidate[0] == app) and (deployment is None or candidate[1] == deployment)


def classify(path: Path) -> LogFile:
    """What the file at ``path`` is, from its name."""
    if _PROXY_FILE.match(path.name):
        return LogFile(path, is_proxy=True)
    match = _REPLICA_FILE.match(path.name)
    if match is None:
        return LogFile(path)
    middle = match.group("middle")
    splits = tuple(
        (middle[:i], middle[i + 1 :]) for i, char in enumerate(middle) if char == "_" and 0 < i < len(middle) - 1
    )
    if not splits:
        return LogFile(path)
    return LogFile(path, splits, match.group("replica"))


def timestamp(line: str) -> datetime | None:
    """The time a line was logged: a JSON line's ``asctime``, else the first date-time near the
    start of a TEXT line (``2026-12-02 10:19:41,123``); None if it has neither."""
    text = line
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            text = str(record.get("asctime", ""))
    match = _TIMESTAMP.search(text[:_TIMESTAMP_WITHIN_CHARS])
    if match is None:
        return None
    date, clock, fraction = match.groups()
    try:
        parsed = datetime.fromisoformat(f"{date} {clock}")
    except ValueError:
        return None
    if fraction:
        parsed = parsed.replace(microsecond=int(fraction.ljust(6, "0")))
    return parsed


@dataclass(order=True)
class Line:
    """One line to print: sorted by ``at`` (its own or inherited time)."""

    at: datetime
    text: str = field(compare=False)


def keyed(
    lines: Iterable[str], label: str, last: datetime = _EARLIEST, skip_echoes: bool = False, only: str | None = None,
) -> tuple[list[Line], datetime]:
    """The lines of one file as ``Line``s labelled ``label`` (``""``: a line already prefixed
    ``(...)`` keeps its own), each at its timestamp or ``last``'s; also the last time seen.
    ``skip_echoes`` drops the supervisor's copies of replica lines; ``only`` keeps only the
    lines starting with it (the supervisor's copies of the proxy's, for ``--proxy``)."""
    out: list[Line] = []
    for text in lines:
        if skip_echoes and text.startswith(_REPLICA_ECHO):
            continue
        if only is not None and not text.startswith(only):
            continue
        at = timestamp(text)
        if at is not None:
            last = at
        prefix = label
        if not label:
            prefix = "" if text.startswith("(") else "(shoal supervisor)"
        out.append(Line(last, f"{prefix} {text}" if prefix else text))
    return out, last


def merge(per_file: Iterable[list[Line]]) -> Iterator[str]:
    """The lines of all files in time order; each file's lines keep their order."""
    for line in heapq.merge(*per_file):
        yield line.text


def select(
    logs_dir: Path, app: str | None, deployment: str | None, replica: str | None, proxy: bool = False,
) -> list[LogFile]:
    """The ``*.log`` files of ``logs_dir`` the filters select, by name."""
    if not logs_dir.is_dir():
        return []
    files = (classify(p) for p in sorted(logs_dir.glob("*.log")) if p.is_file())
    return [f for f in files if f.matches(app, deployment, replica, proxy)]


class Tail:
    """Follows the selected files of a logs directory: each ``poll`` returns the complete lines
    written since the last one (new files included), merged in time order."""

    def __init__(
        self, logs_dir: Path, app: str | None = None, deployment: str | None = None, replica: str | None = None,
        proxy: bool = False,
    ) -> None:
        self._dir = logs_dir
        self._filters = (app, deployment, replica)
        self._proxy = proxy
        self._offsets: dict[Path, int] = {}
        self._last: dict[Path, datetime] = {}

    def poll(self) -> list[str]:
        app, deployment, _ = self._filters
        batches: list[list[Line]] = []
        for log_file in select(self._dir, *self._filters, proxy=self._proxy):
            lines = self._read_new(log_file.path)
            if not lines:
                continue
            supervisor = log_file.path.name == SUPERVISOR_LOG
            keyed_lines, self._last[log_file.path] = keyed(
                lines, log_file.label(app, deployment), self._last.get(log_file.path, _EARLIEST),
                skip_echoes=supervisor, only=PROXY_LABEL if supervisor and self._proxy else None,
            )
            batches.append(keyed_lines)
        return list(merge(batches))

    def _read_new(self, path: Path) -> list[str]:
        """The complete lines after this file's offset (a partial last line waits)."""
        offset = self._offsets.get(path, 0)
        try:
            with path.open("rb") as handle:
                if handle.seek(0, 2) < offset:  # truncated or replaced: from the start
                    offset = 0
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offsets[path] = offset + end
        return data[:end].decode("utf-8", "replace").splitlines()
