"""Ray's Serve REST API on the supervisor (``--api-port``): real supervisors, real HTTP.

The JSON of ``GET /api/serve/applications/`` is checked field by field against Ray's models
(``tests/ray_serve_schema.py``, no Ray needed); where Ray's own CLI is installed
(``$SHOAL_TEST_RAY_CLI``, else ``/work/ray-venv/bin/serve``), ``serve deploy|status|config|shutdown
-a URL`` run against shoal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import wait_until
from ray_serve_shape import shape_errors

from shoal.controller import launch, rundir
from shoal.runtime.errors import RayServeException
from shoal.serve.config import HTTPOptions

pytestmark = pytest.mark.timeout(180)

TOKEN = "s3cret-token"
APPS = "/api/serve/applications/"
HELLO_APP = '''
from shoal import serve


@serve.deployment
class Hello:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, request) -> str:
        return self.greeting


app = Hello.bind()


def build(args: dict) -> object:
    return Hello.bind(args.get("greeting", "hello"))
'''
# Importing it blocks until the test writes to the FIFO beside it (a user's slow import).
SLOW_APP = '''
from pathlib import Path

with open(Path(__file__).with_name("slow.fifo")) as gate:
    gate.read()

from hello_app import Hello  # noqa: E402

app = Hello.bind("slow")
'''


@dataclass
class Api:
    url: str
    http_url: str
    app_dir: Path
    instance: launch.Instance
    token: str | None = None

    def request(self, method: str, path: str = APPS, *, token: str | None = None, **kwargs: Any) -> httpx.Response:
        token = token if token is not None else self.token
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def details(self) -> dict[str, Any]:
        response = self.request("GET")
        assert response.status_code == 200, response.text
        body = response.json()
        assert shape_errors(body) == [], shape_errors(body)
        return body

    def put(self, config: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return self.request("PUT", json=config, **kwargs)

    def wait_running(self, name: str) -> dict[str, Any]:
        """Every GET on the way is checked against Ray's shape (replicas starting included)."""
        def running() -> dict[str, Any] | None:
            app = self.details()["applications"].get(name)
            return app if app is not None and app["status"] == "RUNNING" else None

        return wait_until(running, 60, f"application {name} RUNNING")


def hello_config(name: str = "hello", prefix: str = "/hello", **app: Any) -> dict[str, Any]:
    return {"applications": [{"name": name, "route_prefix": prefix, "import_path": "hello_app:app", **app}]}


@pytest.fixture(scope="module")
def app_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shoal-restapi-apps-"))
    (path / "hello_app.py").write_text(HELLO_APP)
    (path / "slow_app.py").write_text(SLOW_APP)
    os.mkfifo(path / "slow.fifo")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_instance(run_root: Path, app_dir: Path, *, token: str | None = None, host: str = "127.0.0.1") -> Api:
    run_dir = rundir.ensure_private_dir(Path(tempfile.mkdtemp(prefix="restapi-", dir=run_root)))
    http = HTTPOptions(host="127.0.0.1", port=0, metrics_port=None).model_dump()
    instance = launch.start_supervisor(
        run_dir, private=True, http_options=http, api_options={"host": host, "port": 0, "app_dir": str(app_dir)},
        api_token=token,
    )
    assert instance.api_url is not None and instance.http_url is not None
    url = instance.api_url.replace("0.0.0.0", "127.0.0.1")
    return Api(url, instance.http_url, app_dir, instance, token)


@pytest.fixture(scope="module")
def api(run_root: Path, app_dir: Path) -> Iterator[Api]:
    assert "SHOAL_API_TOKEN" not in os.environ
    instance = start_instance(run_root, app_dir)
    yield instance
    instance.instance.wait_stopped(timeout_s=60)


@pytest.fixture
def clean(api: Api) -> Iterator[Api]:
    """The instance, emptied after the test (DELETE answers once the applications are gone)."""
    yield api
    assert api.request("DELETE").status_code == 200


def test_version_endpoints_answer_as_rays_dashboard(api: Api) -> None:
    for path in ("/api/ray/version", "/api/version"):
        body = api.request("GET", path).json()
        assert body["version"] == "4" and body["ray_version"] == "2.60.0"
    assert api.request("POST", "/api/ray/version").status_code == 405
    assert api.request("GET", "/api/jobs/").status_code == 404


