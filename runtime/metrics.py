"""Metrics with Ray's API (``ray.util.metrics``), recorded with prometheus-client.

``Counter``, ``Gauge`` and ``Histogram`` take Ray's arguments (``name``, ``description``,
``tag_keys``, ``boundaries``) and methods (``set_default_tags``, ``inc``/``set``/``observe`` with
``tags=``) and are exported as Ray exports them: a metric named ``serve_x`` is ``ray_serve_x``
in Prometheus, a counter ``ray_serve_x_total``. shoal's own metrics and users' metrics
(``shoal.serve.metrics``) are both made of these.

Where samples go: a process of an instance (supervisor, proxy, replica) calls ``enable(dir)``
once, before it records anything; from then on prometheus-client's multiprocess mode writes every
sample into memory-mapped files in ``dir`` (``<run dir>/metrics/``, one file per metric kind per
process, named by pid), which the supervisor's endpoint merges on each scrape
(``controller/metrics_endpoint.py``). Recording is a store into shared memory: it never touches
a socket. A process that never enables (a driver, local testing mode) records in memory and
exports nothing.

Gauges are summed across the processes still alive (prometheus-client's ``livesum``): each label
set of shoal's gauges is written by one process, so the sum is that process's value, and the
series goes away when the process dies.

Hot paths use ``bind(tags)``: the prometheus-client child for one label set, resolved once.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram
from prometheus_client import values as _prom_values

PREFIX = "ray_"
DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable; children inherit it

# Ray Serve's DEFAULT_LATENCY_BUCKET_MS (ray/serve/_private/constants.py, Ray 2.60).
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000, 5000, 10000, 60000, 120000, 300000, 600000,
)
# Ray Serve's DEFAULT_REPLICA_STARTUP_SHUTDOWN_LATENCY_BUCKETS_MS.
STARTUP_BUCKETS_MS: tuple[float, ...] = (
    5, 20, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000, 30000, 60000, 120000, 240000,
)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")  # Prometheus's (and Ray's) metric name rule

# One prometheus-client metric per (kind, name) in a process, shared by every ``Metric`` object
# of that name: in multiprocess mode each prometheus-client value caches its count and writes it
# back whole, so two objects counting one series would overwrite each other's increments.
_shared: dict[tuple[str, str], Any] = {}
_shared_lock = threading.Lock()


class _Discarded:
    """What ``bind`` returns for a metric whose name Prometheus cannot carry: records nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_DISCARDED = _Discarded()


def enable(directory: Path) -> None:
    """Record this process's samples into ``directory`` (created if missing) from now on.

    Call before the first sample; children started afterwards inherit the setting through the
    environment and call ``enable_from_env()``.
    """
    directory.mkdir(mode=0o700, exist_ok=True)
    os.environ[DIR_ENV] = str(directory)
    _prom_values.ValueClass = _prom_values.MultiProcessValue()


