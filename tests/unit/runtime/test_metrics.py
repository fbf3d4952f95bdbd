"""runtime/metrics.py: Ray's metric API (``ray.util.metrics``) on prometheus-client.

Ray's checks and messages, the exported names (``ray_`` prefix, ``_total`` for counters), default
tags, pickling, and one prometheus-client metric per name in a process, so two objects of one name
count into one series (also in multiprocess mode, where each value caches what it wrote).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import values as prom_values
from prometheus_client.multiprocess import MultiProcessCollector

from shoal.runtime import metrics
from shoal.runtime.metrics import Counter, Gauge, Histogram

_ids = itertools.count()


def unique(prefix: str) -> str:
    """A metric name no other test of this process uses (metrics of one name are shared)."""
    return f"{prefix}_{next(_ids)}"


def samples(metric: metrics.Metric) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What ``metric`` exports now: {(sample name, labels): value}."""
    prom = metric._prom
    assert prom is not None, "nothing recorded yet"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in prom.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


# -- Ray's argument checks --------------------------------------------------------------------


def test_an_empty_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Empty name is not allowed"):
        Counter("")


def test_a_malformed_name_warns_and_the_metric_records_nothing() -> None:
    with pytest.warns(UserWarning, match="Invalid metric name: 1bad-name"):
        counter = Counter("1bad-name")
    counter.inc()  # discarded, as Ray discards it
    assert counter._prom is None


def test_a_name_with_a_colon_is_a_future_warning_but_is_kept() -> None:
    name = unique("ns:colon")
    with pytest.warns(FutureWarning, match="contains a : character"):
        counter = Counter(name)
    counter.inc(2)
    assert samples(counter)[(f"ray_{name}_total", frozenset())] == 2


@pytest.mark.parametrize("tag_keys", [["a"], "a", {"a"}])
def test_tag_keys_that_are_not_a_tuple_are_a_type_error(tag_keys: Any) -> None:
    with pytest.raises(TypeError, match="tag_keys should be a tuple type"):
        Counter(unique("c"), tag_keys=tag_keys)


def test_tag_keys_that_are_not_str_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="Tag keys must be str"):
        Gauge(unique("g"), tag_keys=("a", 1))  # type: ignore[arg-type]


def test_a_missing_tag_value_is_a_value_error_naming_the_keys() -> None:
    counter = Counter(unique("c"), tag_keys=("a", "b"))
    with pytest.raises(ValueError, match="Missing value for tag key"):
        counter.inc(tags={"a": "1"})


def test_an_unrecognized_tag_key_is_a_value_error() -> None:
    counter = Counter(unique("c"), tag_keys=("a",))
    with pytest.raises(ValueError, match="Unrecognized tag key b"):
        counter.set_default_tags({"b": "x"})
    with pytest.raises(ValueError, match="Unrecognized tag key b"):
        counter.inc(tags={"a": "1", "b": "2"})


