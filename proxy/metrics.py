"""The proxy's HTTP ingress metrics, under Ray Serve 2.60's names, labels and meaning.

Ray's proxy records, per request it answers (``RequestIngressMetrics`` for HTTP):

- ``ray_serve_num_http_requests_total`` {route, method, application, status_code}
- ``ray_serve_http_request_latency_ms`` {method, route, application, status_code}: a histogram
  with Ray's ``LATENCY_BUCKETS_MS``, from the route match to the last response message sent;
- on an error (HTTP status 4xx/5xx; a WebSocket closed with a code other than 1000/1001, or by
  its client): ``ray_serve_num_http_error_requests_total`` {route, error_code, method,
  application} and ``ray_serve_num_deployment_http_error_requests_total`` {deployment,
  error_code, method, route, application};
- ``ray_serve_num_ongoing_http_requests`` {node_id, node_ip_address}: requests to an
  application being answered now (not ``/-/healthz``, ``/-/routes`` or 404s).

Label values, as Ray sets them:

- ``route`` is the application's route prefix that matched (Ray narrows it to the FastAPI route
  pattern, such as ``/api/{user_id}``, when it knows the app's routes; shoal does not, so it is
  always the prefix). A path no route matches is a 404 with ``route`` "" (not the path: that
  would make any client able to create series), ``application`` and ``deployment`` "".
  ``/-/healthz`` and ``/-/routes`` are counted too, with their path as ``route`` and
  ``application`` "", 503 while the proxy drains or has no routes yet.
- ``method`` is the HTTP method, ``"WS"`` for a WebSocket. ``deployment`` is the ingress.
- ``status_code`` is the status the response started with; a response that fails after it
  started (timeout, replica death, client gone) keeps it. Before the response starts: 408 for
  ``request_timeout_s``, 499 when the client disconnected, 503 for backpressure (or the
  deployment's ``backpressure_config`` status), for an unavailable deployment and at the end of a
  drain, 413 for a body over ``max_request_body_bytes``, 500 for anything else. A WebSocket's is
  the close code its app sent, or the code its client disconnected with.
- ``node_id`` is the machine's host name and ``node_ip_address`` the address the proxy listens
  on (Ray: the Ray node's id and IP).

shoal also counts what its HTTP protocol refuses before a request reaches the app (431 for a
head over ``max_header_bytes``/``max_header_count``, 408 for a head not received within
``request_header_timeout_s``, 400 for a malformed or unsupported request): in the request and
error counters with ``route``, ``application`` and ``deployment`` "", not in the latency
histogram. Ray's uvicorn answers those without telling Ray, so Ray does not count them.

Cost per request: a few Python int additions. The children of a (route, method, status) are
bound once; counts, latencies (per bucket) and the number of ongoing requests are flushed into
them every ``metrics_batch.FLUSH_INTERVAL_S`` (100 ms) by ``flush``, which the proxy runs
periodically and once more before it exits.
"""

from __future__ import annotations

from typing import Any

from shoal.runtime import metrics
from shoal.runtime.metrics_batch import PendingHistogram

WEBSOCKET_METHOD = "WS"
CLIENT_CLOSED_STATUS = 499  # Ray's status for a client that disconnected before the response


class _Outcome:
    """The pending samples of one (route, method, status): requests, latencies, errors."""

    __slots__ = ("errors", "latency", "n", "requests")

    def __init__(self, requests: Any, latency: PendingHistogram | None, errors: tuple[Any, ...]) -> None:
        self.n = 0
        self.requests = requests
        self.latency = latency
        self.errors = errors

    def flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self.requests.inc(n)
            for child in self.errors:
                child.inc(n)
        if self.latency is not None:
            self.latency.flush()


