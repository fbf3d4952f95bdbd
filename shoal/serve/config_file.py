"""Config files (Ray Serve's ``ServeDeploySchema``) and import paths, turned into app specs.

``load(path)`` parses and validates a YAML file; every error names the key's path
(``applications.0.deployments.1.max_ongoing_requests: ...``). ``build_specs(schema)`` imports
every application and applies its ``args`` and per-deployment overrides (a value in the file
wins over the value in code, which wins over the default). Both run to the end before anything is
deployed, so a bad file changes nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml

from shoal.controller.actor_options import merge_runtime_envs
from shoal.runtime import imports
from shoal.serve import _build
from shoal.serve.config import check_no_controller_env_vars
from shoal.serve.deployment import Application
from shoal.serve.schema import ServeApplicationSchema, ServeDeploySchema, format_validation_error


class ConfigError(ValueError):
    """A config file or import path that cannot be deployed; the message says where and why."""


def load(path: str | Path) -> ServeDeploySchema:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with an 'applications' list")
    try:
        return ServeDeploySchema.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{path} is not a valid shoal config:\n{format_validation_error(exc)}") from exc


def import_attr(import_path: str) -> Any:
    """``module.sub:attr`` or ``module.sub.attr``; ConfigError saying what failed."""
    try:
        return imports.import_attr(import_path)
    except ImportError as exc:
        raise ConfigError(f"{exc} (import path '{import_path}')") from exc


def application(import_path: str, args: dict[str, Any], where: str = "") -> Application:
    """The Application at ``import_path``; a builder function is called with ``args`` (validated
    into its parameter's pydantic model when it is annotated with one)."""
    target = import_attr(import_path)
    if isinstance(target, Application):
        if args:
            raise ConfigError(
                "Arguments can only be passed to an application builder function, not an "
                f"already built application ('{import_path}')."
            )
        return target
    if not callable(target):
        raise ConfigError(f"'{import_path}' is neither an Application nor a builder function")
    params = list(inspect.signature(target).parameters.values())
    if len(params) != 1:
        raise ConfigError(f"the builder '{import_path}' must take exactly one argument (its args), not {len(params)}")
    try:  # resolves string annotations (`from __future__ import annotations`)
        annotation = typing.get_type_hints(target).get(params[0].name, params[0].annotation)
    except Exception:
        annotation = params[0].annotation
    if inspect.isclass(annotation) and issubclass(annotation, pydantic.BaseModel):
        try:
            args = annotation.model_validate(args)  # type: ignore[assignment]
        except pydantic.ValidationError as exc:
            lines = format_validation_error(exc).splitlines()
            prefix = f"{where}.args." if where else "args."
            raise ConfigError(f"arguments of '{import_path}':\n" + "\n".join(prefix + line for line in lines)) from exc
    app = target(args)
    if not isinstance(app, Application):
        raise ConfigError(f"the builder '{import_path}' returned {type(app).__name__}, not an Application")
    return app


def app_spec(app_schema: ServeApplicationSchema, where: str) -> dict[str, Any]:
    """The deployable spec of one application of a config file."""
    app = application(app_schema.import_path, app_schema.args, where)
    deployments, ingress = _build.build(app, app_schema.name)
    by_name = {d.name: d for d in deployments}
    for index, override in enumerate(app_schema.deployments):
        built = by_name.get(override.name)
        if built is None:
            raise ConfigError(
                f"{where}.deployments.{index}.name: application '{app_schema.name}' has no deployment "
                f"named '{override.name}'; it has {sorted(by_name)}"
            )
        options = {k: v for k, v in override.to_options().items() if k != "name"}
        try:
            built.config = built.config.merged(options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.deployments.{index}: {exc}") from exc
    if app_schema.runtime_env:  # under each deployment's own, as Ray merges them
        for built in deployments:
            actor = dict(built.config.ray_actor_options)
            actor["runtime_env"] = merge_runtime_envs(app_schema.runtime_env, actor.get("runtime_env") or {})
            built.config = dataclasses.replace(built.config, ray_actor_options=actor)
    spec = _build.to_spec(deployments, ingress, app_schema.name, app_schema.route_prefix)
    spec["config_source"] = app_schema.model_dump(mode="json", exclude_unset=True)
    if app_schema.logging_config is not None:
        spec["logging_config"] = app_schema.logging_config.model_dump(mode="json")
    if app_schema.autoscaling_policy is not None:
        spec["autoscaling_policy"] = _app_policy(app_schema, where)
    return spec


def _app_policy(app_schema: ServeApplicationSchema, where: str) -> dict[str, Any]:
    """The application-level policy as plain values; ConfigError if it does not import."""
    from shoal.controller.autoscale import load_policy

    policy = app_schema.autoscaling_policy
    assert policy is not None
    try:
        load_policy(policy)
    except (ImportError, TypeError) as exc:
        raise ConfigError(f"{where}.autoscaling_policy: {exc}") from exc
    if not isinstance(policy.policy_function, str):
        raise ConfigError(f"{where}.autoscaling_policy.policy_function: must be an import path in a config file")
    return policy.model_dump(mode="json")


def build_specs(schema: ServeDeploySchema) -> list[dict[str, Any]]:
    """Every application's spec, or ConfigError before anything is deployed.

    Each spec also carries what the file sets for all of them: ``target_capacity``, and the
    top-level ``logging_config`` (for the supervisor, and for an application that sets none, as
    in Ray)."""
    check_instance_options(schema)
    specs = []
    for index, app_schema in enumerate(schema.applications):
        spec = app_spec(app_schema, f"applications.{index}")
        spec["target_capacity"] = schema.target_capacity
        if schema.logging_config is not None:
            spec["instance_logging_config"] = schema.logging_config.model_dump(mode="json")
            if spec.get("logging_config") is None:
                spec["logging_config"] = spec["instance_logging_config"]
        specs.append(spec)
    return specs


def check_instance_options(schema: ServeDeploySchema) -> None:
    """ConfigError for instance-wide options shoal cannot honour (see docs/options.md)."""
    if schema.tracing_config:
        raise ConfigError("tracing_config: shoal does not support tracing yet; remove it.")
    try:
        check_no_controller_env_vars(schema.controller_options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


START_ONLY_KEYS = ("proxy_location", "http_options", "grpc_options", "controller_options")


def start_only_options(schema: ServeDeploySchema) -> list[str]:
    """The keys of ``schema`` that only act when an instance starts (``shoal run``): deployed to
    a running instance (``shoal deploy``) they are not applied, as in Ray, which warns."""
    return [key for key in START_ONLY_KEYS if key in schema.model_fields_set]


def build_config(import_paths: list[str]) -> dict[str, Any]:
    """A config file (as a dict) for ``shoal build``: one application per import path, with the
    options each deployment sets in code."""
    single = len(import_paths) == 1
    applications = []
    for index, path in enumerate(import_paths, start=1):
        app = application(path, {})
        name = "default" if single else f"app{index}"
        deployments, _ = _build.build(app, name)
        applications.append(
            {
                "name": name,
                "route_prefix": "/" if single else f"/app{index}",
                "import_path": path,
                "args": {},
                "deployments": [_deployment_options(d) for d in deployments],
            }
        )
    return {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "logging_config": {"encoding": "TEXT", "log_level": "INFO", "enable_access_log": True},
        "applications": applications,
    }


def _deployment_options(built: _build.BuiltDeployment) -> dict[str, Any]:
    wire = built.config.to_wire()
    keep = (
        "num_replicas", "max_ongoing_requests", "max_queued_requests", "user_config",
        "autoscaling_config", "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
        "health_check_period_s", "health_check_timeout_s", "ray_actor_options",
    )
    out: dict[str, Any] = {"name": built.name}
    for key in keep:
        value = wire.get(key)
        if value is not None:
            out[key] = value
    return out
