"""The table of Ray Serve 2.60's metric names (tests/ray_serve_metrics.py) and its extractor.

The table is generated from Ray's source by tests/tools/extract_ray_serve_metrics.py. With
``SHOAL_RAY_PYTHON`` naming an interpreter that has Ray 2.60, the table is extracted again and
must be identical; without it the stored table is used (the test that compares says so when it
skips). The extractor itself is tested here on small made-up sources, so it needs no Ray.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import ray_serve_metrics
import shoal_metrics_contract
from helpers import TESTS_DIR
from ray_serve_metrics import BY_NAME, METRICS, RAY_VERSION, family_of

sys.path.insert(0, str(TESTS_DIR / "tools"))
import extract_ray_serve_metrics as extractor

KINDS = {"counter", "gauge", "histogram"}


def test_table_is_well_formed() -> None:
    names = [metric.name for metric in METRICS]
    assert names == sorted(set(names)), "sorted, each name once"
    for metric in METRICS:
        assert metric.name.startswith("ray_serve_"), metric
        assert metric.kind in KINDS, metric
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric
        if metric.labels is not None:
            assert len(set(metric.labels)) == len(metric.labels), metric
            assert "le" not in metric.labels, metric


def test_the_names_shoal_promises_are_rays() -> None:
    assert len(set(shoal_metrics_contract.REQUIRED)) == len(shoal_metrics_contract.REQUIRED)
    not_rays = [name for name in shoal_metrics_contract.REQUIRED if name not in BY_NAME]
    assert not not_rays, f"not Ray Serve {RAY_VERSION} names: {not_rays}"
    assert all(BY_NAME[name].labels is not None for name in shoal_metrics_contract.REQUIRED)


def test_labels_of_a_few_well_known_metrics() -> None:
    """Spot checks against Ray's source, read by a person (request_ingress_metrics.py, replica.py, router.py)."""
    assert set(BY_NAME["ray_serve_num_http_requests_total"].labels or ()) == {"route", "method", "application", "status_code"}
    assert set(BY_NAME["ray_serve_deployment_request_counter_total"].labels or ()) == {
        "deployment", "replica", "application", "route",
    }
    assert set(BY_NAME["ray_serve_num_router_requests_total"].labels or ()) == {
        "deployment", "route", "application", "handle", "actor_id",
    }
    assert BY_NAME["ray_serve_http_request_latency_ms"].kind == "histogram"
    assert BY_NAME["ray_serve_health_check_failures_total"].kind == "counter"  # Ray's own name ends in _total


def test_family_of_a_series() -> None:
    assert family_of("ray_serve_http_request_latency_ms_bucket") == BY_NAME["ray_serve_http_request_latency_ms"]
    assert family_of("ray_serve_http_request_latency_ms_count") == BY_NAME["ray_serve_http_request_latency_ms"]
    assert family_of("ray_serve_num_http_requests_total") == BY_NAME["ray_serve_num_http_requests_total"]
    assert family_of("ray_serve_num_http_requests_total_count") is None  # not a histogram
    assert family_of("ray_serve_num_http_requests") is None  # Ray's deprecated gauge twin is not listed
    assert family_of("ray_serve_made_up") is None


def test_stored_table_matches_rays_source() -> None:
    python = os.environ.get("SHOAL_RAY_PYTHON")
    if not python:
        pytest.skip(
            f"SHOAL_RAY_PYTHON is not set: using the stored table (tests/ray_serve_metrics.py, Ray {RAY_VERSION}); "
            "set it to a Python that has Ray to extract the table again and compare"
        )
    serve_dir, version = extractor.ray_location(python)
    if version != RAY_VERSION:
        pytest.skip(f"{python} has Ray {version}, the stored table is Ray {RAY_VERSION}'s: using the stored table")
    stored = Path(ray_serve_metrics.__file__).read_text()
    assert extractor.render(extractor.extract(serve_dir), version) == stored, (
        "tests/ray_serve_metrics.py differs from what Ray's source says: regenerate it with "
        "tests/tools/extract_ray_serve_metrics.py"
    )


