"""Logging inside shoal processes.

Replicas log to stderr, which is a pipe to the supervisor; the supervisor prefixes every line with
the deployment and replica, writes it to the replica's log file under the run directory and echoes
it to its own console (the driver's, for a private instance). Log records carry the request id of
the request being served, so a line can be traced back to an HTTP request or handle call.

A replica's ``LoggingConfig`` (the deployment's, else its application's, else the instance's;
see ``install_replica_logging``) decides:

- ``log_level``: the root logger's level (so ``logging.getLogger("ray.serve")`` and the user's own
  loggers follow it);
- ``encoding``: ``TEXT`` lines (``LEVEL time logger request_id [attrs] -- message``) or ``JSON``
  lines with Ray's keys: ``levelname``, ``asctime``, ``message``, ``filename``, ``lineno``,
  ``process``, ``exc_text`` (when there is one), ``deployment``, ``replica``,
  ``component_name`` (``"replica"``), ``application``, and, inside a request, ``request_id`` and
  ``route``;
- ``logs_dir``: when set, the replica also writes its log to
  ``<logs_dir>/replica_<app>_<deployment>_<replica>.log`` (Ray's file name);
- ``enable_access_log``: the replica's access line, one per request, as Ray's replica writes it
  (``METHOD route status latency_ms`` with ``CALL`` and the method name for handle calls, see
  ``AccessLog``), kept or dropped. Access lines go to the log file only (the one under
  ``logs_dir``, else the replica's file in the run directory), never to stderr: the supervisor
  echoes stderr to consoles, and a private instance's console is its driver's stdout;
- ``additional_log_standard_attrs``: extra ``LogRecord`` attributes (``name``, ``funcName``, ...)
  added to every line (before the message in TEXT, as keys in JSON).

Log files rotate by size (``runtime/rotation.py``) with the limits in the replica's spec, which
the supervisor reads once from Ray's ``RAY_ROTATION_MAX_BYTES`` / ``RAY_ROTATION_BACKUP_COUNT``.
A replica's files are written in batches, once per loop iteration, once ``bind_log_files``
names its loop (``runtime/buffered_log.py``): one ``write`` for all the lines of the requests
that ended in an iteration. Its file in the run directory, which the supervisor appends its
stderr lines to, is checked for the supervisor's growth and rotations every
``rotation.SHARED_RECHECK_S``, not before every line.

The proxy is set up the same way by ``install_proxy_logging`` from the instance's global
``logging_config``: ``component_name`` ``proxy``, ``component_id`` its host, file
``proxy_<host>.log``; its access lines are written by ``proxy.access``.

Access lines are the hot path (one per request): ``access_record`` copies a record template
instead of calling ``LogRecord()``, and while the logging set-up is the one installed here
(no handler added by the user) a replica's access line is formatted directly, to the same text
(``_FastAccessLines``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from shoal.runtime.buffered_log import LoopBufferedHandler
from shoal.runtime.context import current_request
from shoal.runtime.rotation import SHARED_RECHECK_S, RotatingLineHandler, RotationLimits, limits_from_env

if TYPE_CHECKING:
    import asyncio

_FORMAT = "%(levelname)s %(asctime)s %(name)s %(request_id)s -- %(message)s"
_ACCESS_LOG_ATTR = "serve_access_log"
_ACCESS_LOGGER = "ray.serve"  # Ray's replica writes its access lines on its serve logger
_access_logger = logging.getLogger(_ACCESS_LOGGER)
_ray_logger = logging.getLogger("ray")
_JSON = json.JSONEncoder(default=str)  # json.dumps(..., default=str) without a new encoder per line
_CONTEXT_KEYS = ("deployment", "replica", "component_name", "component_id", "application", "route")


class _ContextFilter(logging.Filter):
    """Adds the process's facts (``replica_facts``, ``proxy_facts``) and the current request's
    to every record (filters nothing)."""

    def __init__(self, facts: Mapping[str, str]) -> None:
        super().__init__()
        self._facts = dict(facts)

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an access line carries its own
            request = current_request()
            record.request_id = request.request_id or "-"
            if request.route:
                record.route = request.route
        for key, value in self._facts.items():
            setattr(record, key, value)
        return True


class _AccessLogFilter(logging.Filter):
    """Drops access lines (``enable_access_log=False``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _ACCESS_LOG_ATTR, False)