class RouteMetrics:
    """The series of one (route, application, deployment): ``record`` one answered request.
    Untimed ones (``timed=False``: requests refused before the app) have no latency series."""

    __slots__ = ("_outcomes", "_owner", "_timed", "application", "deployment", "route")

    def __init__(self, owner: IngressMetrics, route: str, application: str, deployment: str, *,
                 timed: bool = True) -> None:
        self._owner = owner
        self._timed = timed
        self.route = route
        self.application = application
        self.deployment = deployment
        self._outcomes: dict[tuple[str, str, bool], _Outcome] = {}

    def record(self, method: str, status_code: str, latency_ms: float, is_error: bool) -> None:
        """One answered request (``latency_ms`` is ignored if untimed)."""
        key = (method, status_code, is_error)
        outcome = self._outcomes.get(key)
        if outcome is None:
            outcome = self._outcomes[key] = self._bind(method, status_code, is_error)
        outcome.n += 1
        if outcome.latency is not None:
            outcome.latency.observe(latency_ms)

    def flush(self) -> None:
        for outcome in self._outcomes.values():
            outcome.flush()

    def _bind(self, method: str, status_code: str, is_error: bool) -> _Outcome:
        o = self._owner
        tags = {"route": self.route, "method": method, "application": self.application, "status_code": status_code}
        errors: tuple[Any, ...] = ()
        if is_error:
            error_tags = {"route": self.route, "error_code": status_code, "method": method, "application": self.application}
            errors = (o.error_requests.bind(error_tags),
                      o.deployment_error_requests.bind({**error_tags, "deployment": self.deployment}))
        latency = PendingHistogram(o.latency_ms.bind(tags), o.latency_ms.boundaries) if self._timed else None
        return _Outcome(o.requests.bind(tags), latency, errors)


def is_http_error(status: int) -> bool:
    """Ray's rule for HTTP: a status starting with 4 or 5."""
    return 400 <= status < 600


def is_websocket_error(code: int) -> bool:
    """Ray's rule for a WebSocket its app closed: any code but 1000 (normal) and 1001 (going away)."""
    return code not in (1000, 1001)


class IngressMetrics:
    """The proxy's ingress series (one per proxy process). The proxy keeps ``ongoing`` (requests
    to applications being answered) and records each answered request in ``for_route``'s
    series; ``flush`` pushes both out (loop thread only)."""

    def __init__(self, node_id: str, node_ip_address: str, protocol: str = "HTTP") -> None:
        """``protocol``: ``"HTTP"`` or ``"gRPC"`` (the gRPC server's series, Ray's
        ``ray_serve_num_grpc_requests_total`` ...: same labels, ``method`` is the RPC's path,
        ``route`` its application, ``status_code`` the gRPC status name)."""
        p = protocol.lower()
        self.requests = metrics.Counter(
            f"serve_num_{p}_requests", description=f"The number of {protocol} requests processed.",
            tag_keys=("route", "method", "application", "status_code"),
        )
        self.error_requests = metrics.Counter(
            f"serve_num_{p}_error_requests", description=f"The number of errored {protocol} responses.",
            tag_keys=("route", "error_code", "method", "application"),
        )
        self.deployment_error_requests = metrics.Counter(
            f"serve_num_deployment_{p}_error_requests",
            description=f"The number of errored {protocol} responses returned by each deployment.",
            tag_keys=("deployment", "error_code", "method", "route", "application"),
        )
        self.latency_ms = metrics.Histogram(
            f"serve_{p}_request_latency_ms",
            description=f"The end-to-end latency of {protocol} requests (measured from the Serve {protocol} proxy).",
            boundaries=metrics.LATENCY_BUCKETS_MS,
            tag_keys=("method", "route", "application", "status_code"),
        )
        self.ongoing_requests = metrics.Gauge(
            f"serve_num_ongoing_{p}_requests", description=f"The number of ongoing requests in this {protocol} proxy.",
            tag_keys=("node_id", "node_ip_address"),
        )
        self.ongoing = 0
        self._ongoing_gauge = self.ongoing_requests.bind({"node_id": node_id, "node_ip_address": node_ip_address})
        self._ongoing_gauge.set(0)
        self._ongoing_set = 0
        self._routes: dict[str, RouteMetrics] = {}
        self._unrouted = RouteMetrics(self, "", "", "")
        self._refused = RouteMetrics(self, "", "", "", timed=False)

    def for_route(self, route: str, application: str, deployment: str) -> RouteMetrics:
        """The series of requests matched to ``route`` (a prefix, or a system path)."""
        found = self._routes.get(route)
        if found is None or found.application != application or found.deployment != deployment:
            if found is not None:
                found.flush()  # the route now serves another application
            found = self._routes[route] = RouteMetrics(self, route, application, deployment)
        return found

    def unrouted(self) -> RouteMetrics:
        """The series of requests no route matched (404)."""
        return self._unrouted

    def refused(self, status: int, method: str) -> None:
        """A request the HTTP protocol refused before it reached the proxy's app."""
        self._refused.record(method, str(status), 0.0, is_http_error(status))

    def flush(self) -> None:
        for route in self._routes.values():
            route.flush()
        self._unrouted.flush()
        self._refused.flush()
        if self.ongoing != self._ongoing_set:
            self._ongoing_set = self.ongoing
            self._ongoing_gauge.set(self.ongoing)
