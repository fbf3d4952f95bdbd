"""shoal.serve.schema: LoggingConfig, the serve.status() model and the config-file schema."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pydantic
import pytest
import yaml

from shoal.serve.config import ProxyLocation
from shoal.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentSchema,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
    EncodingType,
    LoggingConfig,
    ProxyStatus,
    ReplicaState,
    ServeApplicationSchema,
    ServeDeploySchema,
    ServeStatus,
    format_validation_error,
    validate_route_prefix,
)

# --- LoggingConfig ---------------------------------------------------------------------------


def test_logging_defaults() -> None:
    config = LoggingConfig()
    assert config.encoding == "TEXT" and config.encoding is EncodingType.TEXT
    assert (config.log_level, config.logs_dir, config.enable_access_log) == ("INFO", None, True)
    assert config.additional_log_standard_attrs == []


@pytest.mark.parametrize(
    ("level", "name"),
    [(logging.DEBUG, "DEBUG"), (logging.WARNING, "WARNING"), (50, "CRITICAL"), ("ERROR", "ERROR")],
)
def test_log_level_name_or_number(level: Any, name: str) -> None:
    assert LoggingConfig(log_level=level).log_level == name


@pytest.mark.parametrize("level", ["info", "LOUD", 15, -1])
def test_invalid_log_level_names_valid_ones(level: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f'Got "{level}" for log_level')) as info:
        LoggingConfig(log_level=level)
    assert "must be one of" in str(info.value)
    assert ("DEBUG" in str(info.value)) if isinstance(level, str) else ("10" in str(info.value))


def test_logging_rejects_bad_encoding_and_extra_keys() -> None:
    with pytest.raises(ValueError, match="Got 'XML' for encoding"):
        LoggingConfig(encoding="XML")
    with pytest.raises(ValueError, match="log_dir"):
        LoggingConfig(log_dir="/tmp")


def test_additional_log_standard_attrs() -> None:
    config = LoggingConfig(additional_log_standard_attrs=["name", "lineno", "name"])
    assert config.additional_log_standard_attrs == ["name", "lineno"]
    with pytest.raises(ValueError, match="Unknown attribute 'colour'"):
        LoggingConfig(additional_log_standard_attrs=["colour"])


# --- serve.status() --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum", "members"),
    [
        (ApplicationStatus, "NOT_STARTED DEPLOYING DEPLOY_FAILED RUNNING UNHEALTHY DELETING"),
        (DeploymentStatus, "UPDATING HEALTHY UNHEALTHY DEPLOY_FAILED UPSCALING DOWNSCALING"),
        (
            DeploymentStatusTrigger,
            "UNSPECIFIED CONFIG_UPDATE_STARTED CONFIG_UPDATE_COMPLETED UPSCALE_COMPLETED "
            "DOWNSCALE_COMPLETED AUTOSCALING REPLICA_STARTUP_FAILED DEPLOYMENT_ACTOR_FAILED "
            "HEALTH_CHECK_FAILED INTERNAL_ERROR DELETING",
        ),
        (ReplicaState, "STARTING UPDATING RECOVERING RUNNING STOPPING STOPPED PENDING_MIGRATION"),
        (ProxyStatus, "STARTING HEALTHY UNHEALTHY DRAINING DRAINED"),
    ],
)
def test_status_enum_members(enum: Any, members: str) -> None:
    assert [(m.name, m.value) for m in enum] == [(n, n) for n in members.split()]
    assert all(m == m.value for m in enum)


def test_empty_serve_status() -> None:
    status = ServeStatus()
    assert (status.proxies, status.applications, status.target_capacity) == ({}, {}, None)
    assert ServeStatus.from_dict(status.to_dict()) == status


def _status() -> ServeStatus:
    deployment = DeploymentStatusOverview(
        status=DeploymentStatus.HEALTHY,
        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        replica_states={ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1},
    )
    failed = DeploymentStatusOverview(
        status=DeploymentStatus.DEPLOY_FAILED,
        status_trigger=DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
        replica_states={},
        message="constructor raised",
    )
    return ServeStatus(
        proxies={"node-1": ProxyStatus.HEALTHY},
        applications={
            "default": ApplicationStatusOverview(
                status=ApplicationStatus.RUNNING,
                message="",
                last_deployed_time_s=1700000000.5,
                deployments={"A": deployment, "B": failed},
            )
        },
        target_capacity=50.0,
    )


def test_serve_status_round_trip_through_json() -> None:
    status = _status()
    wire = json.loads(json.dumps(status.to_dict()))
    assert wire["applications"]["default"]["status"] == "RUNNING"
    assert wire["applications"]["default"]["deployments"]["A"]["replica_states"] == {
        "RUNNING": 2,
        "STARTING": 1,
    }
    restored = ServeStatus.from_dict(wire)
    assert restored == status
    assert restored.applications["default"].status is ApplicationStatus.RUNNING
    assert restored.applications["default"].deployments["B"].message == "constructor raised"
    assert restored.applications["default"].status == "RUNNING"


def test_serve_status_from_dict_rejects_unknown_status() -> None:
    wire = _status().to_dict()
    wire["proxies"]["node-1"] = "ASLEEP"
    with pytest.raises(ValueError):
        ServeStatus.from_dict(wire)


# --- config file -----------------------------------------------------------------------------


def _deploy(**overrides: Any) -> dict[str, Any]:
    app = {"name": "app", "import_path": "mod:app"}
    app.update(overrides)
    return {"applications": [app]}


def test_config_file_defaults() -> None:
    config = ServeDeploySchema.model_validate({"applications": [{"import_path": "mod:app"}]})
    assert config.proxy_location is ProxyLocation.EveryNode
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    assert (config.http_options.root_path, config.http_options.keep_alive_timeout_s) == ("", 90)
    assert config.http_options.request_timeout_s is None
    assert (config.grpc_options.port, config.grpc_options.grpc_servicer_functions) == (9000, [])
    assert config.logging_config is None and config.target_capacity is None
    app = config.applications[0]
    assert (app.name, app.route_prefix, app.runtime_env, app.args, app.deployments) == (
        "default", "/", {}, {}, [],
    )  # fmt: skip
    assert app.external_scaler_enabled is False and app.autoscaling_policy is None


def test_reference_example_parses() -> None:
    text = """
