"""shoal.serve.generated: Ray Serve's user-facing serve_pb2/serve_pb2_grpc, generated from the
committed serve.proto; the version bounds in pyproject.toml; grpc imported only when needed."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest

import shoal.serve.generated
from shoal.serve.generated import serve_pb2, serve_pb2_grpc

pytestmark = pytest.mark.timeout(120)

GENERATED_DIR = Path(shoal.serve.generated.__file__).resolve().parent
REPO_ROOT = GENERATED_DIR.parents[2]
PROTO = GENERATED_DIR / "serve.proto"
RAY_PYTHON = Path("/work/ray-venv/bin/python")

# Ray's serve.proto also holds its control plane's messages (deployment and autoscaling configs,
# long poll, status) and ASGIService (pickled ASGI requests between Ray's proxy and replicas):
# internals no user imports, left out on purpose.
RAY_SERVICES_LEFT_OUT = {"ASGIService"}

_DUMP = """
import json
from google.protobuf import descriptor_pb2
{import_line}
fd = descriptor_pb2.FileDescriptorProto()
serve_pb2.DESCRIPTOR.CopyToProto(fd)
services = {{s.name: [[m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming]
                     for m in s.method] for s in fd.service}}
messages = {{m.name: [[f.name, f.number, f.type, f.label, f.type_name, f.proto3_optional] for f in m.field]
            + [["nested", [n.name for n in m.nested_type]]] for m in fd.message_type}}
grpc_names = sorted(n for n in dir(serve_pb2_grpc) if not n.startswith("_") and n[0].isupper() or n.startswith("add_"))
print(json.dumps({{"package": fd.package, "services": services, "messages": messages, "grpc_names": grpc_names,
                  "options": [fd.options.java_package, fd.options.java_outer_classname,
                              fd.options.java_multiple_files]}}))
