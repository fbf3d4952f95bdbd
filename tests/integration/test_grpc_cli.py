"""gRPC options from the command line and config files, and servicer functions refused at start.

Each test runs ``shoal`` as a user does (a subprocess, a private SHOAL_RUN_DIR), with the stubs
generated at test time on PYTHONPATH; nothing may be left running afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_protos import stubs
from helpers import processes_in_run_dir, wait_until

from shoal import serve
from shoal.serve.exceptions import RayServeException

pytestmark = pytest.mark.timeout(120)

SHOAL = str(Path(sys.executable).with_name("shoal"))
APP = '''
import greeter_pb2
from shoal import serve
from shoal.serve.exceptions import RayServeException


@serve.deployment
class Greeter:
    def Hello(self, request):
        return greeter_pb2.HelloReply(message=f"cli {request.name}")


app = Greeter.bind()
'''


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    stubs.generate(tmp_path)
    (tmp_path / "grpc_app.py").write_text(APP)
    return tmp_path


@pytest.fixture
def env(private_run_dir: Path, workdir: Path) -> dict[str, str]:
    values = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir), "PYTHONDONTWRITEBYTECODE": "1",
              "PYTHONPATH": str(workdir)}
    values.pop("SHOAL_ADDRESS", None)
    return values


def _shoal(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOAL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=90)


def _hello(url: str, workdir: Path) -> str:
    sys.path.insert(0, str(workdir))
    try:
        import greeter_pb2
        import greeter_pb2_grpc
    finally:
        sys.path.remove(str(workdir))
    with grpc.insecure_channel(url) as channel:
        reply = greeter_pb2_grpc.GreeterStub(channel).Hello(greeter_pb2.HelloRequest(name="grpc"), timeout=10)
    return str(reply.message)


@pytest.fixture
def stopped(env: dict[str, str], workdir: Path, private_run_dir: Path) -> Iterator[None]:
    yield
    _shoal(env, workdir, "shutdown", "-y")
    wait_until(lambda: not processes_in_run_dir(private_run_dir), 30, "the instance stopped")


def test_shoal_start_grpc_port_0_reported_by_status(env: dict[str, str], workdir: Path, stopped: None) -> None:
    started = _shoal(env, workdir, "start", "--http-port", "0", "--grpc-port", "0",
                     "--grpc-servicer-functions", stubs.SERVICER_FUNCTION)
    assert started.returncode == 0, started.stderr
    deployed = _shoal(env, workdir, "deploy", "grpc_app:app")
    assert deployed.returncode == 0, deployed.stderr
    status = _shoal(env, workdir, "status", "--json")
    assert status.returncode == 0, status.stderr
    url = json.loads(status.stdout)["grpc_url"]
    assert url.startswith("127.0.0.1:") and not url.endswith(":0")
    assert f"gRPC: {url}" in started.stdout
    assert wait_until(lambda: _hello(url, workdir), 30, "gRPC served") == "cli grpc"
    assert f"gRPC: {url}" in _shoal(env, workdir, "status").stdout


def test_config_file_grpc_options(env: dict[str, str], workdir: Path, stopped: None) -> None:
    config: dict[str, Any] = {
        "http_options": {"port": 0},
        "grpc_options": {"port": 0, "grpc_servicer_functions": [stubs.SERVICER_FUNCTION]},
        "applications": [{"name": "app", "import_path": "grpc_app:app", "route_prefix": "/"}],
    }
    (workdir / "grpc.yaml").write_text(json.dumps(config))  # JSON is YAML
    run = subprocess.Popen([SHOAL, "run", "grpc.yaml"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert run.stdout is not None
        for line in run.stdout:
            if line.startswith("shoal: serving"):
                break
        else:
            raise AssertionError(f"shoal run exited with {run.wait(10)}")
        url = json.loads(_shoal(env, workdir, "status", "--json").stdout)["grpc_url"]
        assert _hello(url, workdir) == "cli grpc"
    finally:
        run.terminate()
        run.communicate(timeout=60)


def test_a_servicer_function_that_does_not_import_is_refused_at_start(
    env: dict[str, str], workdir: Path, private_run_dir: Path,
) -> None:
    result = _shoal(env, workdir, "start", "--http-port", "0", "--grpc-servicer-functions", "nope_pb2_grpc.add_X")
    assert result.returncode != 0
    assert "grpc_servicer_functions: 'nope_pb2_grpc.add_X' can't be imported" in result.stderr
    assert not processes_in_run_dir(private_run_dir)


def test_serve_start_refuses_a_servicer_function_that_is_not_one(private_run_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("SHOAL_RUN_DIR", str(private_run_dir))
    with pytest.raises(RayServeException, match=r"'os\.getcwd' failed when called with"):
        serve.start(http_options={"port": 0}, grpc_options={"grpc_servicer_functions": ["os.getcwd"], "port": 0})
    assert not processes_in_run_dir(private_run_dir)