def test_put_deploys_get_shows_rays_shape_delete_deletes(clean: Api) -> None:
    api = clean
    empty = wait_until(lambda: (d := api.details())["proxies"]["local"]["status"] == "HEALTHY" and d, 30, "proxy up")
    assert empty["applications"] == {}
    assert empty["http_options"]["port"] == int(api.http_url.rsplit(":", 1)[1])  # the bound port, not 0
    response = api.put(hello_config(deployments=[{"name": "Hello", "num_replicas": 2}]))
    assert (response.status_code, response.text) == (200, "")
    app = api.wait_running("hello")
    assert app["source"] == "declarative" and app["deployed_app_config"]["import_path"] == "hello_app:app"
    deployment = app["deployments"]["Hello"]
    assert deployment["target_num_replicas"] == 2 and deployment["deployment_config"]["num_replicas"] == 2
    assert len([r for r in deployment["replicas"] if r["state"] == "RUNNING" and r["pid"]]) == 2
    assert httpx.get(api.http_url + "/hello", timeout=30).text == "hello"
    assert api.request("GET", APPS + "?api_type=imperative").json()["applications"] == {}
    assert set(api.request("GET", APPS + "?api_type=DECLARATIVE").json()["applications"]) == {"hello"}
    bad_type = api.request("GET", APPS + "?api_type=dashboard")
    assert bad_type.status_code == 400 and "Invalid 'api_type' value: 'dashboard'" in bad_type.text

    # Declarative, as `shoal deploy`: a new config replaces the applications.
    assert api.put(hello_config("greet", "/greet", import_path="hello_app:build", args={"greeting": "hi"})).status_code == 200
    api.wait_running("greet")
    wait_until(lambda: "hello" not in api.details()["applications"], 60, "hello deleted by the new config")
    assert httpx.get(api.http_url + "/greet", timeout=30).text == "hi"

    assert api.request("DELETE").status_code == 200
    assert api.details()["applications"] == {}


def test_a_bad_config_is_400_and_changes_nothing(clean: Api) -> None:
    api = clean
    assert api.put(hello_config()).status_code == 200
    before = api.wait_running("hello")
    bad = {
        "schema": (hello_config(bogus=1), "applications.0.bogus"),
        "import": (hello_config(import_path="no_such_module:app"), "No module named 'no_such_module'"),
        "deployment name": (hello_config(deployments=[{"name": "Nope"}]), "has no deployment named 'Nope'"),
        "controller": (
            hello_config(deployments=[{"name": "Hello", "ray_actor_options": {"resources": {"tpu": 1}}}]),
            "ray_actor_options['resources']",
        ),
    }
    for what, (config, message) in bad.items():
        response = api.put(config)
        assert response.status_code == 400, (what, response.text)
        assert message in response.text, (what, response.text)
    not_json = api.request("PUT", content=b"applications: []", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "not JSON" in not_json.text
    assert api.request("PUT", json=["a list"]).status_code == 400
    after = api.details()["applications"]
    assert set(after) == {"hello"} and after["hello"]["last_deployed_time_s"] == before["last_deployed_time_s"]
    pids = lambda app: sorted(r["pid"] for r in app["deployments"]["Hello"]["replicas"])  # noqa: E731
    assert pids(after["hello"]) == pids(before)


def test_a_body_over_the_cap_is_413_before_it_is_read(api: Api) -> None:
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            f"PUT {APPS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode()
        )
        head = conn.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head


def test_the_listener_answers_while_a_put_imports_slow_user_code(clean: Api) -> None:
    """The PUT's import runs in a child: GETs (and the controller) carry on meanwhile."""
    api = clean
    result: dict[str, Any] = {}
    putting = threading.Thread(
        target=lambda: result.update(response=api.put(hello_config("slow", "/slow", import_path="slow_app:app")))
    )
    putting.start()
    fifo = api.app_dir / "slow.fifo"

    def open_writer() -> int | None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the import opened it
        except OSError:
            return None

    writer = wait_until(open_writer, 60, "the PUT's build child importing slow_app")
    try:
        started = time.monotonic()
        assert api.details()["applications"] == {}
        assert api.request("GET", "/api/ray/version").status_code == 200
        assert time.monotonic() - started < 5.0
        assert putting.is_alive()
    finally:
        os.write(writer, b"go")
        os.close(writer)
    putting.join(60)
    assert result["response"].status_code == 200, result["response"].text
    api.wait_running("slow")
    assert httpx.get(api.http_url + "/slow", timeout=30).text == "slow"


