"""``@serve.ingress(app)``: serve an ASGI app (FastAPI, Starlette, any ASGI callable) from a
deployment class.

The app, or a function of no arguments that builds it (called inside each replica, for apps that
cannot be pickled), or the class's own ``__serve_build_asgi_app__``, is attached to the class
(``serve.ingress(app)()`` makes an empty class for it); each replica runs the whole app, with its lifespan.
FastAPI routes written as methods of the class get the replica's instance as ``self``.
"""

from __future__ import annotations

import copyreg
import inspect
import typing
from collections.abc import Callable
from typing import Any

from starlette.datastructures import State

from shoal.runtime.asgi import BUILD_ASGI_APP_METHOD, INGRESS_ATTR


def _reduce_state(state: State) -> tuple[Any, ...]:
    return (State, (dict(state._state),))


# Starlette's State answers every attribute lookup from its dict, pickle's own included, so an
# app (which holds one) cannot be unpickled as it is; carry it as the dict it wraps.
copyreg.pickle(State, _reduce_state)


def _resolve_annotations(cls: type) -> None:
    """Evaluate string annotations (``from __future__ import annotations``) of the class's
    methods here, where their module's globals are complete: a class pickled by value carries
    only the globals its code uses, so FastAPI could not resolve them inside the replica."""
    for value in vars(cls).values():
        fn = getattr(value, "__func__", value)
        annotations = getattr(fn, "__annotations__", None)
        if inspect.isfunction(fn) and annotations and any(isinstance(a, str) for a in annotations.values()):
            try:
                fn.__annotations__ = typing.get_type_hints(fn, include_extras=True)
            except Exception:  # an annotation that does not resolve stays as it was
                pass


def ingress(app: Any = None) -> Callable[..., type]:
    """Class decorator; put ``@serve.deployment`` above it (Ray's ``serve.ingress``).

    ``app``: an ASGI app (FastAPI, Starlette, any ASGI callable) or a function that builds one
    inside each replica. ``serve.ingress(app)()``, with no class, makes a class with an empty
    constructor (taking any arguments) for ``serve.deployment(...)``. With no ``app`` the class
    must define ``__serve_build_asgi_app__``, called in each replica after the constructor (it
    may be async), which returns the app.
    """

    def decorate(cls: Any = None) -> type:
        if cls is None:

            class ASGIIngressDeployment:
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    self.args = args
                    self.kwargs = kwargs

            cls = ASGIIngressDeployment
        if not inspect.isclass(cls):
            raise ValueError("@serve.ingress must be used with a class.")
        if any("__call__" in vars(k) for k in cls.__mro__[:-1]):  # its own or an inherited one, as in Ray
            raise ValueError("Classes passed to @serve.ingress may not have __call__ method.")
        if app is None and not hasattr(cls, BUILD_ASGI_APP_METHOD):
            raise ValueError(
                "serve.ingress() called without an app argument requires "
                f"{cls.__name__} to define `{BUILD_ASGI_APP_METHOD}`."
            )
        _resolve_annotations(cls)
        setattr(cls, INGRESS_ATTR, BUILD_ASGI_APP_METHOD if app is None else app)
        return cls

    return decorate