def replica_facts(app: str, deployment: str, replica: str) -> dict[str, str]:
    """What every line of a replica says about it (Ray's keys)."""
    return {"deployment": deployment, "replica": replica, "component_name": "replica", "application": app}


def proxy_facts(host: str) -> dict[str, str]:
    """What every line of the proxy says about it: Ray's proxy is ``component_name`` ``proxy``
    with its node's address as ``component_id``."""
    return {"component_name": "proxy", "component_id": host}


class _Formatter(logging.Formatter):
    """``logging.Formatter`` with ``asctime`` made once per second, not per record (the
    ``strftime`` is most of a short line's formatting cost); the same text as the default."""

    _cached_second = -1
    _cached_asctime = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._cached_second:
            self._cached_asctime = time.strftime(self.default_time_format, self.converter(record.created))
            self._cached_second = second
        return f"{self._cached_asctime},{int(record.msecs):03d}"  # default_msec_format


_asctime_cache: tuple[int, str] = (-1, "")  # (second, its text), replaced whole: safe across threads


def asctime_now() -> str:
    """The current time as ``_Formatter`` writes ``asctime`` (``2026-12-02 10:19:41,123``); the
    part before the comma is made once per second."""
    now_ns = time.time_ns()
    second = now_ns // 1_000_000_000
    cached_second, text = _asctime_cache
    if second != cached_second:
        text = time.strftime(logging.Formatter.default_time_format, time.localtime(second))
        globals()["_asctime_cache"] = (second, text)
    return f"{text},{(now_ns // 1_000_000) % 1000:03d}"


