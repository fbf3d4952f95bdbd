"""Python stubs for the tests' .proto files, generated at test time with grpcio-tools.

``generate(out_dir)`` writes ``greeter_pb2.py`` and ``greeter_pb2_grpc.py`` into ``out_dir``;
``importable(out_dir)`` puts it on this process's ``sys.path`` and on ``PYTHONPATH``, so the
instance this process starts (supervisor, proxies, replicas inherit the environment) imports
them too. ``modules(out_dir)`` does both and returns the two modules.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

PROTOS = Path(__file__).parent
SERVICER_FUNCTION = "greeter_pb2_grpc.add_GreeterServicer_to_server"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main([
        "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        str(PROTOS / "greeter.proto"),
    ])
    if code != 0:
        raise RuntimeError(f"protoc failed with code {code}")


def importable(out_dir: Path) -> None:
    sys.path.insert(0, str(out_dir))
    current = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(out_dir) + (os.pathsep + current if current else "")


def modules(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """``greeter_pb2`` and ``greeter_pb2_grpc``, generated into ``out_dir`` and importable."""
    generate(out_dir)
    importable(out_dir)
    return importlib.import_module("greeter_pb2"), importlib.import_module("greeter_pb2_grpc")