proxy_location: EveryNode
http_options: {host: 0.0.0.0, port: 8000, request_timeout_s: 30}
grpc_options: {port: 9000, grpc_servicer_functions: []}
logging_config: {encoding: TEXT, log_level: INFO, logs_dir: null, enable_access_log: true}
applications:
- name: app1
  route_prefix: /
  import_path: hello:app_builder
  args: {message: "Hello"}
  runtime_env: {}
  deployments:
  - name: HelloWorld
    num_replicas: auto
    user_config: {threshold: 0.5}
    autoscaling_config: {min_replicas: 0, max_replicas: 5, target_ongoing_requests: 2}
"""
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    deployment = config.applications[0].deployments[0]
    assert deployment.num_replicas == "auto"
    assert deployment.autoscaling_config is not None
    assert deployment.autoscaling_config.max_replicas == 5
    assert config.http_options.host == "0.0.0.0"


def test_missing_applications_is_an_error() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ServeDeploySchema.model_validate({})
    assert format_validation_error(info.value) == "applications: Field required"


@pytest.mark.parametrize("prefix", [None, "/", "/a", "/a/b", "/a-b_c"])
def test_valid_route_prefixes(prefix: str | None) -> None:
    assert validate_route_prefix(prefix) == prefix
    ServeApplicationSchema(import_path="m:a", route_prefix=prefix)


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        ("a", 'Route prefix must start with "/".'),
        ("/a/", 'cannot end with "/" unless the entire prefix is just "/".'),
        ("/{id}", 'cannot contain wildcards, so it cannot contain "{" or "}".'),
    ],
)
def test_invalid_route_prefixes(prefix: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f'Got "{prefix}" for route_prefix. ')):
        validate_route_prefix(prefix)
    with pytest.raises(pydantic.ValidationError, match=re.escape(fragment)):
        ServeApplicationSchema(import_path="m:a", route_prefix=prefix)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("a:b:c", "An import path may have at most one colon."),
        (":a", "An import path may not start or end with a colon."),
        ("app", "must contain at least one dot or colon"),
        ("mod.", "An import path may not start or end with a dot."),
    ],
)
def test_invalid_import_paths(path: str, fragment: str) -> None:
    with pytest.raises(
        pydantic.ValidationError, match=re.escape(f'Got invalid import path "{path}"')
    ):
        ServeApplicationSchema(import_path=path)
    with pytest.raises(pydantic.ValidationError, match=re.escape(fragment)):
        ServeApplicationSchema(import_path=path)


def test_duplicate_application_names() -> None:
    apps = [
        {"name": "a", "import_path": "m:x", "route_prefix": "/x"},
        {"name": "a", "import_path": "m:y", "route_prefix": "/y"},
    ]
    with pytest.raises(
        ValueError,
        match=re.escape(
            'Found multiple configs for application "a". Please remove all duplicates.'
        ),
    ):
        ServeDeploySchema.model_validate({"applications": apps})


def test_duplicate_route_prefixes_but_null_is_fine() -> None:
    apps = [
        {"name": "a", "import_path": "m:x", "route_prefix": "/x"},
        {"name": "b", "import_path": "m:y", "route_prefix": "/x"},
    ]
    with pytest.raises(ValueError, match=re.escape('duplicate applications for route prefix "/x"')):
        ServeDeploySchema.model_validate({"applications": apps})
    apps = [{"name": n, "import_path": "m:x", "route_prefix": None} for n in "ab"]
    assert len(ServeDeploySchema.model_validate({"applications": apps}).applications) == 2


def test_empty_application_name() -> None:
    with pytest.raises(ValueError, match=r"Application names must be nonempty\."):
        ServeDeploySchema.model_validate(_deploy(name=""))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [("host", "0.0.0.0", 'Host "0.0.0.0" is set'), ("port", 8001, "Port 8001 is set")],
)
def test_host_and_port_rejected_per_application(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ServeDeploySchema.model_validate(_deploy(**{key: value}))


@pytest.mark.parametrize(
    ("deployment", "fragment"),
    [
        ({"num_replicas": 0}, "num_replicas is expected to larger than 0"),
        ({"num_replicas": "many"}, '`num_replicas` must be an int or "auto", but got: many'),
        ({"num_replicas": 2.5}, '`num_replicas` must be an int or "auto"'),
        (
            {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}},
            "Manually setting num_replicas is not allowed when autoscaling_config is provided.",
        ),
        (
            {"max_queued_requests": 0},
            "max_queued_requests must be -1 (no limit) or a positive integer.",
        ),
        ({"max_ongoing_requests": 0}, "Input should be greater than 0"),
        ({"health_check_period_s": 0}, "Input should be greater than 0"),
        ({"graceful_shutdown_timeout_s": -1}, "Input should be greater than or equal to 0"),
        (
            {"max_replicas_per_node": 2, "placement_group_bundles": [{"CPU": 1}]},
            "Setting max_replicas_per_node is not allowed when placement_group_bundles is provided.",
        ),
        ({"ray_actor_options": {"num_cpus": -1}}, "Input should be greater than or equal to 0"),
        ({"ray_actor_options": {"runtime_env": {"working_dir": "."}}}, "remote URIs"),
    ],
)
def test_deployment_schema_errors(deployment: dict[str, Any], fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        DeploymentSchema.model_validate({"name": "D", **deployment})
    assert fragment in format_validation_error(info.value)


@pytest.mark.parametrize("num_replicas", [1, 7, "auto", None])
def test_deployment_schema_num_replicas_accepted(num_replicas: Any) -> None:
    assert DeploymentSchema(name="D", num_replicas=num_replicas).num_replicas == num_replicas


def test_auto_with_autoscaling_config_is_allowed() -> None:
    schema = DeploymentSchema(name="D", num_replicas="auto", autoscaling_config={"max_replicas": 4})
    assert schema.is_autoscaling_configured()


def test_external_scaler_forbids_autoscaling() -> None:
    with pytest.raises(
        ValueError, match='following deployment\\(s\\) have autoscaling configured: "D"'
    ):
        ServeApplicationSchema(
            import_path="m:a",
            external_scaler_enabled=True,
            deployments=[{"name": "D", "num_replicas": "auto"}, {"name": "E", "num_replicas": 2}],
        )


def test_remote_runtime_env_uris() -> None:
    app = ServeApplicationSchema(
        import_path="m:a",
        runtime_env={"working_dir": "s3://bucket/x.zip", "py_modules": ["local://m"]},
    )
    assert app.runtime_env["working_dir"] == "s3://bucket/x.zip"
    with pytest.raises(ValueError, match="remote URIs"):
        ServeApplicationSchema(import_path="m:a", runtime_env={"py_modules": ["./pkg"]})


@pytest.mark.parametrize("capacity", [-1, 100.5])
def test_target_capacity_bounds(capacity: float) -> None:
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate({**_deploy(), "target_capacity": capacity})


def test_format_validation_error_names_nested_paths() -> None:
    config = {
        "http_options": {"prot": 8000},
        "applications": [
            {
                "name": "a",
                "import_path": "m:a",
                "deployments": [
                    {"name": "A"},
                    {
                        "name": "B",
                        "max_ongoing_requests": 0,
                        "autoscaling_config": {"max_replica": 2},
                    },
                ],
            }
        ],
    }
    with pytest.raises(pydantic.ValidationError) as info:
        ServeDeploySchema.model_validate(config)
    lines = format_validation_error(info.value).splitlines()
    assert "http_options.prot: Extra inputs are not permitted" in lines
    assert (
        "applications.0.deployments.1.max_ongoing_requests: Input should be greater than 0" in lines
    )
    assert (
        "applications.0.deployments.1.autoscaling_config.max_replica: Extra inputs are not permitted"
        in lines
    )


def test_format_validation_error_strips_value_error_prefix() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ServeDeploySchema.model_validate(_deploy(route_prefix="x"))
    assert format_validation_error(info.value) == (
        'applications.0.route_prefix: Got "x" for route_prefix. Route prefix must start with "/".'
    )


def test_unknown_keys_rejected_at_every_level() -> None:
    cases = [
        ({**_deploy(), "extra": 1}, "extra"),
        (_deploy(extra=1), "applications.0.extra"),
        (_deploy(deployments=[{"name": "D", "extra": 1}]), "applications.0.deployments.0.extra"),
        (
            _deploy(deployments=[{"name": "D", "ray_actor_options": {"num_cpu": 1}}]),
            "applications.0.deployments.0.ray_actor_options.num_cpu",
        ),
        ({**_deploy(), "grpc_options": {"prt": 1}}, "grpc_options.prt"),
        ({**_deploy(), "logging_config": {"level": "INFO"}}, "logging_config.level"),
    ]
    for config, path in cases:
        with pytest.raises(pydantic.ValidationError) as info:
            ServeDeploySchema.model_validate(config)
        assert format_validation_error(info.value) == f"{path}: Extra inputs are not permitted"


def test_deployment_schema_to_options_has_only_written_keys() -> None:
    schema = DeploymentSchema.model_validate(
        {
            "name": "D",
            "num_replicas": "auto",
            "user_config": None,
            "autoscaling_config": {"max_replicas": 5},
            "ray_actor_options": {"num_gpus": 1},
        }
    )
    assert schema.to_options() == {
        "num_replicas": "auto",
        "user_config": None,
        "autoscaling_config": {"max_replicas": 5},
        "ray_actor_options": {"num_gpus": 1.0},
    }
    assert DeploymentSchema(name="D").to_options() == {}
