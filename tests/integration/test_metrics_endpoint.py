"""The instance's metrics endpoint (``http_options.metrics_port``) and the controller's metrics,
against real instances: their ports, what a scrape shows as replicas and the proxy are killed
and replaced, and the controller's series under Ray Serve's names."""

from __future__ import annotations

import itertools
import os
import signal
import socket
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
    Samples,
    alive,
    live_children,
    replica_pids,
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
from shoal.runtime import metrics as runtime_metrics
from shoal.serve import metrics as serve_metrics
from shoal.serve.exceptions import RayServeException

pytestmark = pytest.mark.timeout(120)

APP = "metered"
DEP = {"deployment": "Metered", "application": APP}


@serve.deployment(health_check_period_s=0.2, graceful_shutdown_timeout_s=1)
class Metered:
    """Counts its calls twice: as a user metric (with the replica's tags) and as a plain metric
    without a ``replica`` label (``ray.util.metrics``, which Ray also allows in a replica)."""

    def __init__(self) -> None:
        self.per_replica = serve_metrics.Counter("test_calls", description="calls, per replica")
        self.plain = runtime_metrics.Counter("test_plain_calls", description="calls, no replica label")

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.config = config

    def __call__(self, request: Any = None) -> int:
        self.per_replica.inc()
        self.plain.inc()
        return os.getpid()


@serve.deployment(health_check_period_s=0.5, health_check_timeout_s=5)
class Sick:
    def check_health(self) -> None:
        raise RuntimeError("not today")

    def __call__(self) -> str:
        return "ok"


@pytest.fixture
def instance() -> Iterator[psutil.Process]:
    """An instance of this test's own (started by the test), shut down after it."""
    assert not live_children(), "a previous test left processes behind"
    yield psutil.Process()
    shutdown_serve()


def _counters_without_replica(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every cumulative sample without a ``replica`` label: these must never go backwards."""
    return {
        key: value for key, value in samples.items()
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")) and "replica" not in dict(key[1])
    }


def _replicas_in(samples: Samples) -> set[str]:
    return {dict(labels)["replica"] for (_name, labels) in samples if "replica" in dict(labels)}


def _proxy_pid(driver: psutil.Process) -> int | None:
    """The pid of the instance's live proxy process, None while there is none."""
    proxies = [p.pid for p in supervisor_of(driver).children() if p.name() == "shoal-proxy" and alive(p.pid)]
    return proxies[0] if proxies else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ports --------------------------------------------------------------------------------------


def test_metrics_port_0_is_reported_by_get_metrics_url_and_shoal_status(instance: psutil.Process) -> None:
    serve.start(http_options={"port": 0, "metrics_port": 0})
    url = serve.get_metrics_url()
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    assert int(url.rsplit(":", 1)[1].split("/")[0]) != 0
    serve.run(Metered.bind(), name=APP, route_prefix=None)
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert "ray_serve_deployment_status" in response.text
    env = {**os.environ, "SHOAL_ADDRESS": str(run_dir_of(supervisor_of(instance)))}
    status = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "status"], env=env, capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert f"metrics: {url}" in status.stdout.splitlines()


def test_metrics_port_none_serves_nothing(
    instance: psutil.Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users_dir = tmp_path / "users-own-multiproc-dir"  # a user's prometheus-client setting
    users_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(users_dir))
    serve.start(http_options={"port": 0, "metrics_port": None})
    assert serve.get_metrics_url() is None
    handle = serve.run(Metered.bind(), name=APP, route_prefix=None)
    assert handle.remote().result(timeout_s=30) > 0  # the replica runs without recording anywhere
    run_dir = run_dir_of(supervisor_of(instance))
    assert not list(run_dir.glob("metrics/*.db"))
    assert not list(users_dir.iterdir())


def test_an_explicit_port_that_is_taken_is_an_error_naming_metrics_port(instance: psutil.Process) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RayServeException, match="metrics_port") as error:
            serve.start(http_options={"port": 0, "metrics_port": port})
        assert str(port) in str(error.value)
    wait_until(lambda: not live_children(), 15, "the supervisor that could not start exits")


