"""Resolving the import paths users give (apps, autoscaling policies, request routers)."""

from __future__ import annotations

import importlib
from typing import Any


def import_attr(path: str) -> Any:
    """The object ``"module.sub:attr.inner"`` or ``"module.sub.attr"`` names.

    ImportError saying what failed: a path of the wrong shape, a module that does not import
    (with its error), or a missing attribute.
    """
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"'{path}' is not an import path; use 'module:attribute', e.g. 'app:app'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ImportError(f"cannot import '{module_name}': {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module '{module_name}' has no attribute '{attr}'") from None
    return obj
