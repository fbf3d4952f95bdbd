"""Turning an Application graph into the deployments of one app.

Walks the ``.bind()`` arguments of the ingress (also inside lists, tuples, dicts and sets) for
Applications; each distinct Application becomes one deployment and is replaced in its parent's
arguments by a ``DeploymentHandle`` to it. The same Application bound twice is deployed once;
two different ones with the same name are renamed ``Name_1``, ``Name_2``, ... (Ray does the same).

A deployment's request router class (``request_router_config.request_router_class``, an import
path or the class) is loaded here, where the app's code is importable: one that does not import
or is not a ``RequestRouter`` is a ValueError naming it, before anything is deployed. A custom
class travels in the spec cloudpickled by value (as Ray's does), so the proxy and the handles of
other processes can use it without importing its module.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import cloudpickle

from shoal.runtime.handle import DeploymentHandle
from shoal.runtime.request_router import RequestRouter, router_class
from shoal.serve._deployment_config import DeploymentConfig
from shoal.serve.config import DEFAULT_REQUEST_ROUTER_PATH
from shoal.serve.deployment import Application, Deployment

logger = logging.getLogger("shoal.serve")


@dataclass
class BuiltDeployment:
    name: str
    func_or_class: Any
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: DeploymentConfig


def request_router_class(name: str, config: DeploymentConfig) -> type[RequestRouter] | None:
    """The custom request router class of deployment ``name`` (None: the built-in one);
    ValueError naming the deployment and the class if it does not import or is not a
    ``RequestRouter`` subclass."""
    value = config.request_router_config.request_router_class
    if value == DEFAULT_REQUEST_ROUTER_PATH:
        return None
    try:
        if isinstance(value, str):
            cls = router_class(value)
        elif isinstance(value, type) and issubclass(value, RequestRouter):
            cls = value
        else:
            raise ValueError(f"request_router_class {value!r} is not a subclass of RequestRouter.")
    except ValueError as exc:
        raise ValueError(f"Deployment '{name}': {exc}") from None
    return None if cls.__module__ == "shoal.runtime.request_router" and cls.__name__ == "PowerOfTwoChoicesRequestRouter" else cls


def _router_by_value(cls: type[RequestRouter]) -> bytes:
    """``cls`` cloudpickled by value (its module's code travels with it), unless shoal defines it."""
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__.split(".")[0] == "shoal" or cls.__module__ == "__main__":
        data: bytes = cloudpickle.dumps(cls)
        return data
    cloudpickle.register_pickle_by_value(module)
    try:
        data = cloudpickle.dumps(cls)
        return data
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def build(app: Application, app_name: str, runtime: Any = None) -> tuple[list[BuiltDeployment], str]:
    """The app's deployments (children first) and the ingress deployment's name.

    ``runtime`` is given to the handles placed in constructor arguments (local testing mode);
    otherwise they find the runtime of the replica they are unpickled in.
    """
    if not isinstance(app, Application):
        raise TypeError("`serve.run` expects an `Application` returned by `Deployment.bind()`.")
    names: dict[int, str] = {}
    taken: set[str] = set()
    built: list[BuiltDeployment] = []

    def visit(node: Application) -> DeploymentHandle[Any]:
        key = id(node)
        if key not in names:
            dep = node.deployment
            name = dep.name
            if name in taken:
                suffix = 1
                while f"{name}_{suffix}" in taken:
                    suffix += 1
                logger.warning("two deployments are named '%s'; renaming one to '%s_%d'", name, name, suffix)
                name = f"{name}_{suffix}"
            request_router_class(name, dep.config)
            taken.add(name)
            names[key] = name
            args = tuple(replace(a) for a in dep.init_args)
            kwargs = {k: replace(v) for k, v in dep.init_kwargs.items()}
            built.append(BuiltDeployment(name, dep.func_or_class, args, kwargs, dep.config))
        return DeploymentHandle(names[key], app_name, _runtime=runtime)

    def replace(value: Any) -> Any:
        if isinstance(value, Application):
            return visit(value)
        if isinstance(value, list):
            return [replace(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(replace(v) for v in value)
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        if isinstance(value, (set, frozenset)):
            return type(value)(replace(v) for v in value)
        return value

    ingress = visit(app)
    return built, ingress.deployment_name


def code_hash(func_or_class: Any) -> str:
    """A hash of the source file defining ``func_or_class``, so that an edit to an importable
    module (pickled by reference, not by value) still counts as a code change."""
    try:
        path = inspect.getsourcefile(func_or_class)
        if path:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()[:16]
    except (OSError, TypeError):
        pass
    return ""


class _DeploymentClassRef:
    """Pickles as a reference to a class that a module exposes only through its Deployment.

    ``@serve.deployment class Model`` leaves ``module.Model`` bound to the Deployment, so pickle
    cannot find the class by name and cloudpickle would copy it by value, with an identity that
    changes in every process: a redeploy of unchanged code would then look like new code.
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (_deployment_class, (self.target.__module__, self.target.__qualname__))


def _deployment_class(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj.func_or_class if isinstance(obj, Deployment) else obj


def _by_reference(target: Any) -> Any:
    """``target``, or a reference to it if its module exposes it only through a Deployment."""
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    if module is None or module.__name__ == "__main__":
        return target
    obj: Any = module
    for part in getattr(target, "__qualname__", "").split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, Deployment) and obj.func_or_class is target:
        return _DeploymentClassRef(target)
    return target


def to_spec(
    deployments: list[BuiltDeployment], ingress: str, app_name: str, route_prefix: str | None
) -> dict[str, Any]:
    """The msgpack-able app spec the supervisor deploys (definitions are cloudpickled)."""
    entries = []
    for d in deployments:
        try:
            definition = cloudpickle.dumps((_by_reference(d.func_or_class), d.init_args, d.init_kwargs))
        except Exception as exc:
            raise TypeError(
                f"The definition or the constructor arguments of deployment '{d.name}' cannot be "
                f"serialized: {exc}"
            ) from exc
        config = d.config.to_wire()
        custom = request_router_class(d.name, d.config)
        config["request_router_config"]["request_router_class"] = (
            DEFAULT_REQUEST_ROUTER_PATH if custom is None else _router_by_value(custom)
        )
        entries.append(
            {
                "name": d.name,
                "definition": definition,
                "config": config,
                "code_hash": code_hash(d.func_or_class),
            }
        )
    return {
        "name": app_name,
        "route_prefix": route_prefix,
        "ingress": ingress,
        "deployments": entries,
        "sys_path": [p or os.getcwd() for p in sys.path],
    }