def test_the_default_port_taken_means_a_free_port(instance: psutil.Process) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def hold_8080() -> bool:  # other tests' instances take it now and then: wait our turn
            try:
                blocker.bind(("127.0.0.1", 8080))
            except OSError:
                return False
            blocker.listen()
            return True

        wait_until(hold_8080, 60, "this test holds port 8080")
        serve.start(http_options={"port": 0})  # metrics_port: the default, 8080
        url = serve.get_metrics_url()
        assert url is not None and ":8080/" not in url
        assert httpx.get(url, timeout=10).status_code == 200


def test_an_explicit_metrics_port_equal_to_the_http_port_is_refused(instance: psutil.Process) -> None:
    port = _free_port()
    with pytest.raises(RayServeException, match="metrics_port"):
        serve.start(http_options={"port": port, "metrics_port": port})
    wait_until(lambda: not live_children(), 15, "the supervisor that could not start exits")


# -- processes replaced ---------------------------------------------------------------------------


def test_a_killed_replica_series_go_and_counters_without_replica_never_decrease(
    instance: psutil.Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_METRICS_DEAD_PROCESS_RETENTION_S", "0")  # the supervisor inherits it
    serve.start(http_options={"port": 0, "metrics_port": 0})
    handle = serve.run(Metered.bind(), name=APP, route_prefix="/m")
    http_url = serve.get_http_url()
    for _ in range(3):
        handle.remote().result(timeout_s=30)
        assert httpx.get(f"{http_url}/m", timeout=10).status_code == 200
    before = scrape()
    [old_replica] = _replicas_in(before) or [None]
    assert old_replica is not None, "the replica's own series carry its id"
    assert sample_value(before, "ray_test_calls_total", replica=old_replica) == 6
    assert sample_value(before, "ray_test_plain_calls_total") == 6
    history = [_counters_without_replica(before)]

    [old_pid] = replica_pids(supervisor_of(instance))
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: replica_pids(supervisor_of(instance)) - {old_pid}, 30, "the replica is replaced")
    new_pid = wait_until(lambda: _call(handle, old_pid), 30, "the new replica answers")
    history.append(_counters_without_replica(scrape()))

    def old_series_gone() -> Samples | None:
        samples = scrape()
        history.append(_counters_without_replica(samples))
        return samples if old_replica not in _replicas_in(samples) else None

    after = wait_until(old_series_gone, 30, "the killed replica's series leave the exposition")
    assert sample_value(after, "ray_test_plain_calls_total") == 7  # its 6 calls were kept, plus 1
    assert sample_value(after, "ray_serve_deployment_replica_healthy", **DEP) == 1
    assert sample_value(after, "ray_serve_replica_startup_latency_ms_count", **DEP) == 2

    proxy_pid = _proxy_pid(instance)
    assert proxy_pid is not None
    os.kill(proxy_pid, signal.SIGKILL)
    wait_until(lambda: _proxy_pid(instance) not in (None, proxy_pid), 30, "the proxy is replaced")
    wait_until(lambda: _get_ok(f"{http_url}/m"), 30, "the new proxy serves")
    history.append(_counters_without_replica(scrape()))
    assert new_pid != old_pid
    _assert_never_decreased(history)


def _call(handle: Any, old_pid: int) -> int | None:
    try:
        pid = int(handle.remote().result(timeout_s=5))
    except Exception:
        return None
    return pid if pid != old_pid else None


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _assert_never_decreased(history: list[dict[tuple[str, frozenset[tuple[str, str]]], float]]) -> None:
    for earlier, later in itertools.pairwise(history):
        for key, value in earlier.items():
            assert later.get(key, 0.0) >= value, f"{key} went from {value} to {later.get(key)}"


# -- the controller's series -------------------------------------------------------------------


