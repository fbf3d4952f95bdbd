"""The REST API's ``ServeInstanceDetails``: built from hand-made records, checked field by field
against Ray's models (``tests/ray_serve_schema.py``, generated from Ray; no Ray needed here)."""

from __future__ import annotations

from typing import Any

import pytest
from ray_serve_schema import MODELS
from ray_serve_shape import shape_errors

from shoal.controller.rest_api import RestAPIOptions, RestAPIOptionsError, check_options, is_loopback
from shoal.controller.rest_details import InstanceFacts, instance_details, ray_paths, required_resources
from shoal.controller.state import AppState, DeploymentState, Replica
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.schema import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaState,
    ServeDeploySchema,
)

WALL_S, MONOTONIC_S = 1_700_000_000.0, 500.0
HTTP = {"host": "127.0.0.1", "port": 8000, "root_path": "", "request_timeout_s": None, "keep_alive_timeout_s": 90,
        "ssl_keyfile": None, "ssl_certfile": None, "ssl_keyfile_password": None, "ssl_ca_certs": None,
        "num_proxies": 1, "metrics_port": 8080}


def deployment(app: str, name: str, options: dict[str, Any], **extra: Any) -> DeploymentState:
    config = DeploymentConfig().merged(options).to_wire()
    return DeploymentState(app=app, name=name, definition=b"", config=config, version="v1", sys_path=[], **extra)


def two_apps() -> list[AppState]:
    fixed = deployment("shop", "Cart", {"num_replicas": 2, "user_config": {"k": 1}, "ray_actor_options": {"num_cpus": 0.5}},
                       target=2, status=DeploymentStatus.HEALTHY, trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED)
    fixed.replicas["shop#Cart#ab12"] = Replica("shop#Cart#ab12", 1, "v1", "ipc://a", started_at=400.0,
                                               state=ReplicaState.RUNNING, pid=4242)
    fixed.replicas["shop#Cart#cd34"] = Replica("shop#Cart#cd34", 2, "v1", "ipc://b", started_at=450.0)
    auto = deployment("shop", "Model", {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}},
                      target=0, status=DeploymentStatus.HEALTHY)
    source = ServeDeploySchema.model_validate(
        {"applications": [{"name": "shop", "route_prefix": "/shop", "import_path": "shop:app"}]}
    ).applications[0].model_dump(mode="json", exclude_unset=True)
    shop = AppState(name="shop", route_prefix="/shop", ingress="Cart", deployments={"Cart": fixed, "Model": auto},
                    status=ApplicationStatus.RUNNING, deployed_at=WALL_S - 60, config_source=source)
    handles_only = AppState(name="lib", route_prefix=None, ingress="Lib",
                            deployments={"Lib": deployment("lib", "Lib", {})})
    return [shop, handles_only]


def details(apps: list[AppState], facts: InstanceFacts) -> dict[str, Any]:
    return instance_details(apps, facts, wall_s=WALL_S, monotonic_s=MONOTONIC_S)


def test_an_empty_instance_without_http_has_rays_shape() -> None:
    out = details([], InstanceFacts(supervisor_pid=1))
    assert shape_errors(out) == []
    assert out["proxy_location"] == "Disabled" and out["proxies"] == {} and out["applications"] == {}
    assert "http_options" not in out
    assert out["controller_info"]["node_id"]  # Ray's `serve shutdown` looks for it