class JSONFormatter(_Formatter):
    """One JSON object per line, with Ray Serve's keys (module docstring)."""

    def __init__(self, additional_attrs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._additional = additional_attrs

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "asctime": self.formatTime(record),
            "levelname": record.levelname,
            "message": record.getMessage(),
            "filename": record.filename,
            "lineno": record.lineno,
            "process": record.process,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_text"] = record.exc_text
        for key in _CONTEXT_KEYS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            out["request_id"] = request_id
        for key in self._additional:
            out[key] = getattr(record, key, None)
        return _JSON.encode(out)


def _text_formatter(additional_attrs: tuple[str, ...]) -> logging.Formatter:
    extra = "".join(f"%({attr})s " for attr in additional_attrs)
    return _Formatter(_FORMAT.replace("-- ", extra + "-- "))


def formatter(config: Mapping[str, Any]) -> logging.Formatter:
    """TEXT or JSON lines, as ``config`` (a ``LoggingConfig`` as a dict) says."""
    additional = tuple(config.get("additional_log_standard_attrs") or ())
    encoding = str(config.get("encoding", "TEXT")).upper()
    return JSONFormatter(additional) if encoding == "JSON" else _text_formatter(additional)


class _OnlyAccessFilter(logging.Filter):
    """Keeps only access lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, _ACCESS_LOG_ATTR, False))


FileFactory = Callable[[str, RotationLimits], logging.Handler]


def _rotating_file(path: str, limits: RotationLimits) -> logging.Handler:
    return RotatingLineHandler(path, limits, shared=False)


def _buffered_file(path: str, limits: RotationLimits) -> logging.Handler:
    """A replica's file under ``logs_dir``: it alone writes it, in batches once bound."""
    return LoopBufferedHandler(path, limits)


def _shared_buffered_file(path: str, limits: RotationLimits) -> logging.Handler:
    """A replica's file in the run directory, shared with the supervisor (see the module doc)."""
    return LoopBufferedHandler(path, limits, shared=True, recheck_s=SHARED_RECHECK_S)


def _handlers(
    config: Mapping[str, Any],
    file_name: str,
    facts: Mapping[str, str],
    default_logs_dir: str | None = None,
    rotation: RotationLimits | None = None,
    file_factory: FileFactory = _rotating_file,
    shared_file_factory: FileFactory | None = _shared_buffered_file,
) -> list[logging.Handler]:
    """stderr, without access lines (it is echoed to consoles and drivers' stdout), and the log
    file ``file_name``: under ``logs_dir`` with every line (this process its only writer: made
    by ``file_factory``), else under ``default_logs_dir`` (the run directory's) with the access
    lines; made by ``shared_file_factory`` when the supervisor writes the stderr lines to that
    file too (a replica's), else (None) by ``file_factory`` (the proxy's). The file rotates by size
    with ``rotation`` (None: Ray's defaults; see ``runtime/rotation.py``)."""
    limits = rotation or RotationLimits()
    line_format = formatter(config)
    access = config.get("enable_access_log", True) is not False
    stream = logging.StreamHandler(sys.stderr)
    stream.addFilter(_AccessLogFilter())
    handlers: list[logging.Handler] = [stream]
    logs_dir = config.get("logs_dir")
    if logs_dir:
        os.makedirs(logs_dir, exist_ok=True)
        file = file_factory(os.path.join(logs_dir, file_name), limits)
        if not access:
            file.addFilter(_AccessLogFilter())
        handlers.append(file)
    elif default_logs_dir and access:
        path = os.path.join(default_logs_dir, file_name)
        file = (shared_file_factory or file_factory)(path, limits)
        file.addFilter(_OnlyAccessFilter())
        handlers.append(file)
    context = _ContextFilter(facts)
    for handler in handlers:
        handler.setFormatter(line_format)
        handler.addFilter(context)
    return handlers


def install_replica_logging(
    *,
    deployment: str,
    replica: str,
    level: str = "INFO",
    logging_config: Mapping[str, Any] | None = None,
    app: str = "",
    default_logs_dir: str | None = None,
    log_rotation: Mapping[str, Any] | None = None,
) -> None:
    """Route the root logger (and so ``logging.getLogger("ray.serve")``) to stderr and the log
    file (see ``_handlers``), formatted as ``logging_config`` (a ``LoggingConfig`` as a dict;
    None: the defaults with ``level``) says. ``replica`` is the full replica id;
    ``log_rotation``: the size limits from the replica's spec (``RotationLimits.to_spec``)."""
    global _fast_access, _access_on
    config = dict(logging_config or {})
    _access_on = config.get("enable_access_log", True) is not False
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    rotation = RotationLimits.from_spec(log_rotation)
    short_id = replica.rsplit("#", 1)[-1]
    facts = replica_facts(app, deployment, short_id)
    root.handlers[:] = _handlers(
        config, f"replica_{app}_{deployment}_{short_id}.log", facts, default_logs_dir, rotation, _buffered_file,
    )
    root.setLevel(config.get("log_level", level))
    _fast_access = None
    files = [h for h in root.handlers if isinstance(h, (RotatingLineHandler, LoopBufferedHandler))]
    if (
        len(files) == 1
        and not any(isinstance(f, _AccessLogFilter) for f in files[0].filters)  # access lines on
        and not config.get("additional_log_standard_attrs")
    ):
        json_lines = str(config.get("encoding", "TEXT")).upper() == "JSON"
        _fast_access = _FastAccessLines(files[0], root.handlers, json_lines=json_lines, facts=facts)


def bind_log_files(loop: asyncio.AbstractEventLoop) -> list[LoopBufferedHandler]:
    """Let the root logger's buffered files (a replica's, see ``install_replica_logging``)
    write what is logged on ``loop``'s thread once per iteration of ``loop`` (call this on that
    thread); returns them. Lines still reach the files before a normal exit: the process calls
    ``logging.shutdown()`` (``worker_main.run_until_complete``), which flushes them."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, LoopBufferedHandler)]
    for file in files:
        file.bind(loop)
    return files


def proxy_log_file_name(host: str, index: int = 0) -> str:
    """Ray's proxy log file name, ``proxy_<address>.log``; the proxies after the first (see
    ``http_options.num_proxies``) write ``proxy_<address>_<index>.log``."""
    return f"proxy_{host}.log" if index == 0 else f"proxy_{host}_{index}.log"


def install_proxy_logging(
    *,
    host: str,
    logging_config: Mapping[str, Any] | None,
    default_logs_dir: str | None,
    log_rotation: Mapping[str, Any] | None = None,
    file_factory: FileFactory = _rotating_file,
    index: int = 0,
) -> list[logging.Handler]:
    """The proxy's logging, as ``install_replica_logging`` sets a replica's up: the root logger
    at ``log_level`` to stderr (which the supervisor echoes with ``(ProxyActor)``) and to
    ``proxy_<host>.log`` (proxy ``index`` > 0: ``proxy_<host>_<index>.log``) (under ``logs_dir`` every line, else under ``default_logs_dir`` the
    access lines), TEXT or JSON, with ``component_name`` ``proxy`` and ``component_id``
    ``host``. Returns the handlers access lines go to (empty when ``enable_access_log`` is
    False): the proxy writes its access lines straight to them (``AccessLine``)."""
    config = dict(logging_config or {})
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.setLevel(config.get("log_level", "INFO"))
    if not root.isEnabledFor(logging.INFO):  # access lines are INFO: none, and no file for them
        config["enable_access_log"] = False
    rotation = RotationLimits.from_spec(log_rotation)
    root.handlers[:] = _handlers(
        config, proxy_log_file_name(host, index), proxy_facts(host), default_logs_dir, rotation, file_factory,
        shared_file_factory=None,
    )
    if config.get("enable_access_log", True) is False:
        return []
    return [h for h in root.handlers if not any(isinstance(f, _AccessLogFilter) for f in h.filters)]


def install_local_logging(app: str, logging_config: Mapping[str, Any]) -> None:
    """Local testing mode (deployments in the driver): the ``ray.serve`` logger, not the
    driver's root logger, takes ``logging_config`` (as Ray configures its ``local_test``
    component); its file under ``logs_dir`` is ``replica_<app>_local_test_-.log``, rotating with
    the driver's ``RAY_ROTATION_*`` limits (there is no supervisor to pass them)."""
    logger = logging.getLogger(_ACCESS_LOGGER)
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = _handlers(
        logging_config, f"replica_{app}_local_test_-.log", replica_facts(app, "local_test", "-"),
        rotation=limits_from_env(),
    )
    logger.propagate = False
    logger.setLevel(logging_config.get("log_level", "INFO"))


