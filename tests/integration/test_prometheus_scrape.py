"""A real Prometheus server (the operating system's package) scrapes an instance.

Prometheus runs from ``/usr/bin/prometheus`` with a generated configuration (scrape every second,
the instance's metrics URL as the only target, storage under the test's tmp_path, listening on
127.0.0.1 port 0: the port it took is read from its log). The tests query counters through
Prometheus's HTTP API until they have the expected values, and ``promtool check metrics`` lints
the exposition. Without the binaries (``apt-get install prometheus``; ``.ci/run`` installs them)
the module is skipped and says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from helpers import live_children, shutdown_serve, wait_until
from ray_serve_metrics import family_of
from starlette.requests import Request

from shoal import serve
from shoal.serve import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "shoal-serve-dashboard.json"
PROMETHEUS_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None, reason="prometheus not installed: apt-get install prometheus"
    ),
]

APP = "counted"
ROUTE = "/counted"
REQUESTS = 5
WAIT_S = 20.0


@serve.deployment
class Counted:
    def __init__(self) -> None:
        self.calls = metrics.Counter("my_calls", description="Calls of Counted.", tag_keys=("outcome",))

    def __call__(self, request: Request) -> str:
        self.calls.inc(tags={"outcome": "ok"})
        return "counted"


@pytest.fixture(scope="module")
def instance() -> Iterator[str]:
    """An instance that served ``REQUESTS`` HTTP requests to ``Counted``; its metrics URL."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0, "metrics_port": 0})
    try:
        serve.run(Counted.bind(), name=APP, route_prefix=ROUTE)
        with httpx.Client(timeout=30) as client:
            for _ in range(REQUESTS):
                assert client.get(f"{serve.get_http_url()}{ROUTE}").text == "counted"
        url = serve.get_metrics_url()
        assert url
        yield url
    finally:
        shutdown_serve()


def _config(metrics_url: str) -> str:
    parts = urlsplit(metrics_url)
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: shoal\n"
        f"    metrics_path: {parts.path or '/'}\n"
        "    static_configs:\n"
        f"      - targets: ['{parts.netloc}']\n"
    )


@pytest.fixture(scope="module")
def prometheus(instance: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server scraping ``instance``; its base URL. Stopped (killed if it lingers) after."""
    assert PROMETHEUS is not None
    home = tmp_path_factory.mktemp("prometheus")
    (home / "prometheus.yml").write_text(_config(instance))
    log = home / "prometheus.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=home,
        )
    try:
        def listening() -> str | None:
            assert server.poll() is None, f"prometheus exited ({server.returncode}):\n{log.read_text()}"
            found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:[1-9]\d*)', log.read_text())
            return found.group(1) if found else None

        base = "http://" + wait_until(listening, WAIT_S, "prometheus listens", interval_s=0.1)
        wait_until(lambda: _get(f"{base}/-/ready").status_code == 200, WAIT_S, "prometheus is ready", interval_s=0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _get(url: str, **params: str) -> requests.Response:
    try:
        return requests.get(url, params=params, timeout=5)
    except requests.ConnectionError:
        return requests.Response()  # status_code None: not yet


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    reply = _get(f"{base}/api/v1/query", query=promql)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _value_becomes(base: str, promql: str, expected: float) -> None:
    seen: list[Any] = []

    def done() -> bool:
        result = _query(base, promql)
        seen[:] = result
        return len(result) == 1 and float(result[0]["value"][1]) == expected

    try:
        wait_until(done, WAIT_S, f"{promql} == {expected}", interval_s=0.25)
    except AssertionError:
        raise AssertionError(f"{promql}: expected {expected}, Prometheus answers {seen}") from None


def test_prometheus_scrapes_the_instance(prometheus: str) -> None:
    _value_becomes(prometheus, 'up{job="shoal"}', 1)
    _value_becomes(prometheus, f'sum(ray_my_calls_total{{application="{APP}",deployment="Counted",outcome="ok"}})', REQUESTS)


def test_prometheus_sees_the_proxys_request_counter(prometheus: str) -> None:
    _value_becomes(
        prometheus, f'sum(ray_serve_num_http_requests_total{{application="{APP}",route="{ROUTE}",status_code="200"}})', REQUESTS
    )


def test_promtool_accepts_the_exposition(instance: str) -> None:
    """``promtool check metrics`` exits 0; or every problem it lists is about one of Ray's own names."""
    assert PROMTOOL is not None
    exposition = requests.get(instance, timeout=10).text
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30)
    output = (checked.stdout + checked.stderr).strip()
    print(f"promtool check metrics: exit {checked.returncode}\n{output}")
    if checked.returncode == 0:
        return
    problems = [line for line in output.splitlines() if line.strip()]
    not_rays = [line for line in problems if family_of(line.split()[0]) is None]
    assert not not_rays, f"promtool objects to names that are not Ray's (exit {checked.returncode}):\n{output}"


def test_the_dashboards_queries_parse(prometheus: str) -> None:
    """Every PromQL expression of deploy/grafana/shoal-serve-dashboard.json is accepted by Prometheus
    (Grafana's variables replaced by what "All" and the rate interval become)."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    assert exprs
    for expr in exprs:
        promql = expr.replace("$application", ".*").replace("$deployment", ".*").replace("$__rate_interval", "1m")
        _query(prometheus, promql)  # asserts status "success"


def test_promtool_accepts_the_example_config() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
