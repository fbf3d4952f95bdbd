"""An instance started with a global ``logging_config`` starts its proxy with it: the first deploy,
which carries the same config, does not replace the proxy (no 503 window), and the proxy's
access lines are in that config's encoding from the first request.

Real supervisor, proxy and replica, started by the test and shut down after it; a real HTTP
client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import live_children, shutdown_serve, supervisor_of, wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(120)


@serve.deployment
class Hello:
    def __call__(self, request: Any) -> str:
        return "hello"


@pytest.fixture
def instance() -> Iterator[None]:
    assert not live_children(), "a previous test left processes behind"
    yield
    shutdown_serve()


def _proxy_pid() -> int | None:
    proxies = [p.pid for p in supervisor_of(psutil.Process()).children() if p.name() == "shoal-proxy"]
    return proxies[0] if proxies else None


def _run_dir() -> Path:
    cmdline = supervisor_of(psutil.Process()).cmdline()
    return Path(cmdline[cmdline.index("--run-dir") + 1])


def test_the_proxy_starts_with_the_instances_logging_config(instance: None) -> None:
    serve.start(http_options={"port": 0, "metrics_port": 0}, logging_config={"encoding": "JSON"})
    first = wait_until(_proxy_pid, 30, "the proxy process")
    serve.run(Hello.bind(), name="hello", route_prefix="/")
    url = serve.get_http_url()
    assert url is not None
    assert httpx.get(url, headers={"x-request-id": "start-1"}, timeout=10).status_code == 200
    assert _proxy_pid() == first  # the deploy carried the same config: no replacement
    proxy_log = _run_dir() / "logs" / "proxy_127.0.0.1.log"
    line = wait_until(
        lambda: next((x for x in proxy_log.read_text().splitlines() if "start-1" in x), None) if proxy_log.exists() else None,
        10, "the access line",
    )
    record = json.loads(line)
    assert (record["request_id"], record["component_name"], record["route"]) == ("start-1", "proxy", "/")
