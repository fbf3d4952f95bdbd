"""The pod-count decision of deploy/kubernetes' autoscalers, computed here from shoal's metrics.

The base's KEDA ScaledObject (and the HPA of ``components/hpa-external``, with the same numbers)
has one Prometheus trigger per metric, each ``sum(<metric>{...})`` over the pods with
``metricType: AverageValue`` and a ``threshold`` (the target per pod). Kubernetes' HPA, which KEDA
drives, then wants, per trigger, ``ceil(total / threshold)`` pods, takes the largest over the
triggers and clamps it to ``[minReplicaCount, maxReplicaCount]``; it keeps the current count
while ``total / (current * threshold)`` is within its 10% tolerance of 1.

``benchmarks/pods.py`` uses it on the metrics scraped from N local instances;
``tests/unit/test_kubernetes_manifests.py`` checks that it reads the manifest's own numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCALED_OBJECT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "base" / "scaledobject.yaml"
HPA_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance default

_METRIC = re.compile(r"\b(ray_serve_[a-zA-Z0-9_]+)")


@dataclass(frozen=True)
class Trigger:
    """One Prometheus trigger: the metric its query sums, and the target per pod."""

    name: str
    metric: str
    threshold: float


@dataclass(frozen=True)
class Policy:
    """The autoscaler's numbers: the triggers and the bounds of the pod count."""

    triggers: tuple[Trigger, ...]
    min_pods: int
    max_pods: int


def policy_of(scaled_object: Mapping[str, Any]) -> Policy:
    """The triggers and bounds of a ScaledObject (a parsed manifest). Every trigger must be a
    Prometheus one summing exactly one shoal metric with ``metricType: AverageValue``."""
    spec = scaled_object["spec"]
    triggers = []
    for trigger in spec["triggers"]:
        if trigger["type"] != "prometheus" or trigger.get("metricType", "AverageValue") != "AverageValue":
            raise ValueError(f"trigger {trigger.get('name')!r}: only Prometheus triggers with AverageValue are modelled")
        query = trigger["metadata"]["query"]
        metrics = set(_METRIC.findall(query))
        if len(metrics) != 1 or not query.replace(" ", "").startswith("sum("):
            raise ValueError(f"trigger {trigger.get('name')!r}: expected sum(<one shoal metric>{{...}}), got {query!r}")
        triggers.append(Trigger(trigger.get("name", ""), metrics.pop(), float(trigger["metadata"]["threshold"])))
    return Policy(tuple(triggers), int(spec.get("minReplicaCount", 0)), int(spec.get("maxReplicaCount", 100)))


def load_policy(path: Path = SCALED_OBJECT) -> Policy:
    return policy_of(yaml.safe_load(path.read_text()))


def wanted_by_trigger(policy: Policy, totals: Mapping[str, float], current_pods: int | None = None) -> dict[str, int]:
    """Per trigger, ``ceil(total of its metric / threshold)`` (0 for a metric with no samples);
    with ``current_pods``, the HPA's tolerance: ``current_pods`` while the metric per pod is
    within 10% of the threshold."""
    wanted = {}
    for t in policy.triggers:
        total = totals.get(t.metric, 0.0)
        if current_pods and abs(total / (current_pods * t.threshold) - 1.0) <= HPA_TOLERANCE:
            wanted[t.name] = current_pods
        else:
            wanted[t.name] = math.ceil(total / t.threshold)
    return wanted


def desired_pods(policy: Policy, totals: Mapping[str, float], current_pods: int | None = None) -> int:
    """The pod count the autoscaler asks for, given the metrics summed over every pod: the
    largest of the triggers' counts, clamped to the bounds."""
    wanted = max(wanted_by_trigger(policy, totals, current_pods).values(), default=0)
    return max(policy.min_pods, min(policy.max_pods, wanted))


def sum_metric(text: str, metric: str) -> float:
    """The sum of every sample of ``metric`` (a gauge) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and line[len(metric):len(metric) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