def enable_from_env() -> bool:
    """``enable`` the directory a parent process set, if any; True if it did."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return False
    enable(Path(directory))
    return True


def disable() -> None:
    """Record in memory from now on, and let children started afterwards do the same: an
    inherited ``PROMETHEUS_MULTIPROC_DIR`` (a user's own) is not an instance's to write into."""
    os.environ.pop(DIR_ENV, None)
    os.environ.pop(DIR_ENV.lower(), None)  # prometheus-client reads this older spelling too
    _prom_values.ValueClass = _prom_values.MutexValue


def enabled() -> bool:
    return bool(os.environ.get(DIR_ENV)) and _prom_values.ValueClass is not _prom_values.MutexValue


class Metric(ABC):
    """What Counter, Gauge and Histogram share: name and tag checks, default tags, label children.

    Behaves as Ray's ``ray.util.metrics.Metric``: ValueError for an empty name or a missing tag
    value, TypeError for tag keys that are not a tuple of str or tag values that are not str; a
    name Prometheus cannot carry is a UserWarning and the metric records nothing (Ray discards
    it); a name with ``:`` is a FutureWarning (Ray will refuse it). Unlike Ray, a sample with a tag
    key the metric does not have is a ValueError (a Prometheus series has fixed label names).
    """

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> None:
        if not name:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        self._discarded = not _NAME.match(name)
        if self._discarded:
            warnings.warn(
                f"Invalid metric name: {name}. Metric will be discarded and data will not be collected "
                "or published. Metric names can only contain letters, numbers, _, and :. Metric names "
                "cannot start with numbers.",
                UserWarning,
                stacklevel=3,
            )
        elif ":" in name:
            warnings.warn(
                f"Metric name {name} contains a : character, which is no longer allowed. Please migrate "
                "to the new metric name format. This will be an error in the future.",
                FutureWarning,
                stacklevel=3,
            )
        tag_keys = () if tag_keys is None else tag_keys
        if not isinstance(tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(tag_keys)}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")
        self._args: tuple[Any, ...] = (name, description, tag_keys)  # as given: what unpickling passes again
        self._name = name
        self._description = description
        self._tag_keys = tag_keys
        self._default_tags: dict[str, str] = {}
        self._children: dict[tuple[str, ...], Any] = {}
        self._prom: Any = None  # created at the first sample, after ``enable``

    @property
    def info(self) -> dict[str, Any]:
        return {
            "name": self._name, "description": self._description,
            "tag_keys": self._tag_keys, "default_tags": dict(self._default_tags),
        }

    def set_default_tags(self, default_tags: dict[str, str]) -> Metric:
        """Tags used when a sample does not give them; replaces earlier defaults. Returns the
        metric itself (as Ray's), so ``Counter(...).set_default_tags({...})`` is the metric."""
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        self._default_tags = dict(default_tags)
        self._children.clear()
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled metrics are created again where they are unpickled (as Ray's are)."""
        return _rebuild, (type(self), self._args, self._default_tags)

    def bind(self, tags: Mapping[str, str] | None = None) -> Any:
        """The prometheus-client child for the default tags updated with ``tags``."""
        final = self._default_tags if not tags else {**self._default_tags, **tags}
        values = self._values(final)
        child = self._children.get(values)
        if child is None:
            if self._discarded:
                return _DISCARDED
            prom = self._prom if self._prom is not None else self._shared_prom()
            child = prom.labels(*values) if self._tag_keys else prom
            self._children[values] = child
        return child

    def _shared_prom(self) -> Any:
        """This process's prometheus-client metric of this kind and name, created if missing. A
        metric of the same name but other label names (or buckets) gets one of its own."""
        key = (type(self).__name__, self._name)
        with _shared_lock:
            prom = _shared.get(key)
            if prom is None or not self._fits(prom):
                prom = _shared[key] = self._create_prom()
            self._prom = prom
        return prom

    def _fits(self, prom: Any) -> bool:
        return tuple(prom._labelnames) == self._tag_keys

    def _values(self, tags: Mapping[str, str]) -> tuple[str, ...]:
        missing = [key for key in self._tag_keys if key not in tags]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {','.join(missing)}.")
        for key, value in tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key} (the metric {self._name!r} has tag_keys {self._tag_keys}).")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        return tuple(tags[key] for key in self._tag_keys)

    @abstractmethod
    def _create_prom(self) -> Any:
        """A new prometheus-client metric of this kind (``_shared_prom`` shares it)."""

    def _common(self) -> dict[str, Any]:
        return {
            "name": PREFIX + self._name, "documentation": self._description or self._name,
            "labelnames": self._tag_keys, "registry": None,
        }


class Counter(Metric):
    """A monotonically increasing value; exported as ``ray_<name>_total``."""

    def _create_prom(self) -> Any:
        return _PromCounter(**self._common())

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value)}.")
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self.bind(tags).inc(value)


class Gauge(Metric):
    """A value that goes up and down; the last value set is exported."""

    def _create_prom(self) -> Any:
        return _PromGauge(**self._common(), multiprocess_mode="livesum")

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        if value is None:
            return
        if not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value)}.")
        self.bind(tags).set(value)


class Histogram(Metric):
    """Observations counted in buckets with the upper bounds ``boundaries`` (positive, ascending)."""

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(name, description, tag_keys)
        if not boundaries:
            raise ValueError(
                "boundaries argument should be provided when using the Histogram class. "
                "e.g., Histogram(\"name\", boundaries=[1.0, 2.0])"
            )
        for i, boundary in enumerate(boundaries):
            if boundary <= 0:
                raise ValueError(
                    f"Invalid `boundaries` argument at index {i}, {list(boundaries)}. "
                    "Use positive values for the arguments."
                )
        self.boundaries = list(boundaries)
        self._args = (name, description, self.boundaries, tag_keys)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": self.boundaries}

    def _create_prom(self) -> Any:
        return _PromHistogram(**self._common(), buckets=sorted(self.boundaries))

    def _fits(self, prom: Any) -> bool:
        return super()._fits(prom) and list(prom._upper_bounds[:-1]) == sorted(self.boundaries)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        if not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value)}.")
        self.bind(tags).observe(value)


def _rebuild(cls: type[Metric], args: tuple[Any, ...], default_tags: dict[str, str]) -> Metric:
    metric = cls(*args)
    if default_tags:
        metric.set_default_tags(default_tags)
    return metric