def test_a_token_is_required_and_checked(run_root: Path, app_dir: Path) -> None:
    api = start_instance(run_root, app_dir, token=TOKEN)
    try:
        for method in ("GET", "PUT", "DELETE"):
            missing = httpx.request(method, api.url + APPS, json=hello_config(), timeout=30)
            assert missing.status_code == 401, (method, missing.text)
            wrong = api.request(method, json=hello_config(), token="not-" + TOKEN)
            assert wrong.status_code == 403, (method, wrong.text)
        assert httpx.get(api.url + "/api/ray/version", headers={"Authorization": TOKEN}, timeout=30).status_code == 403
        assert api.details()["applications"] == {}  # nothing was deployed by the refused PUTs
        ray_header = httpx.get(api.url + APPS, headers={"X-Ray-Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert ray_header.status_code == 200
    finally:
        api.instance.wait_stopped(timeout_s=60)


def test_a_non_loopback_address_needs_a_token(run_root: Path, app_dir: Path) -> None:
    with pytest.raises(RayServeException, match=r"not a loopback address.*--api-token"):
        start_instance(run_root, app_dir, host="0.0.0.0")
    api = start_instance(run_root, app_dir, host="0.0.0.0", token=TOKEN)
    try:
        assert api.instance.api_url is not None and api.instance.api_url.startswith("http://0.0.0.0:")
        assert api.details()["applications"] == {}
    finally:
        api.instance.wait_stopped(timeout_s=60)


def test_cli_refuses_api_options_without_api_port(tmp_path: Path) -> None:
    for flags in (["--api-token", TOKEN], ["--api-host", "0.0.0.0"]):
        result = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "start", "--http-port", "0", *flags], capture_output=True, text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "needs --api-port" in result.stderr, result.stderr


# -- Ray's own CLI ---------------------------------------------------------------------------------

def ray_cli() -> str | None:
    configured = os.environ.get("SHOAL_TEST_RAY_CLI")
    if configured:
        return configured
    default = "/work/ray-venv/bin/serve"
    return default if os.access(default, os.X_OK) else None


def run_ray(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cli = ray_cli()
    assert cli is not None
    return subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


needs_ray = pytest.mark.skipif(
    ray_cli() is None,
    reason="Ray's `serve` CLI was not found: set SHOAL_TEST_RAY_CLI to it (or install Ray in /work/ray-venv); "
    "test_put_deploys_get_shows_rays_shape_delete_deletes checks the JSON shapes without Ray",
)


@needs_ray
def test_rays_serve_cli_deploys_shows_status_and_shuts_down(clean: Api, tmp_path: Path) -> None:
    api = clean
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(hello_config(deployments=[{"name": "Hello", "num_replicas": 1}])))
    deployed = run_ray("deploy", str(config), "-a", api.url, cwd=tmp_path)
    assert deployed.returncode == 0 and "Sent deploy request successfully" in deployed.stdout + deployed.stderr, deployed

    def ray_status() -> dict[str, Any] | None:
        result = run_ray("status", "-a", api.url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        status = yaml.safe_load(result.stdout)
        return status if status["applications"].get("hello", {}).get("status") == "RUNNING" else None

    status = wait_until(ray_status, 90, "serve status says hello is RUNNING", interval_s=0.5)
    assert status["proxies"] == {"local": "HEALTHY"}
    assert status["applications"]["hello"]["deployments"]["Hello"]["replica_states"] == {"RUNNING": 1}
    shown = run_ray("config", "-a", api.url, cwd=tmp_path)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["import_path"] == "hello_app:app", shown
    assert httpx.get(api.http_url + "/hello", timeout=30).text == "hello"

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(hello_config("other", "/other", import_path="no_such_module:app")))
    refused = run_ray("deploy", str(bad), "-a", api.url, cwd=tmp_path)
    assert refused.returncode != 0 and "400" in refused.stderr and "no_such_module" in refused.stderr

    stopped = run_ray("shutdown", "-a", api.url, "-y", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert api.details()["applications"] == {}


@needs_ray
def test_rays_serve_cli_sends_the_token(run_root: Path, app_dir: Path, tmp_path: Path) -> None:
    """Ray's CLI sends ``RAY_AUTH_TOKEN`` as a bearer token when ``RAY_AUTH_MODE=token``."""
    api = start_instance(run_root, app_dir, token=TOKEN)
    try:
        without = run_ray("status", "-a", api.url, cwd=tmp_path)
        assert without.returncode != 0 and "Authentication required: Unauthorized" in without.stderr, without.stderr
        with_token = run_ray("status", "-a", api.url, cwd=tmp_path, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
        assert with_token.returncode == 0, with_token.stderr
        assert json.dumps(yaml.safe_load(with_token.stdout)["applications"]) == "{}"
    finally:
        api.instance.wait_stopped(timeout_s=60)


# -- the CLI ------------------------------------------------------------------------------------------

def test_shoal_run_serves_the_api_and_status_shows_it(private_run_dir: Path, app_dir: Path, tmp_path: Path) -> None:
    """``shoal run CONFIG --api-port 0``: the API serves the run's application, takes a PUT
    (imported from ``--app-dir``), ``shoal status`` names its URL, and Ctrl-C stops it all."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({**hello_config(), "http_options": {"metrics_port": 0}}))  # not 8080: others test it
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    env.pop("SHOAL_ADDRESS", None)
    shoal = [sys.executable, "-m", "shoal.cli"]
    cli = subprocess.Popen(
        [*shoal, "run", str(config), "--port", "0", "--api-port", "0", "--app-dir", str(app_dir)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert cli.stdout is not None
        url = None
        for line in cli.stdout:  # bounded by the test's timeout
            found = re.match(r"shoal: Serve REST API on (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None, cli.stderr.read() if cli.stderr else ""
        api = Api(url, "", app_dir, launch.Instance(private_run_dir, ""))
        assert api.details()["applications"]["hello"]["status"] == "RUNNING"
        status = subprocess.run([*shoal, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert f"REST API: {url}" in status.stdout, status
        assert api.put(hello_config("greet", "/greet", import_path="hello_app:build", args={"greeting": "hi"})).status_code == 200
        api.wait_running("greet")
        os.killpg(cli.pid, signal.SIGINT)
        assert cli.wait(60) == 0
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait(10)
        for stream in (cli.stdout, cli.stderr):
            if stream is not None:
                stream.close()
