"""``@serve.deployment``, ``Deployment`` and ``Application`` (Ray Serve's deployment.py).

A ``Deployment`` is a class or function plus validated options; ``.bind(*args)`` gives an
``Application`` (a node of the app graph: the deployment with its constructor arguments, which
may themselves be Applications); ``.options()`` returns a copy with options changed.
"""

from __future__ import annotations

import inspect
from typing import Any

from shoal.serve._deployment_config import DEPLOYMENT_OPTION_NAMES, DeploymentConfig

_NOT_DIRECT = (
    "The Deployment constructor should not be called directly. Use `@serve.deployment` instead."
)


class Deployment:
    """A class or function deployed as replicas. Create it with ``@serve.deployment``."""

    def __init__(
        self,
        func_or_class: Any,
        name: str,
        config: DeploymentConfig,
        init_args: tuple[Any, ...] = (),
        init_kwargs: dict[str, Any] | None = None,
        *,
        _internal: bool = False,
    ) -> None:
        if not _internal:
            raise RuntimeError(_NOT_DIRECT)
        self._func_or_class = func_or_class
        self._name = name
        self._config = config
        self._init_args = init_args
        self._init_kwargs = init_kwargs or {}

    # -- properties (Ray's names) ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | None:
        return None

    @property
    def func_or_class(self) -> Any:
        return self._func_or_class

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int | None:
        return self._config.num_replicas

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def ray_actor_options(self) -> dict[str, Any]:
        return self._config.ray_actor_options

    @property
    def init_args(self) -> tuple[Any, ...]:
        return self._init_args

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return self._init_kwargs

    @property
    def logging_config(self) -> Any:
        return self._config.logging_config

    def set_logging_config(self, logging_config: Any) -> None:
        """Replace this deployment's ``logging_config`` (a dict or ``LoggingConfig``), as Ray's."""
        self._config = self._config.merged({"logging_config": logging_config})

    def __repr__(self) -> str:
        return f"Deployment(name={self._name})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Deployments cannot be constructed directly. Use `deployment.bind()` to create an "
            "Application and deploy it with `serve.run`."
        )

    # -- building -------------------------------------------------------------------------------

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """An Application of this deployment with these constructor arguments."""
        return Application(self.options(_init_args=args, _init_kwargs=kwargs))

    def options(self, *, func_or_class: Any = None, _init_args: tuple[Any, ...] | None = None,
                _init_kwargs: dict[str, Any] | None = None, _internal: bool = False,
                **options: Any) -> Deployment:
        """A copy with the given options changed (validated as ``@serve.deployment`` does)."""
        name = options.get("name", self._name)
        target = func_or_class if func_or_class is not None else self._func_or_class
        config = self._config.merged(options) if options else self._config
        _check_function_options(target, config)
        return Deployment(
            target,
            name,
            config,
            self._init_args if _init_args is None else _init_args,
            self._init_kwargs if _init_kwargs is None else _init_kwargs,
            _internal=True,
        )


class Application:
    """A bound deployment: one node of an application graph, deployed by ``serve.run``."""

    def __init__(self, bound_deployment: Deployment) -> None:
        self._bound_deployment = bound_deployment

    @property
    def deployment(self) -> Deployment:
        return self._bound_deployment

    def __repr__(self) -> str:
        return f"Application({self._bound_deployment.name})"


def _check_function_options(target: Any, config: DeploymentConfig) -> None:
    if not inspect.isclass(target) and config.user_config is not None:
        raise ValueError("deployment_def must be a class to use user_config or rank")


def deployment(_func_or_class: Any = None, /, **options: Any) -> Any:
    """Turn a class or function into a Deployment; usable bare or with options.

    Every option of Ray Serve's decorator is accepted and validated; see ``DeploymentConfig``.
    """
    if "version" in options:
        raise ValueError(
            "`version` in `@serve.deployment` has been removed. Deployments are updated when "
            "their code or options change."
        )
    if "route_prefix" in options:
        raise TypeError(
            "deployment() got an unexpected keyword argument 'route_prefix': route_prefix is "
            "set per application, in `serve.run(app, route_prefix=...)` or the config file."
        )
    unknown = sorted(set(options) - set(DEPLOYMENT_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"deployment() got unexpected keyword argument(s) {unknown}; valid options are "
            f"{sorted(DEPLOYMENT_OPTION_NAMES)}."
        )
    config = DeploymentConfig().merged(options) if options else DeploymentConfig()

    def decorate(target: Any) -> Deployment:
        if not (inspect.isclass(target) or callable(target)):
            raise TypeError("@serve.deployment must decorate a class or a function.")
        _check_function_options(target, config)
        name = options.get("name") or target.__name__
        return Deployment(target, name, config, _internal=True)

    if _func_or_class is not None:
        return decorate(_func_or_class)
    return decorate