def test_tag_values_must_be_str() -> None:
    counter = Counter(unique("c"), tag_keys=("a",))
    with pytest.raises(TypeError, match="Tag values must be str"):
        counter.set_default_tags({"a": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="Tag values must be str"):
        counter.inc(tags={"a": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("boundaries", [None, []])
def test_a_histogram_needs_boundaries(boundaries: Any) -> None:
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        Histogram(unique("h"), boundaries=boundaries)


@pytest.mark.parametrize("boundaries", [[0, 1], [1, -2]])
def test_histogram_boundaries_must_be_positive(boundaries: list[float]) -> None:
    with pytest.raises(ValueError, match="Use positive values"):
        Histogram(unique("h"), boundaries=boundaries)


@pytest.mark.parametrize("value", [0, -1, -0.5])
def test_a_counter_only_goes_up(value: float) -> None:
    with pytest.raises(ValueError, match="value must be >0"):
        Counter(unique("c")).inc(value)


@pytest.mark.parametrize("call", ["inc", "set", "observe"])
def test_values_must_be_numbers(call: str) -> None:
    metric: Any = {"inc": Counter(unique("c")), "set": Gauge(unique("g")),
                   "observe": Histogram(unique("h"), boundaries=[1])}[call]
    with pytest.raises(TypeError, match="value must be int or float"):
        getattr(metric, call)("1")


def test_a_gauge_set_to_none_records_nothing() -> None:
    gauge = Gauge(unique("g"))
    gauge.set(None)
    assert gauge._prom is None


# -- what is exported ---------------------------------------------------------------------------


def test_names_labels_and_values_as_ray_exports_them() -> None:
    name = unique("serve_thing")
    counter = Counter(name, description="Things.", tag_keys=("route",))
    counter.inc(tags={"route": "/a"})
    counter.inc(2.5, tags={"route": "/a"})
    counter.inc(tags={"route": "/b"})
    assert samples(counter) == {
        (f"ray_{name}_total", frozenset({("route", "/a")})): 3.5,
        (f"ray_{name}_total", frozenset({("route", "/b")})): 1.0,
    }
    gauge = Gauge(unique("g"), tag_keys=("k",))
    gauge.set(3, tags={"k": "v"})
    gauge.set(-1, tags={"k": "v"})
    assert list(samples(gauge).values()) == [-1]
    hist = Histogram(unique("h"), boundaries=[10, 1], tag_keys=())  # unsorted: sorted as Ray does
    hist.observe(0.5)
    hist.observe(5)
    hist.observe(50)
    got = {(n.rsplit("_", 1)[-1], dict(labels).get("le")): v for (n, labels), v in samples(hist).items()}
    assert got == {("bucket", "1.0"): 1, ("bucket", "10.0"): 2, ("bucket", "+Inf"): 3, ("count", None): 3, ("sum", None): 55.5}


def test_default_tags_fill_what_a_sample_leaves_out_and_set_default_tags_returns_the_metric() -> None:
    name = unique("c")
    counter = Counter(name, tag_keys=("a", "b"))
    assert counter.set_default_tags({"a": "x", "b": "y"}) is counter
    counter.inc()
    counter.inc(tags={"b": "z"})
    assert samples(counter) == {
        (f"ray_{name}_total", frozenset({("a", "x"), ("b", "y")})): 1,
        (f"ray_{name}_total", frozenset({("a", "x"), ("b", "z")})): 1,
    }
    assert counter.info == {"name": name, "description": "", "tag_keys": ("a", "b"), "default_tags": {"a": "x", "b": "y"}}


def test_bind_returns_one_child_per_label_set() -> None:
    counter = Counter(unique("c"), tag_keys=("a",))
    assert counter.bind({"a": "1"}) is counter.bind({"a": "1"})
    assert counter.bind({"a": "1"}) is not counter.bind({"a": "2"})


def test_two_metrics_of_one_name_count_into_one_series() -> None:
    name = unique("shared")
    first, second = Counter(name, tag_keys=("a",)), Counter(name, tag_keys=("a",))
    first.inc(tags={"a": "1"})
    second.inc(tags={"a": "1"})
    assert samples(first) == samples(second) == {(f"ray_{name}_total", frozenset({("a", "1")})): 2}


def test_two_objects_of_one_name_add_up_in_multiprocess_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each prometheus-client value caches its count and writes it whole into the file: two
    values for one series would overwrite each other's increments; shared ones do not."""
    monkeypatch.setenv(metrics.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(prom_values, "ValueClass", prom_values.MultiProcessValue())
    name = unique("mp")
    first, second = Counter(name, tag_keys=("a",)), Counter(name, tag_keys=("a",))
    first.inc(tags={"a": "1"})
    second.inc(tags={"a": "1"})
    first.inc(tags={"a": "1"})
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value(f"ray_{name}_total", {"a": "1"}) == 3


def test_a_metric_of_one_name_with_other_labels_gets_its_own() -> None:
    name = unique("c")
    first, second = Counter(name, tag_keys=("a",)), Counter(name, tag_keys=("b",))
    first.inc(tags={"a": "1"})
    second.inc(tags={"b": "2"})
    assert samples(second) == {(f"ray_{name}_total", frozenset({("b", "2")})): 1}


# -- pickling -----------------------------------------------------------------------------------


def test_metrics_survive_a_cloudpickle_round_trip_with_their_settings() -> None:
    name = unique("p")
    counter = Counter(name, description="d", tag_keys=("a",)).set_default_tags({"a": "x"})
    hist = Histogram(unique("h"), description="h", boundaries=[1, 2], tag_keys=("a",))
    gauge = Gauge(unique("g"))
    counter_copy, hist_copy, gauge_copy = cloudpickle.loads(cloudpickle.dumps((counter, hist, gauge)))
    assert type(counter_copy) is Counter and counter_copy.info == counter.info
    assert type(hist_copy) is Histogram and hist_copy.info == hist.info
    assert type(gauge_copy) is Gauge and gauge_copy.info == gauge.info
    counter.inc()
    counter_copy.inc()  # the same name in the same process: the same series
    assert samples(counter_copy) == {(f"ray_{name}_total", frozenset({("a", "x")})): 2}