_ACCESS_FORMAT = "%s %s %s %.1fms"
_record_templates: dict[tuple[int, int], tuple[dict[str, Any], float]] = {}  # see access_record


def access_record(
    method: str, route: str, status: str | int, latency_ms: float, request_id: str | None = None,
) -> logging.LogRecord:
    """The ``LogRecord`` of one access line (``METHOD route status latency_ms``), carrying
    ``request_id`` unless None (then the context filter adds the current request's). It is a
    copy of a template made once per thread and process (thread, process and logger fields)
    with the time and the line's values set: half the cost of ``LogRecord()``, which looks up
    the caller's path, thread and process every time."""
    key = (threading.get_ident(), os.getpid())
    cached = _record_templates.get(key)
    if cached is None:
        made = logging.LogRecord(_ACCESS_LOGGER, logging.INFO, __file__, 0, _ACCESS_FORMAT, None, None)
        setattr(made, _ACCESS_LOG_ATTR, True)
        cached = _record_templates[key] = (dict(made.__dict__), made.created - made.relativeCreated / 1000)
    template, logging_started_s = cached
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(template)
    now_ns = time.time_ns()
    record.created = now_ns / 1e9
    record.msecs = (now_ns % 1_000_000_000) // 1_000_000 + 0.0
    record.relativeCreated = (record.created - logging_started_s) * 1000
    record.args = (method, route, status, latency_ms)
    if request_id is not None:
        record.request_id = request_id
    return record