# -- the extractor, on made-up sources --------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    serve_dir = root / "ray" / "serve"
    for relative, text in {"_private/constants.py": 'FLAG = get_env_bool("FLAG", "1")\nOFF = get_env_bool("OFF", "0")\n', **files}.items():
        path = serve_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return serve_dir


def test_extractor_reads_literals_fstrings_variables_and_flags(tmp_path: Path) -> None:
    serve_dir = _write(tmp_path, {
        "_private/proxy_metrics.py": """
            from ray.util import metrics as m
            from ray.util.metrics import Histogram
            from ray.serve._private.constants import FLAG, OFF

            class Metrics:
                def __init__(self, protocol_name):
                    keys = ("a", "b") if FLAG else ("a",)
                    other = ("x",) if OFF else ("y", "z")
                    m.Counter(f"serve_num_{protocol_name}_requests", description="d", tag_keys=("route",))
                    m.Counter("serve_failures_total", "d", keys)
                    m.Gauge(name="serve_ongoing", tag_keys=other).set_default_tags({})
                    Histogram("serve_latency_ms", "d", [1, 2])
        """,
        "batching.py": """
            from ray.serve.metrics import Gauge
            Gauge("serve_batch_queue_length", tag_keys=("function_name",))
        """,
        "_private/controller_side.py": """
            from ray.serve import metrics
            metrics.Gauge("serve_healthy", tag_keys=("deployment",))
        """,
        "_private/event_loop.py": """
            from ray.util import metrics
            class Monitor:
                def __init__(self):
                    metrics.Gauge("serve_event_loop_tasks", tag_keys=self._tag_keys)
        """,
        "tests/test_x.py": "from ray.util import metrics\nmetrics.Gauge('serve_from_a_test')\n",
    })
    found = {m.name: (m.kind, m.labels) for m in extractor.extract(serve_dir)}
    assert found == {
        "ray_serve_num_http_requests_total": ("counter", ("route",)),
        "ray_serve_num_grpc_requests_total": ("counter", ("route",)),
        "ray_serve_failures_total": ("counter", ("a", "b")),
        "ray_serve_ongoing": ("gauge", ("y", "z")),
        "ray_serve_latency_ms": ("histogram", ()),
        # ray.serve.metrics in a module that runs in a replica: the replica's tags come first
        "ray_serve_batch_queue_length": ("gauge", ("deployment", "replica", "application", "function_name")),
        # ... and not in the controller
        "ray_serve_healthy": ("gauge", ("deployment",)),
        "ray_serve_event_loop_tasks": ("gauge", None),
    }


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ('metrics.Counter(f"serve_{what}_x")', "unknown placeholder"),
        ("metrics.Counter(NAME)", "not a literal"),
        ('metrics.Counter("serve_x", tag_keys=KEYS)', "assigned 0 times"),
        ('metrics.Counter("serve_x", tag_keys=("a", KEY))', "tag key is not a literal"),
    ],
)
def test_extractor_refuses_what_it_cannot_read(tmp_path: Path, source: str, complaint: str) -> None:
    serve_dir = _write(tmp_path, {"handle.py": f"from ray.util import metrics\n{source}\n"})
    with pytest.raises(extractor.ExtractionError, match=complaint):
        extractor.extract(serve_dir)


def test_extractor_refuses_one_name_with_two_label_sets(tmp_path: Path) -> None:
    serve_dir = _write(tmp_path, {
        "a.py": "from ray.util import metrics\nmetrics.Gauge('serve_x', tag_keys=('a',))\n",
        "b.py": "from ray.util import metrics\nmetrics.Gauge('serve_x', tag_keys=('b',))\n",
    })
    with pytest.raises(extractor.ExtractionError, match="defined twice"):
        extractor.extract(serve_dir)


def test_rendered_table_is_the_module_it_regenerates(tmp_path: Path) -> None:
    """Rendering the stored rows again gives the stored file byte for byte (so a diff is Ray's change)."""
    rows = [extractor.Found(m.name, m.kind, m.labels, m.source) for m in METRICS]
    assert extractor.render(rows, RAY_VERSION) == Path(ray_serve_metrics.__file__).read_text()
