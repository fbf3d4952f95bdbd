"""Options shoal cannot honour are refused with an error naming them; the instance-wide ones it
can are carried to where they act (no process is started: every refusal comes first)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest

from shoal import serve
from shoal.serve import config_file
from shoal.serve._instance_options import instance_options
from shoal.serve.config import ControllerOptions, HTTPOptions, gRPCOptions
from shoal.serve.schema import ServeApplicationSchema, ServeDeploySchema


@serve.deployment
def hello() -> str:
    return "hello"


def start_options(**given: Any) -> Any:
    options: dict[str, Any] = {
        "proxy_location": None, "http_options": None, "grpc_options": None, "logging_config": None,
        "tracing_config": None, "controller_options": None, "extra": {},
    }
    options.update(given)
    return instance_options(**options)


def test_serve_start_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['dedicated_cpu'\\]"):
        serve.start(dedicated_cpu=True)
    with pytest.raises(ValueError, match=r"grpc_servicer_functions: 'not a path' is not an import path"):
        serve.start(grpc_options={"grpc_servicer_functions": ["not a path"]})
    with pytest.raises(ValueError, match=r"grpc_servicer_functions needs the proxy"):
        serve.start(proxy_location="Disabled", grpc_options={"grpc_servicer_functions": ["m.add_servicer"]})
    with pytest.raises(ValueError, match="tracing_config"):
        serve.start(tracing_config={"exporter_import_path": "x:y"})
    with pytest.raises(ValueError, match=r"controller_options\.runtime_env\.env_vars"):
        serve.start(controller_options={"runtime_env": {"env_vars": {"RAY_SERVE_X": "1"}}})
    with pytest.raises(pydantic.ValidationError, match="log_level"):
        serve.start(logging_config={"log_level": "LOUD"})


def test_serve_start_carries_what_it_can() -> None:
    disabled = start_options(proxy_location="Disabled", http_options={"port": 0})
    assert disabled.http_options.host is None  # no HTTP proxy
    assert start_options(proxy_location="HeadOnly").http_options is None  # the default proxy
    assert start_options(grpc_options=gRPCOptions(port=9001)).grpc_options is None  # no servicer: no gRPC
    grpc = start_options(grpc_options={"port": 0, "grpc_servicer_functions": ["m_pb2_grpc.add_S_to_server"]}).grpc_options
    assert grpc == {"port": 0, "grpc_servicer_functions": ["m_pb2_grpc.add_S_to_server"], "request_timeout_s": None,
                    "enable_reflection": True}
    logged = start_options(logging_config={"log_level": 10})
    assert logged.logging_config is not None and logged.logging_config["log_level"] == "DEBUG"
    assert ControllerOptions(runtime_env={}).env_vars == {}


def test_serve_run_refuses_an_external_scaler_and_unknown_arguments() -> None:
    with pytest.raises(ValueError, match="external_scaler_enabled"):
        serve.run(hello.bind(), external_scaler_enabled=True)
    with pytest.raises(TypeError):
        serve.run(hello.bind(), unknown_option=1)  # type: ignore[call-arg]


def test_http_options_legacy_fields() -> None:
    assert HTTPOptions(location="NoServer").host is None
    assert HTTPOptions(location="HeadOnly").host == "127.0.0.1"
    with pytest.raises(pydantic.ValidationError, match="root_url"):
        HTTPOptions(root_url="http://example")


def test_config_files_refuse_what_shoal_cannot_honour() -> None:
    app = {"import_path": "m:app"}
    with pytest.raises(pydantic.ValidationError, match="grpc_servicer_functions: 'f' is not an import path"):
        ServeDeploySchema.model_validate({"applications": [app], "grpc_options": {"grpc_servicer_functions": ["f"]}})
    grpc = ServeDeploySchema.model_validate({"applications": [app], "grpc_options": {"grpc_servicer_functions": ["m:f"]}})
    assert grpc.grpc_options.grpc_servicer_functions == ["m:f"]
    with pytest.raises(pydantic.ValidationError, match="external_scaler_enabled: shoal has no REST"):
        ServeApplicationSchema.model_validate({**app, "external_scaler_enabled": True})
    for key, value, match in [
        ("tracing_config", {"exporter_import_path": "x:y"}, "tracing_config"),
        ("controller_options", {"runtime_env": {"env_vars": {"A": "1"}}}, "env_vars"),
    ]:
        schema = ServeDeploySchema.model_validate({"applications": [app], key: value})
        with pytest.raises(config_file.ConfigError, match=match):
            config_file.build_specs(schema)


POLICY_MODULE = "def fixed(contexts):\n    return {dep: 2 for dep in contexts}, {}\n"
APP_MODULE = "from shoal import serve\n\n@serve.deployment\ndef f():\n    return 1\n\napp = f.bind()\n"


def test_config_file_specs_carry_capacity_logging_and_the_app_policy(tmp_path: Path) -> None:
    (tmp_path / "shoal_opts_app.py").write_text(APP_MODULE)
    (tmp_path / "shoal_opts_policy.py").write_text(POLICY_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        schema = ServeDeploySchema.model_validate({
            "target_capacity": 40,
            "logging_config": {"log_level": "WARNING"},
            "applications": [
                {"name": "a", "route_prefix": "/a", "import_path": "shoal_opts_app:app",
                 "autoscaling_policy": {"policy_function": "shoal_opts_policy:fixed"}},
                {"name": "b", "route_prefix": "/b", "import_path": "shoal_opts_app:app",
                 "logging_config": {"encoding": "JSON"}},
            ],
        })
        a, b = config_file.build_specs(schema)
        assert a["target_capacity"] == b["target_capacity"] == 40
        assert a["autoscaling_policy"]["policy_function"] == "shoal_opts_policy:fixed"
        assert a["logging_config"]["log_level"] == "WARNING"  # the top level is the default
        assert (b["logging_config"]["encoding"], b["logging_config"]["log_level"]) == ("JSON", "INFO")
        assert a["instance_logging_config"]["log_level"] == "WARNING"
        bad = ServeDeploySchema.model_validate({"applications": [
            {"import_path": "shoal_opts_app:app", "autoscaling_policy": {"policy_function": "shoal_opts_policy:missing"}},
        ]})
        with pytest.raises(config_file.ConfigError, match=r"applications\.0\.autoscaling_policy: .*shoal_opts_policy:missing"):
            config_file.build_specs(bad)
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("shoal_opts_app", "shoal_opts_policy"):
            sys.modules.pop(name, None)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "has no effect in shoal" in r.getMessage()]


def test_options_without_effect_on_one_machine_warn_once_each(caplog: pytest.LogCaptureFixture) -> None:
    @serve.deployment
    def plain() -> None:
        return None

    plain.options(num_replicas=2, user_config=None)
    serve.deployment(plain.func_or_class, autoscaling_config={"max_replicas": 3})
    assert warnings_of(caplog) == []  # nothing that takes effect is warned about
    placed = serve.deployment(
        plain.func_or_class,
        placement_group_bundles=[{"CPU": 1}], placement_group_strategy="SPREAD", max_surge_percent=10,
        ray_actor_options={"num_cpus": 1, "fallback_strategy": [{"label_selector": {"zone": "a"}}]},
        autoscaling_config={"max_replicas": 3, "metrics_interval_s": 5},
        graceful_shutdown_wait_loop_s=1,
    )
    names = sorted(message.split(" ")[0] for message in warnings_of(caplog))
    assert names == sorted([
        "placement_group_bundles", "placement_group_strategy", "max_surge_percent", "fallback_strategy",
        "metrics_interval_s", "graceful_shutdown_wait_loop_s",
    ])
    caplog.clear()
    placed.options(name="again").bind()  # copies and binds do not warn again
    serve.deployment(plain.func_or_class, max_replicas_per_node=2)
    serve.deployment(plain.func_or_class, gang_scheduling_config={"gang_size": 1}, deployment_actors=[])
    assert sorted(m.split(" ")[0] for m in warnings_of(caplog)) == ["gang_scheduling_config", "max_replicas_per_node"]


def test_http_root_path_is_prepended_to_the_route_prefix_in_the_scope() -> None:
    from shoal.proxy.exchange import wire_scope

    scope = {"type": "http", "method": "GET", "path": "/root/app/x", "headers": []}
    assert wire_scope(scope, [], "/root", "/app")["root_path"] == "/root/app"
    assert wire_scope(scope, [], "/root", "/")["root_path"] == "/root"


def test_shoal_deploy_warns_that_start_only_options_are_not_applied(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from shoal import cli

    path = tmp_path / "config.yaml"
    path.write_text("proxy_location: HeadOnly\nhttp_options: {port: 9}\napplications: [{import_path: 'm:app'}]\n")
    cli._warn_start_only_options(str(path))
    assert "the config's proxy_location, http_options are not applied" in capsys.readouterr().err
    path.write_text("applications: [{import_path: 'm:app'}]\n")
    cli._warn_start_only_options(str(path))
    assert capsys.readouterr().err == ""


def test_shoal_status_shows_the_target_capacity() -> None:
    from shoal import cli

    app = {"status": "RUNNING", "message": "", "deployments": {}}
    shown = cli.format_status({"proxies": {}, "applications": {"a": app}, "target_capacity": 50.0})
    assert shown.splitlines()[1] == "target capacity: 50%"
    assert "target capacity" not in cli.format_status({"proxies": {}, "applications": {"a": app}, "target_capacity": None})