def test_the_controller_reports_lifecycle_status_and_health_under_rays_names(instance: psutil.Process) -> None:
    serve.start(http_options={"port": 0, "metrics_port": 0})
    serve.run(Metered.options(user_config={"v": 1}).bind(), name=APP, route_prefix=None)
    samples = scrape()
    assert sample_value(samples, "ray_serve_deployment_status", **DEP) == 6  # HEALTHY
    assert sample_value(samples, "ray_serve_application_status", application=APP) == 6  # RUNNING
    assert sample_value(samples, "ray_serve_deployment_replica_healthy", **DEP) == 1
    assert sample_value(samples, "ray_serve_autoscaling_target_replicas", **DEP) == 1
    assert sample_value(samples, "ray_serve_replica_startup_latency_ms_count", **DEP) == 1
    assert sample_value(samples, "ray_serve_replica_initialization_latency_ms_count", **DEP) == 1
    assert (sample_value(samples, "ray_serve_controller_num_control_loops") or 0) > 0
    assert sample_value(samples, "ray_serve_controller_control_loop_duration_s") is not None
    wait_until(
        lambda: (sample_value(scrape(), "ray_serve_health_check_latency_ms_count", **DEP) or 0) > 0,
        30, "a health check was timed",
    )

    serve.run(Metered.options(user_config={"v": 2}).bind(), name=APP, route_prefix=None)  # in place
    samples = scrape()
    assert sample_value(samples, "ray_serve_replica_reconfigure_latency_ms_count", **DEP) == 1
    assert sample_value(samples, "ray_serve_health_check_failures_total", **DEP) == 0  # none failed

    serve.delete(APP)
    samples = scrape()
    assert sample_value(samples, "ray_serve_replica_shutdown_duration_ms_count", **DEP) == 1
    assert sample_value(samples, "ray_serve_deployment_status", **DEP) is None  # gone with it
    assert sample_value(samples, "ray_serve_application_status", application=APP) is None


def test_failed_health_checks_are_counted(instance: psutil.Process) -> None:
    serve.start(http_options={"port": 0, "metrics_port": 0})
    serve.run(Sick.bind(), name="sick", route_prefix=None)  # RUNNING until its checks fail
    sick = {"deployment": "Sick", "application": "sick"}
    wait_until(
        lambda: (sample_value(scrape(), "ray_serve_health_check_failures_total", **sick) or 0) >= 3,
        30, "three failed checks were counted",
    )
    samples = scrape()
    assert (sample_value(samples, "ray_serve_health_check_latency_ms_count", **sick) or 0) >= 3
    serve.delete("sick")


# -- config files ---------------------------------------------------------------------------------

CONFIG_APP = """
from shoal import serve


@serve.deployment
class Hello:
    def __call__(self) -> str:
        return "hello"


app = Hello.bind()
"""


def test_a_config_files_metrics_port_is_served_by_shoal_run(tmp_path: Path, private_run_dir: Path) -> None:
    (tmp_path / "hello_app.py").write_text(CONFIG_APP)
    (tmp_path / "hello.yaml").write_text(
        "http_options:\n  port: 0\n  metrics_port: 0\n"
        "applications:\n- name: hello\n  route_prefix: /hello\n  import_path: hello_app:app\n"
    )
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SHOAL_ADDRESS", None)
    shoal = str(Path(sys.executable).parent / "shoal")
    cli = subprocess.Popen([shoal, "run", "hello.yaml"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    readers: list[threading.Thread] = []
    try:
        base = served_url(cli, 60, readers)
        assert httpx.get(f"{base}/hello", timeout=30).text == "hello"
        status = subprocess.run([shoal, "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        [line] = [line for line in status.stdout.splitlines() if line.startswith("metrics: ")]
        url = line.removeprefix("metrics: ")
        assert url.startswith("http://127.0.0.1:") and ":8080/" not in url, url
        samples = scrape(url)
        assert sample_value(samples, "ray_serve_deployment_status", deployment="Hello", application="hello") == 6
        os.killpg(cli.pid, signal.SIGINT)
        assert cli.wait(60) == 0
    finally:
        stop_cli(cli, readers)