"""


def _describe(python: Path, import_line: str) -> dict[str, Any]:
    done = subprocess.run([str(python), "-c", _DUMP.format(import_line=import_line)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    described: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return described


def _ray() -> dict[str, Any]:
    if not RAY_PYTHON.exists():
        pytest.skip(f"Ray Serve is not installed at {RAY_PYTHON} (the reference for Ray's descriptors)")
    try:
        return _describe(RAY_PYTHON, "from ray.serve.generated import serve_pb2, serve_pb2_grpc")
    except RuntimeError as exc:
        pytest.skip(f"Ray's ray.serve.generated does not import there: {str(exc).strip()[-300:]}")


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return _describe(Path(sys.executable), "from shoal.serve.generated import serve_pb2, serve_pb2_grpc")


def test_the_generated_modules_offer_rays_api_and_example_services() -> None:
    assert serve_pb2.DESCRIPTOR.package == "ray.serve"
    assert serve_pb2.ListApplicationsResponse(application_names=["a"]).application_names == ["a"]
    assert serve_pb2.HealthzResponse(message="success").message == "success"
    assert serve_pb2.UserDefinedResponse(greeting="hi", num_x2=4).num_x2 == 4
    for name in ("RayServeAPIService", "UserDefinedService", "FruitService", "RayServeBenchmarkService"):
        assert callable(getattr(serve_pb2_grpc, f"add_{name}Servicer_to_server"))
        assert isinstance(getattr(serve_pb2_grpc, f"{name}Stub"), type)
        assert isinstance(getattr(serve_pb2_grpc, f"{name}Servicer"), type)
    streaming = serve_pb2.DESCRIPTOR.services_by_name["UserDefinedService"].methods_by_name["Streaming"]
    assert streaming.server_streaming and not streaming.client_streaming


def test_services_and_messages_are_rays(ours: dict[str, Any]) -> None:
    ray = _ray()
    assert ours["package"] == ray["package"] == "ray.serve"
    assert ours["options"] == ray["options"]
    assert set(ray["services"]) - set(ours["services"]) == RAY_SERVICES_LEFT_OUT
    for name, methods in ours["services"].items():
        assert methods == ray["services"].get(name), f"service {name} differs from Ray's"
    for name, fields in ours["messages"].items():
        assert fields == ray["messages"].get(name), f"message {name} differs from Ray's"
    # every message our services use is there (the comparison above covers their fields)
    used = {t.rsplit(".", 1)[-1] for methods in ours["services"].values() for m in methods for t in m[1:3]}
    assert used <= set(ours["messages"])
    # and the generated servicer module has Ray's names for these services
    left_out = {n for n in ray["grpc_names"] if any(s in n for s in RAY_SERVICES_LEFT_OUT)}
    assert set(ray["grpc_names"]) - left_out <= set(ours["grpc_names"])


def _embedded_descriptor(pb2_source: str) -> bytes:
    """The serialized FileDescriptorProto a generated ``_pb2.py`` adds to the pool."""
    for node in ast.walk(ast.parse(pb2_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            value = ast.literal_eval(node.args[0])
            assert isinstance(value, bytes)
            return value
    raise AssertionError("no AddSerializedFile(...) in the generated module")


def _generated_version(text: str, pattern: str) -> tuple[int, ...]:
    match = re.search(pattern, text, re.S)
    assert match, pattern
    return tuple(int(part) for part in match.groups())


GRPC_VERSION_PATTERN = r"GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)'"
PROTOBUF_VERSION_PATTERN = r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"


def test_a_fresh_generation_from_the_committed_proto_gives_the_same_files(tmp_path: Path) -> None:
    """Run the command serve.proto documents; the descriptors must match the committed ones (and
    the files too, when the installed grpcio-tools is the one that wrote them)."""
    relative = PROTO.relative_to(REPO_ROOT)
    (tmp_path / relative.parent).mkdir(parents=True)
    shutil.copy(PROTO, tmp_path / relative)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", str(relative)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    fresh_dir = out / relative.parent
    fresh = (fresh_dir / "serve_pb2.py").read_text()
    committed = (GENERATED_DIR / "serve_pb2.py").read_text()
    assert _embedded_descriptor(fresh) == _embedded_descriptor(committed) == serve_pb2.DESCRIPTOR.serialized_pb
    fresh_grpc = (fresh_dir / "serve_pb2_grpc.py").read_text()
    committed_grpc = (GENERATED_DIR / "serve_pb2_grpc.py").read_text()
    if _generated_version(fresh_grpc, GRPC_VERSION_PATTERN) == _generated_version(committed_grpc, GRPC_VERSION_PATTERN):
        assert fresh_grpc == committed_grpc
        assert fresh == committed
        assert (fresh_dir / "serve_pb2.pyi").read_text() == (GENERATED_DIR / "serve_pb2.pyi").read_text()


def _lower_bound(requirements: list[str], name: str) -> tuple[int, ...]:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}>=([\d.]+)", requirement.replace(" ", ""))
        if match:
            return tuple(int(part) for part in match.group(1).split("."))
    raise AssertionError(f"no '{name}>=' lower bound in pyproject.toml")


def test_pinned_lower_bounds_pass_the_generated_codes_version_checks() -> None:
    """The generated modules refuse a protobuf or grpcio older than the generator's (protobuf's
    ValidateProtobufRuntimeVersion, grpcio's GRPC_GENERATED_VERSION check): pyproject.toml must
    not allow one."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    protobuf_needed = _generated_version((GENERATED_DIR / "serve_pb2.py").read_text(), PROTOBUF_VERSION_PATTERN)
    grpc_needed = _generated_version((GENERATED_DIR / "serve_pb2_grpc.py").read_text(), GRPC_VERSION_PATTERN)
    assert _lower_bound(dependencies, "protobuf") >= protobuf_needed
    assert _lower_bound(dependencies, "grpcio") >= grpc_needed
    for name in ("grpcio-health-checking", "grpcio-reflection"):
        assert _lower_bound(dependencies, name) >= grpc_needed
    assert _lower_bound(project["optional-dependencies"]["test"], "grpcio-tools") >= grpc_needed
    # and what is installed passes them (the modules imported above, so this only restates it)
    assert tuple(int(p) for p in grpc.__version__.split(".")[:3]) >= grpc_needed


_NO_GRPC = """
import sys
import shoal.serve, shoal.runtime
from shoal import serve
import shoal.serve.api, shoal.serve.exceptions, shoal.serve.config
import shoal.runtime.wire, shoal.runtime.replica, shoal.runtime.worker_main, shoal.runtime.user_code
loaded = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "grpc_", "google.protobuf")))
print(loaded)
assert not loaded, loaded
"""


def test_importing_shoal_serve_or_runtime_does_not_import_grpc() -> None:
    done = subprocess.run([sys.executable, "-c", _NO_GRPC], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