class _FastAccessLines:
    """A replica's access lines made here as its formatter would make them (TEXT or JSON, no
    ``additional_log_standard_attrs``; a unit test compares them) and written to its log file:
    no ``LogRecord``, filters or formatter calls. ``install_replica_logging`` sets it up; it is
    used only while the logging set-up is still the one it was made for (``usable``): a user
    who adds a handler to the root, ``ray`` or ``ray.serve`` logger gets records again."""

    __slots__ = ("_facts", "_file", "_installed", "_json", "_pid")

    def __init__(self, file: RotatingLineHandler | LoopBufferedHandler, installed: list[logging.Handler], *, json_lines: bool,
                 facts: Mapping[str, str]) -> None:
        self._file = file
        self._installed = list(installed)
        self._json = json_lines
        self._facts = dict(facts)
        self._pid = os.getpid()

    def usable(self) -> bool:
        return not _access_logger.handlers and not _ray_logger.handlers and logging.getLogger().handlers == self._installed

    def write(self, method: str, route: str, status: str | int, latency_ms: float, request_id: str) -> None:
        message = f"{method} {route} {status} {latency_ms:.1f}ms"
        route_field = ""
        if not request_id:  # as _ContextFilter: the current request's id and route
            request = current_request()
            request_id, route_field = request.request_id or "-", request.route
        asctime = asctime_now()
        if self._json:
            fields: dict[str, Any] = {
                "asctime": asctime, "levelname": "INFO", "message": message, "filename": _FILENAME,
                "lineno": 0, "process": self._pid, **self._facts,
            }
            if route_field:
                fields["route"] = route_field
            if request_id != "-":
                fields["request_id"] = request_id
            text = _JSON.encode(fields)
        else:
            text = f"INFO {asctime} {_ACCESS_LOGGER} {request_id} -- {message}"
        self._file.write_line(text)


_fast_access: _FastAccessLines | None = None
_FILENAME = os.path.basename(__file__)
_access_on = True  # the replica's logging_config allows access lines (else none is even made)


def log_access(method: str, route: str, status: str | int, latency_ms: float, *, request_id: str = "") -> None:
    """Write one access line as Ray's replica does: ``METHOD route status latency_ms``, e.g.
    ``GET /api 200 3.1ms`` for HTTP and ``CALL __call__ OK 0.4ms`` for a handle call (status
    ``OK``, ``ERROR`` or ``CANCELLED``). Dropped when the replica's ``enable_access_log`` is
    False."""
    logger = _access_logger
    if _access_on and logger.isEnabledFor(logging.INFO):
        fast = _fast_access
        if fast is not None and fast.usable():
            fast.write(method, route, status, latency_ms, request_id)
        else:
            logger.handle(access_record(method, route, status, latency_ms, request_id or None))


class AccessLog:
    """Times one request at a replica and writes its access line when it ends (``end``).

    A handle call logs ``CALL <method> OK|ERROR|CANCELLED``; an HTTP request (after ``http``)
    logs ``<HTTP method> <route> <status code>``, the code taken from the response start that
    rides on the final reply, 500 for an error, and 200 for a response already streamed out.
    """

    __slots__ = ("_enabled", "_request_id", "_route", "_started_s", "final", "method", "route")

    def __init__(self, call_method: str, route: str, request_id: str, *, enabled: bool = True) -> None:
        """``enabled=False``: no line (the supervisor's health checks and metric polls)."""
        self._started_s = time.perf_counter()
        self._request_id = request_id
        self._enabled = enabled
        self._route = route
        self.method = "CALL"
        self.route = call_method
        self.final: Iterable[Mapping[str, Any]] = ()  # an HTTP request's final ASGI messages

    def http(self, scope: Mapping[str, Any]) -> None:
        """The request is HTTP (or a WebSocket): log it by method and route."""
        self.method = str(scope.get("method") or "WS")
        self.route = self._route or str(scope.get("path") or "/")

    def end(self, outcome: str) -> None:
        """``outcome``: ``ERROR``, ``CANCELLED``, or anything else for success (the name of the
        final reply's kind)."""
        if not self._enabled:
            return
        status: str | int = outcome if outcome in ("ERROR", "CANCELLED") else "OK"
        if self.method != "CALL" and status != "CANCELLED":
            status = 500 if status == "ERROR" else 200
            for message in self.final:
                if message.get("type") == "http.response.start":
                    status = int(message.get("status", 200))
        latency_ms = (time.perf_counter() - self._started_s) * 1000
        log_access(self.method, self.route, status, latency_ms, request_id=self._request_id)


def replica_prefix(app: str, deployment: str, replica_id: str, pid: int) -> str:
    """The prefix the supervisor puts on a replica's output lines (Ray's format)."""
    return f"(ServeReplica:{app}:{deployment} pid={pid}, replica={replica_id.rsplit('#', 1)[-1]})"
