"""deploy/kubernetes: every manifest valid against Kubernetes' schemas, the overlays rendered by a
real kustomize, and the wiring to what shoal really serves and exports.

- Schemas, offline: the Kubernetes kinds with ``kubernetes-validate`` (its bundled schemas,
  strict: an unknown field is an error) for the oldest and newest Kubernetes versions checked;
  KEDA's ScaledObject and the Prometheus Operator's ServiceMonitor, which are CRDs, against their
  CRD OpenAPI schemas vendored in ``tests/unit/kubernetes_crd_schemas/`` (where each comes from
  is in its ``$comment``), made strict the way the API server's strict field validation is.
- Rendering: ``kubectl kustomize`` (kustomize v5, built into kubectl; kubectl is part of this
  project's machine image, Debian's ``kubectl``), so the base, the overlays and the component are
  rendered exactly as ``kubectl apply -k`` would.
- Wiring: the probes ask shoal's health path on the port the Serve config serves; the metrics
  port, the annotations, the Service and the ServiceMonitor agree; the ConfigMap's file is a
  config shoal deploys (its own schema, and the app imports); the autoscalers' queries name
  metrics shoal exports, gauges of Ray Serve's; the grace period covers shoal's drain.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from ray_serve_metrics import BY_NAME
from shoal_metrics_contract import REQUIRED

from shoal.serve import config_file
from shoal.serve.schema import DeploymentSchema

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
CRD_SCHEMAS = Path(__file__).resolve().parent / "kubernetes_crd_schemas"
POD_SCALING = ROOT / "benchmarks" / "_pod_scaling.py"

# (kustomization directory, namespace it renders into, the autoscaler kind it carries)
RENDERED = {
    "base": ("shoal", "ScaledObject"),
    "overlays/example": ("shoal-example", "ScaledObject"),
    "overlays/example-hpa": ("shoal-example", "HorizontalPodAutoscaler"),
}
# The oldest Kubernetes the manifests promise to work on, and the newest kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}
# KEDA's Prometheus scaler's metadata keys (keda.sh/docs/latest/scalers/prometheus); the CRD
# leaves trigger metadata a free map of strings, so the test checks them.
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout", "authModes",
}
CONFIG_KEY = "serve_config.yaml"
CONFIG_PATH = "/app/serve_config.yaml"
HEALTH_PATH = "/-/healthz"
# What shoal's supervisor adds to a drain before it kills: a proxy gets its
# graceful_shutdown_timeout_s + 2 s (controller/proxy.py), a replica its own + _DRAIN_EXTRA_S
# (controller/executor.py).
PROXY_EXIT_S = 2.0
DEFAULT_REPLICA_GRACE_S = DeploymentSchema.model_fields["graceful_shutdown_timeout_s"].default or 20.0


# ----------------------------------------------------------------------------------- loading


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with kustomize built in) is not installed: `apt-get install kubectl` "
                    "or any kubectl >= 1.27; the render and the wiring of the overlays need it")
    return path


@cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize KUBE/directory`` renders."""
    proc = subprocess.run([_kubectl(), "kustomize", str(KUBE / directory)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def source_manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every full object written in the repository (the base's resources and the component's),
    by file name; kustomizations and patches are not objects."""
    for kustomization in (BASE / "kustomization.yaml", KUBE / "components" / "hpa-external" / "kustomization.yaml"):
        for name in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = kustomization.parent / name
            for doc in yaml.safe_load_all(path.read_text()):
                yield f"{path.relative_to(KUBE)}", doc


def serve_config_of(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(one(objects, "ConfigMap")["data"][CONFIG_KEY])
    return loaded


def container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["shoal"]
    found: dict[str, Any] = containers[0]
    return found


# ---------------------------------------------------------------------------------- schemas


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields of an object, as the
    API server's strict field validation does (``kubectl apply --validate=strict``)."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = strict(json.loads((CRD_SCHEMAS / CRDS[(api_version, kind)]).read_text()))
    return loaded


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise if ``obj`` is not valid: a CRD against its vendored schema, anything else against
    Kubernetes' own schema for ``version``."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRDS:
        jsonschema.validate(obj, crd_schema(*key))
        _check_metadata(obj["metadata"])
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def _check_metadata(metadata: dict[str, Any]) -> None:
    """A CRD's schema says only ``metadata: object``; the API server checks it as ObjectMeta."""
    assert set(metadata) <= {"name", "namespace", "labels", "annotations"}, metadata
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"]), metadata["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_source_manifest_is_valid(version: str) -> None:
    names = []
    for name, obj in source_manifests():
        validate(obj, version)
        names.append(f"{name}:{obj['kind']}")
    assert len(names) == 6, names  # Deployment, Service, PDB, ServiceMonitor, ScaledObject, HPA


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_every_rendered_object_is_valid(directory: str, version: str) -> None:
    objects = render(directory)
    for obj in objects:
        validate(obj, version)
    namespace, autoscaler = RENDERED[directory]
    assert sorted(o["kind"] for o in objects) == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor", autoscaler])
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}


def test_kubernetes_validate_works_offline_with_its_bundled_schemas() -> None:
    """The versions come from files inside the package (no download), and a typo is an error."""
    assert "1.29.0" in kv_utils.all_versions()
    deployment = copy.deepcopy(one(render("base"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = HEALTH_PATH
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        validate(deployment, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("kind", ["ScaledObject", "ServiceMonitor"])
def test_the_vendored_crd_schemas_refuse_a_misspelt_or_mistyped_field(kind: str) -> None:
    obj = one(render("base"), kind)
    misspelt = copy.deepcopy(obj)
    misspelt["spec"]["minReplicas" if kind == "ScaledObject" else "endpoint"] = 1
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validate(misspelt, KUBERNETES_VERSIONS[-1])
    mistyped = copy.deepcopy(obj)
    if kind == "ScaledObject":
        mistyped["spec"]["maxReplicaCount"] = "10"
    else:
        mistyped["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(mistyped, KUBERNETES_VERSIONS[-1])
    for name in CRDS.values():
        assert "github.com/" in json.loads((CRD_SCHEMAS / name).read_text())["$comment"]  # says where from


# ---------------------------------------------------------------------------------- rendering


def test_the_overlay_changes_image_pod_count_thresholds_and_namespace() -> None:
    base, example = render("base"), render("overlays/example")
    assert container(base)["image"] == "shoal:latest"
    assert container(example)["image"] == "registry.example.com/team/shoal:0.1.0"
    assert one(base, "Deployment")["spec"]["replicas"] == 2
    assert one(example, "Deployment")["spec"]["replicas"] == 3
    base_scaling, example_scaling = one(base, "ScaledObject")["spec"], one(example, "ScaledObject")["spec"]
    assert (base_scaling["minReplicaCount"], base_scaling["maxReplicaCount"]) == (2, 10)
    assert (example_scaling["minReplicaCount"], example_scaling["maxReplicaCount"]) == (3, 20)
    assert [t["metadata"]["threshold"] for t in base_scaling["triggers"]] == ["8", "4"]
    assert [t["metadata"]["threshold"] for t in example_scaling["triggers"]] == ["16", "8"]
    # What the overlay does not patch comes through from the base unchanged.
    assert example_scaling["advanced"] == base_scaling["advanced"]
    assert container(example)["readinessProbe"] == container(base)["readinessProbe"]


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_the_config_map_gets_a_hash_suffix_and_the_deployment_mounts_that_name(directory: str) -> None:
    objects = render(directory)
    config_map = one(objects, "ConfigMap")
    assert re.fullmatch(r"shoal-serve-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    config_mount = mounts[CONFIG_PATH]
    assert config_mount["subPath"] == CONFIG_KEY and config_mount.get("readOnly") is True
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"][CONFIG_KEY] == (BASE / CONFIG_KEY).read_text()


def test_the_config_map_name_changes_with_the_config(tmp_path: Path) -> None:
    """A new config is a new ConfigMap name in the pod template: the Deployment rolls."""
    copy_dir = tmp_path / "base"
    shutil.copytree(BASE, copy_dir)
    config = copy_dir / CONFIG_KEY
    config.write_text(config.read_text().replace("num_replicas: 2", "num_replicas: 3"))
    proc = subprocess.run([_kubectl(), "kustomize", str(copy_dir)], capture_output=True, text=True, timeout=60, check=True)
    changed = next(d for d in yaml.safe_load_all(proc.stdout) if d["kind"] == "ConfigMap")
    assert changed["metadata"]["name"] != one(render("base"), "ConfigMap")["metadata"]["name"]


@pytest.mark.parametrize(("keda_from", "hpa_from"), [
    ("base", "components/hpa-external/hpa.yaml"), ("overlays/example", "overlays/example-hpa")])
def test_the_hpa_alternative_decides_with_the_scaled_object_s_numbers(keda_from: str, hpa_from: str) -> None:
    """The component's HPA has the base's numbers and the HPA overlay the example's; two
    autoscalers never drive one Deployment (the HPA overlay renders no ScaledObject)."""
    so_spec = one(render(keda_from), "ScaledObject")["spec"]
    keda = {t["metadata"]["query"]: t for t in so_spec["triggers"]}
    if hpa_from.endswith(".yaml"):
        hpa = yaml.safe_load((KUBE / hpa_from).read_text())["spec"]
    else:
        hpa = one(render(hpa_from), "HorizontalPodAutoscaler")["spec"]
        assert not [o for o in render(hpa_from) if o["kind"] == "ScaledObject"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (so_spec["minReplicaCount"], so_spec["maxReplicaCount"])
    assert hpa["behavior"] == so_spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    by_metric = {_metrics_in(q)[0]: t["metadata"]["threshold"] for q, t in keda.items()}
    assert {m["external"]["metric"]["name"]: m["external"]["target"]["averageValue"] for m in hpa["metrics"]} == by_metric
    assert all(m["external"]["target"]["type"] == "AverageValue" for m in hpa["metrics"])
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shoal"}


# ---------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_the_config_map_holds_a_config_shoal_deploys(directory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed by shoal's own config schema (``shoal deploy``/``shoal run``'s validation), and its
    application imports and builds: what the pod will run. ``shoal run`` imports from its
    working directory (``--app-dir``, default "."); the image's holds ``examples/``."""
    monkeypatch.syspath_prepend(str(ROOT))
    path = tmp_path / CONFIG_KEY
    path.write_text(one(render(directory), "ConfigMap")["data"][CONFIG_KEY])
    loaded = config_file.load(path)
    config_file.check_instance_options(loaded)
    assert [s["name"] for s in config_file.build_specs(loaded)] == ["hello"]
    assert loaded.http_options.host == "0.0.0.0"  # reachable from the kubelet and the Service, not loopback only
    assert loaded.logging_config is not None and loaded.logging_config.encoding == "JSON"


def _port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_probes_and_ports_match_what_shoal_serves(directory: str) -> None:
    objects = render(directory)
    http = serve_config_of(objects)["http_options"]
    c = container(objects)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": http["port"], "metrics": http["metrics_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == HEALTH_PATH and _port_number(c, get["port"]) == http["port"], probe
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == http["metrics_port"]
    assert annotations["prometheus.io/path"] == "/metrics"
    service = one(objects, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (http["port"], "http"), "metrics": (http["metrics_port"], "metrics")}
    [endpoint] = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_selectors_pick_the_pods_and_the_service(directory: str) -> None:
    objects = render(directory)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(objects, "Service")["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    service_labels = one(objects, "Service")["metadata"]["labels"]
    assert one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_the_pod_runs_as_the_image_user_with_a_read_only_root_and_a_writable_tmp(directory: str) -> None:
    objects = render(directory)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["args"] == [CONFIG_PATH]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SHOAL_RUN_DIR"].startswith("/tmp/")
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and set(c["resources"]["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("directory", sorted(RENDERED))
def test_the_grace_period_covers_pre_stop_and_shoal_s_drain(directory: str) -> None:
    """terminationGracePeriodSeconds (counted from the start of preStop) >= the preStop sleep +
    the proxy's drain (http_options.graceful_shutdown_timeout_s + 2 s) + the replicas' (the
    largest deployment graceful_shutdown_timeout_s + 2 s) + a margin."""
    from shoal.controller.executor import _DRAIN_EXTRA_S

    objects = render(directory)
    config = serve_config_of(objects)
    c = container(objects)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    proxy_s = float(config["http_options"]["graceful_shutdown_timeout_s"]) + PROXY_EXIT_S
    replica_s = max(float(d.get("graceful_shutdown_timeout_s", DEFAULT_REPLICA_GRACE_S))
                    for app in config["applications"] for d in app.get("deployments", [])) + _DRAIN_EXTRA_S
    grace_s = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= pre_stop_s + proxy_s + replica_s + 1.0, (grace_s, pre_stop_s, proxy_s, replica_s)
    assert grace_s <= pre_stop_s + proxy_s + replica_s + 10.0  # not so long that a stuck pod lingers
    # The sum written in the Deployment's comment is the one that holds.
    assert f"= {grace_s} = terminationGracePeriodSeconds" in (BASE / "deployment.yaml").read_text()
    # A draining pod answers 503: liveness must not kill it before the proxy's drain ends.
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > proxy_s
    # The pod leaves the Service's endpoints before SIGTERM: preStop outlasts a readiness period.
    assert pre_stop_s >= c["readinessProbe"]["periodSeconds"]


def _metrics_in(query: str) -> list[str]:
    return re.findall(r"\b(ray_serve_[a-zA-Z0-9_]+)", query)


def _autoscaling_queries(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(t["metadata"]["query"], t) for t in one(objects, "ScaledObject")["spec"]["triggers"]]


@pytest.mark.parametrize("directory", ["base", "overlays/example"])
def test_the_keda_queries_sum_gauges_shoal_exports_in_the_pods_namespace(directory: str) -> None:
    objects = render(directory)
    namespace = RENDERED[directory][0]
    scaled = one(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    seen = set()
    for query, trigger in _autoscaling_queries(objects):
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert set(trigger["metadata"]) <= PROMETHEUS_TRIGGER_KEYS, set(trigger["metadata"]) - PROMETHEUS_TRIGGER_KEYS
        assert float(trigger["metadata"]["threshold"]) > 0
        [metric] = _metrics_in(query)
        assert metric in REQUIRED, f"{metric}: not a metric shoal promises to export (tests/shoal_metrics_contract.py)"
        assert BY_NAME[metric].kind == "gauge", f"{metric}: a sum of a {BY_NAME[metric].kind} is no load"
        assert re.fullmatch(rf'sum\({metric}\{{namespace="{namespace}",pod=~"shoal-\.\*"\}}\)', query), query
        seen.add(metric)
    assert seen == {"ray_serve_num_ongoing_http_requests", "ray_serve_deployment_queued_queries"}
    # The pod disruption budget never blocks a drain below the autoscaler's floor.
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] < scaled["spec"]["minReplicaCount"]


def test_the_hpa_and_prometheus_adapter_rules_name_gauges_shoal_exports() -> None:
    hpa = one(render("overlays/example-hpa"), "HorizontalPodAutoscaler")
    names = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    rules = yaml.safe_load((KUBE / "components" / "hpa-external" / "prometheus-adapter-rules.yaml").read_text())
    served = set()
    for rule in rules["rules"]["external"]:
        [metric] = _metrics_in(rule["seriesQuery"])
        assert rule["name"] == {"matches": "^(.*)$", "as": "${1}"}  # served under its own name
        assert rule["metricsQuery"].startswith("sum(<<.Series>>{<<.LabelMatchers>>")
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        served.add(metric)
    assert names == served
    for name in names:
        assert name in REQUIRED and BY_NAME[name].kind == "gauge"


def test_the_benchmark_decides_with_the_manifest_s_formula_and_numbers() -> None:
    """benchmarks/pods.py's decision reads the base ScaledObject itself."""
    spec = importlib.util.spec_from_file_location("pod_scaling", POD_SCALING)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules["pod_scaling"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["pod_scaling"]
    policy = module.policy_of(one(render("base"), "ScaledObject"))
    assert (policy.min_pods, policy.max_pods) == (2, 10)
    assert {t.metric: t.threshold for t in policy.triggers} == {
        "ray_serve_num_ongoing_http_requests": 8.0, "ray_serve_deployment_queued_queries": 4.0}
    http, queued = "ray_serve_num_ongoing_http_requests", "ray_serve_deployment_queued_queries"
    assert module.desired_pods(policy, {http: 0.0, queued: 0.0}) == 2  # the floor
    assert module.desired_pods(policy, {http: 33.0, queued: 0.0}) == 5  # ceil(33 / 8)
    assert module.desired_pods(policy, {http: 8.0, queued: 21.0}) == 6  # the larger: ceil(21 / 4)
    assert module.desired_pods(policy, {http: 1000.0}) == 10  # the ceiling
    assert module.desired_pods(policy, {http: 25.0}, current_pods=3) == 3  # 25/24 is within 10%
    assert module.desired_pods(policy, {http: 27.0}, current_pods=3) == 4
    text = f'{http}{{node_id="a"}} 3.0\n{http}{{node_id="b"}} 2.0\n{http}_other 9\n# {http} 7\n'
    assert module.sum_metric(text, http) == 5.0