def test_applications_deployments_and_replicas_have_rays_shape() -> None:
    facts = InstanceFacts(supervisor_pid=1, http_options=HTTP, proxy_status="HEALTHY", target_capacity=50.0)
    out = details(two_apps(), facts)
    assert shape_errors(out) == []
    assert set(out["http_options"]) <= set(MODELS["HTTPOptionsSchema"]["fields"])  # shoal's own options left out
    assert out["proxies"]["local"]["status"] == "HEALTHY" and out["target_capacity"] == 50.0
    assert out["target_groups"][0]["targets"][0]["port"] == 8000
    shop = out["applications"]["shop"]
    assert (shop["source"], shop["deployed_app_config"]["import_path"]) == ("declarative", "shop:app")
    assert out["applications"]["lib"]["source"] == "imperative" and "deployed_app_config" not in out["applications"]["lib"]
    cart = shop["deployments"]["Cart"]
    assert (cart["status"], cart["status_trigger"], cart["target_num_replicas"]) == ("HEALTHY", "CONFIG_UPDATE_COMPLETED", 2)
    assert cart["required_resources"] == {"CPU": 0.5}
    assert cart["deployment_config"]["num_replicas"] == 2 and cart["deployment_config"]["user_config"] == {"k": 1}
    replicas = {r["replica_id"]: r for r in cart["replicas"]}
    assert replicas["ab12"]["pid"] == 4242 and replicas["ab12"]["state"] == "RUNNING"
    assert replicas["ab12"]["start_time_s"] == WALL_S - 100.0  # monotonic 400 shown on the wall clock
    assert replicas["ab12"]["actor_name"] == "SERVE_REPLICA::shop#Cart#ab12"
    assert "pid" not in replicas["cd34"]  # not started yet
    model = shop["deployments"]["Model"]["deployment_config"]
    assert "num_replicas" not in model and model["autoscaling_config"]["max_replicas"] == 4


def test_shoal_default_import_paths_are_shown_as_rays() -> None:
    """Ray's client imports the request router (and policy) paths when it reads the details."""
    out = details(two_apps(), InstanceFacts(supervisor_pid=1))
    config = out["applications"]["shop"]["deployments"]["Model"]["deployment_config"]
    assert config["request_router_config"]["request_router_class"].startswith("ray.serve.")
    assert "shoal" not in repr(config)
    assert ray_paths({"a": ["user.mod:Router"]}) == {"a": ["user.mod:Router"]}  # a user's own path stays


def test_the_shape_check_finds_what_ray_would_refuse() -> None:
    out = details(two_apps(), InstanceFacts(supervisor_pid=1))
    cart = out["applications"]["shop"]["deployments"]["Cart"]
    del cart["status_trigger"]
    cart["extra"] = 1
    cart["replicas"][0]["state"] = "ALIVE"
    out["target_capacity"] = "half"
    errors = shape_errors(out)
    assert any(e.endswith("Cart.status_trigger: required by Ray's DeploymentDetails, missing") for e in errors)
    assert any("Cart.extra: Ray's DeploymentDetails has no such field" in e for e in errors)
    assert any("'ALIVE' is not one of Ray's ReplicaState" in e for e in errors)
    assert any(e.startswith("$.target_capacity: expected float") for e in errors)
    assert len(errors) == 4


def test_required_resources_as_ray_counts_them() -> None:
    assert required_resources({}) == {"CPU": 1.0}
    assert required_resources({"num_cpus": 0, "num_gpus": 1, "memory": 2e9, "resources": {"tpu": 2}}) == {
        "CPU": 0.0, "GPU": 1.0, "memory": 2e9, "tpu": 2.0,
    }


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    assert is_loopback(host)
    check_options(RestAPIOptions(host=host, port=0))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "my-pod.example"])
def test_other_hosts_are_refused_without_a_token(host: str) -> None:
    with pytest.raises(RestAPIOptionsError, match="--api-token"):
        check_options(RestAPIOptions(host=host, port=0))
    check_options(RestAPIOptions(host=host, port=0, token="s3cret"))


def test_bad_ports_and_empty_tokens_are_refused_naming_the_option() -> None:
    with pytest.raises(RestAPIOptionsError, match="--api-port 70000"):
        check_options(RestAPIOptions(port=70000))
    with pytest.raises(RestAPIOptionsError, match=r"--api-token .* is empty"):
        check_options(RestAPIOptions(port=0, token="  "))
