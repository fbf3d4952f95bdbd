"""Without servicer functions there is no gRPC: no listener, and grpcio is not even loaded."""

from __future__ import annotations

from typing import Any

import psutil
import pytest
from helpers import wait_until

from shoal import serve

pytestmark = pytest.mark.timeout(60)


def _loads_grpc(pid: int) -> bool:
    return any("cygrpc" in m.path for m in psutil.Process(pid).memory_maps())


def test_no_servicer_functions_no_grpc(serve_instance: Any) -> None:
    assert serve.get_grpc_url() is None
    pids = wait_until(lambda: [p.pid for p in serve.status().proxy_processes if p.pid], 30, "the proxy runs")
    for pid in [*pids, serve_instance.supervisor.pid]:
        assert not _loads_grpc(pid), f"process {pid} loaded grpcio"
