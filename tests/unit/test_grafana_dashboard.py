"""The Grafana dashboard (deploy/grafana/shoal-serve-dashboard.json) and the Prometheus example.

The dashboard must be a structure Grafana imports (panels with targets, unique ids, a
``${datasource}`` variable) and use only metric names shoal promises to export, all of them Ray
Serve's (so a panel is never empty because it asks for a name shoal does not have). That its
queries parse is checked by a real Prometheus in tests/integration/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray_serve_metrics import family_of
from shoal_metrics_contract import REQUIRED

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "shoal-serve-dashboard.json"
PROMETHEUS_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"

_METRIC = re.compile(r"\bray_[a-zA-Z0-9_]+")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    exprs = [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard()["templating"]["list"] if var["type"] == "query"]
    return exprs


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["title"] and board["uid"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("application", "deployment"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
    for panel in graphs:
        assert panel["title"] and panel["type"] == "timeseries", panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("expr", queries())
def test_every_query_uses_only_names_shoal_exports(expr: str) -> None:
    names = _METRIC.findall(expr)
    assert names, f"no metric in {expr}"
    for name in names:
        metric = family_of(name)
        assert metric is not None, f"{name} is not a Ray Serve metric"
        assert metric.name in REQUIRED, f"{metric.name} is Ray's, but shoal does not promise to export it"
    for selected in _SELECTOR.findall(expr):
        assert selected.startswith("ray_serve_") or selected == "label_values", f"{selected} in {expr}"


def test_dashboard_covers_the_issue() -> None:
    """Requests, errors, latency percentiles, replicas, queue lengths, batch sizes (issue 9, item 8)."""
    used = {family.name for expr in queries() for name in _METRIC.findall(expr) if (family := family_of(name))}
    for name in (
        "ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
        "ray_serve_http_request_latency_ms", "ray_serve_deployment_processing_latency_ms",
        "ray_serve_replica_processing_queries", "ray_serve_deployment_queued_queries",
        "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",
        "ray_serve_autoscaling_desired_replicas", "ray_serve_deployment_replica_starts_total",
        "ray_serve_health_check_failures_total", "ray_serve_actual_batch_size", "ray_serve_batch_queue_length",
        "ray_serve_num_multiplexed_models",
    ):
        assert name in used, f"the dashboard does not show {name}"
    exprs = queries()
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e and "ray_serve_http_request_latency_ms_bucket" in e for e in exprs
        ), quantile


def test_prometheus_example_scrapes_the_default_port() -> None:
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"
