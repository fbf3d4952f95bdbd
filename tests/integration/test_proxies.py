"""Several HTTP proxies on one port (``http_options.num_proxies``): real processes, real HTTP.

Which proxy answers a new connection is the kernel's choice, so a test that must go through
one proxy stops the other ones (SIGSTOP: a stopped process accepts nothing, and the socket
they share hands the connection to the one left), then lets them go on (SIGCONT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import (
    alive,
    processes_in_run_dir,
    run_dir_of,
    sample_value,
    scrape,
    served_url,
    shutdown_serve,
    stop_cli,
    supervisor_of,
    wait_until,
)

from shoal import serve
from shoal.serve import api

pytestmark = pytest.mark.timeout(120)

REQUESTS = "ray_serve_num_http_requests_total"


@serve.deployment
def whoami(request: Any) -> str:
    return "hello"


@serve.deployment
def second(request: Any) -> str:
    return "second"


@pytest.fixture(scope="module")
def two_proxies() -> Iterator[str]:
    """An instance with two proxies; yields its HTTP URL."""
    serve.start(http_options={"port": 0, "metrics_port": 0, "num_proxies": 2})
    serve.run(whoami.bind(), name="who", route_prefix="/who")
    url = serve.get_http_url()
    assert url is not None
    wait_until(lambda: len(_healthy_pids()) == 2, 30, "both proxies serve")
    yield url
    shutdown_serve()


def _proxies() -> list[Any]:
    return list(serve.status().proxy_processes)


def _healthy_pids() -> list[int]:
    return [p.pid for p in _proxies() if p.status.value == "HEALTHY" and p.pid is not None]


@contextlib.contextmanager
def _only(pid: int) -> Iterator[None]:
    """New connections go to proxy ``pid``: every other proxy is stopped meanwhile."""
    others = [p.pid for p in _proxies() if p.pid is not None and p.pid != pid and alive(p.pid)]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGCONT)


def _get(url: str, path: str, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    return httpx.get(url + path, headers=headers, timeout=10)  # a new connection each time


def _access_lines(pid_index: int, marker: str) -> list[str]:
    logs = run_dir_of(supervisor_of(psutil.Process())) / "logs"
    name = "proxy_127.0.0.1.log" if pid_index == 0 else f"proxy_127.0.0.1_{pid_index}.log"
    path = logs / name
    return [line for line in path.read_text().splitlines() if marker in line] if path.exists() else []


def test_two_proxies_serve_on_one_port_each_with_its_own_log(two_proxies: str) -> None:
    proxies = _proxies()
    assert [p.index for p in proxies] == [0, 1]
    assert len({p.pid for p in proxies}) == 2
    assert serve.status().proxies["local"].value == "HEALTHY"
    for proxy in proxies:
        assert proxy.pid is not None
        with _only(proxy.pid):
            response = _get(two_proxies, "/who", request_id=f"through-{proxy.index}")
        assert response.status_code == 200 and response.text == "hello"
    for proxy in proxies:  # each answered its own request, and logged it in its own file
        wait_until(lambda p=proxy: _access_lines(p.index, f"through-{p.index}"), 10, "its access line")
        other = 1 - proxy.index
        assert not _access_lines(proxy.index, f"through-{other}")


def test_route_updates_reach_every_proxy(two_proxies: str) -> None:
    serve.run(second.bind(), name="second", route_prefix="/second")  # returns once every proxy routes it
    for pid in _healthy_pids():
        with _only(pid):
            response = _get(two_proxies, "/second")
        assert response.status_code == 200 and response.text == "second"
    serve.delete("second")


def test_metrics_sum_every_proxy_and_keep_a_dead_ones_counts(two_proxies: str) -> None:
    serve.run(second.bind(), name="counted", route_prefix="/counted")

    def counted() -> float:
        return sample_value(scrape(), REQUESTS, application="counted", status_code="200") or 0.0

    first, other = _healthy_pids()
    with _only(first):
        for _ in range(3):
            assert _get(two_proxies, "/counted").status_code == 200
    with _only(other):
        for _ in range(2):
            assert _get(two_proxies, "/counted").status_code == 200
    wait_until(lambda: counted() == 5, 10, "the requests of both proxies are counted once")
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: first not in {p.pid for p in _proxies()} and len(_healthy_pids()) == 2, 30, "replaced")
    assert counted() == 5  # the dead proxy's counts stay, and are not counted twice
    serve.delete("counted")


def test_a_killed_proxy_is_replaced_while_the_other_serves(two_proxies: str) -> None:
    victim = _proxies()[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    served = 0
    while True:  # until its successor serves, every new connection is answered by the other
        response = _get(two_proxies, "/who")
        assert response.status_code == 200 and response.text == "hello"
        served += 1
        replaced = _proxies()[0]
        if replaced.pid not in (None, victim.pid) and replaced.status.value == "HEALTHY":
            break
    assert served >= 1 and replaced.restarts == victim.restarts + 1
    assert replaced.pid is not None
    with _only(replaced.pid):  # the successor routes too
        assert _get(two_proxies, "/who").text == "hello"


def test_num_proxies_changes_on_the_running_instance(two_proxies: str) -> None:
    serve.start(http_options={"port": 0, "num_proxies": 3})  # already running: only num_proxies applies
    wait_until(lambda: len(_healthy_pids()) == 3, 30, "three proxies serve")
    for pid in _healthy_pids():
        with _only(pid):
            assert _get(two_proxies, "/who").text == "hello"
    three = _healthy_pids()
    api.set_num_proxies(2)  # returns once the third stopped
    assert [p.pid for p in _proxies()] == three[:2]
    assert not alive(three[2])
    assert _get(two_proxies, "/who").text == "hello"


def test_a_new_logging_config_replaces_the_proxies_one_at_a_time(two_proxies: str) -> None:
    before = {p.pid for p in _proxies()}
    statuses: list[int] = []
    errors: list[Exception] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                statuses.append(_get(two_proxies, "/who").status_code)
            except httpx.HTTPError as exc:  # a connection a stopping proxy accepted, not yet read
                errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        serve.start(logging_config={"encoding": "JSON"})
        serve.run(whoami.bind(), name="who", route_prefix="/who")  # returns once both successors route
    finally:
        done.set()
        loader.join(30)
    after = _proxies()
    assert not before & {p.pid for p in after}, "every proxy was replaced"
    assert 200 in statuses and 503 not in statuses, "one proxy served while the other was replaced"
    assert len(errors) <= 2, errors  # at most one connection per replaced proxy
    for proxy in after:
        assert proxy.pid is not None
        with _only(proxy.pid):
            assert _get(two_proxies, "/who", request_id=f"json-{proxy.index}").status_code == 200
        wait_until(lambda p=proxy: [ln for ln in _access_lines(p.index, f"json-{p.index}") if ln.startswith("{")],
                   10, "a JSON access line")


def test_bad_num_proxies_is_refused_naming_it(two_proxies: str) -> None:
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="num_proxies"):
            serve.start(http_options={"port": 0, "num_proxies": bad})
        with pytest.raises(ValueError, match="num_proxies"):
            api.set_num_proxies(bad)  # type: ignore[arg-type]
    assert len(_proxies()) == 2


HELD_APP = '''
import asyncio
from shoal import serve

@serve.deployment(max_ongoing_requests=10)
class Held:
    def __init__(self):
        self.running = 0
        self.release = asyncio.Event()

    async def __call__(self, request) -> str:
        action = request.url.path.strip("/")
        if action == "running":
            return str(self.running)
        if action == "release":
            self.release.set()
            return "released"
        self.running += 1
        await self.release.wait()
        return "finished"

app = Held.bind()
'''


def test_sigterm_drains_every_proxy(tmp_path: Path, private_run_dir: Path) -> None:
    """``shoal run --num-proxies 2``, SIGTERM: both answer 503 on /-/healthz (each through a
    connection it accepted) and finish their request in flight."""
    (tmp_path / "held_app.py").write_text(HELD_APP)
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    shoal = str(Path(sys.executable).parent / "shoal")
    cli = subprocess.Popen([shoal, "run", "held_app:app", "--port", "0", "--num-proxies", "2"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    readers: list[threading.Thread] = []
    clients: list[httpx.Client] = []
    try:
        base = served_url(cli, 60, readers)
        supervisor = psutil.Process(int((private_run_dir / "default" / "supervisor.pid").read_text()))
        pids = wait_until(lambda: _proxy_children(supervisor, 2), 30, "two proxies run")
        held: list[dict[str, Any]] = []
        threads = []
        health: list[httpx.Client] = []
        for pid in pids:
            others = [p for p in pids if p != pid]
            for other in others:
                os.kill(other, signal.SIGSTOP)
            try:  # connections this proxy accepted: one for the held request, one for /-/healthz
                hold, probe = httpx.Client(base_url=base, timeout=30), httpx.Client(base_url=base, timeout=30)
                clients += [hold, probe]
                wait_until(lambda c=probe: _status(c, "/-/healthz") == 200, 30, "the proxy serves")
                assert hold.get("/running").status_code == 200
            finally:
                for other in others:
                    os.kill(other, signal.SIGCONT)
            result: dict[str, Any] = {}
            held.append(result)
            threads.append(threading.Thread(target=lambda c=hold, r=result: r.update(r=c.get("/hold"))))
            threads[-1].start()
            health.append(probe)
        wait_until(lambda: _text(health[0], "/running") == "2", 10, "both held requests run")

        supervisor.send_signal(signal.SIGTERM)
        for probe in health:  # each proxy, through its own connection
            wait_until(lambda c=probe: _status(c, "/-/healthz") == 503, 10, "healthz answers 503 while draining")
        assert health[0].get("/release").text == "released"  # still served while draining
        for thread in threads:
            thread.join(30)
        assert [r["r"].status_code for r in held] == [200, 200]
        assert [r["r"].text for r in held] == ["finished", "finished"]
        assert cli.wait(60) == 0
    finally:
        for client in clients:
            client.close()
        stop_cli(cli, readers)
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 20, "every shoal process exited")


def _proxy_children(supervisor: psutil.Process, count: int) -> list[int] | None:
    pids = [p.pid for p in supervisor.children() if p.name() == "shoal-proxy"]
    return pids if len(pids) == count else None


def _status(client: httpx.Client, path: str) -> int | None:
    try:
        return client.get(path, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _text(client: httpx.Client, path: str) -> str:
    try:
        return client.get(path, timeout=2).text
    except httpx.HTTPError:
        return ""
