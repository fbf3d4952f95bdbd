"""shoal.controller.main._start_metrics: which port the metrics endpoint takes, in this process
(recording into files is left off: ``metrics.enable`` would switch this test process to them)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.controller import main
from shoal.controller.metrics import ControllerGauges


class FakeController:
    def __init__(self) -> None:
        self.gauges = ControllerGauges()
        self.process_exited: Any = None


@pytest.fixture(autouse=True)
def no_sample_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main.metrics, "enable", lambda directory: directory.mkdir(exist_ok=True))


def test_the_http_port_on_the_default_metrics_port_moves_metrics_to_a_free_port(tmp_path: Path) -> None:
    """HTTP on 8080 (the default metrics port too): metrics take a free port, never 8080."""
    info: dict[str, Any] = {}
    controller = FakeController()
    endpoint = main._start_metrics(
        tmp_path, {"host": "127.0.0.1", "port": 8080, "metrics_port": 8080}, info, controller  # type: ignore[arg-type]
    )
    assert endpoint is not None
    try:
        assert endpoint.port not in (0, 8080)
        assert info["metrics_url"] == f"http://127.0.0.1:{endpoint.port}/metrics"
        assert controller.gauges.enabled and controller.process_exited is not None
        assert httpx.get(info["metrics_url"], timeout=10).status_code == 200
    finally:
        endpoint.close()


def test_an_explicit_metrics_port_equal_to_the_http_port_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        main._start_metrics(
            tmp_path, {"host": "127.0.0.1", "port": 9123, "metrics_port": 9123}, {}, FakeController()  # type: ignore[arg-type]
        )


def test_without_http_its_port_is_free_for_metrics(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    info: dict[str, Any] = {}
    options = {"host": None, "port": port, "metrics_port": port}  # host None: no HTTP proxy
    endpoint = main._start_metrics(tmp_path, options, info, FakeController())  # type: ignore[arg-type]
    assert endpoint is not None
    try:
        assert info["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
    finally:
        endpoint.close()
