"""Check a JSON value against Ray Serve's REST API models, field by field, without Ray.

``shape_errors(value)`` walks ``value`` as ``ServeInstanceDetails`` (the table in
``ray_serve_schema``, generated from Ray's pydantic models) and returns every difference as
``path: what``: a required field missing, a key Ray's model forbids, a value of the wrong JSON
type, an enum value Ray does not have. Empty: Ray's own client would accept it as far as field
names, types and enums go (Ray's validators' finer rules, such as number ranges, are not copied).
"""

from __future__ import annotations

from typing import Any

from ray_serve_schema import ENUMS, MODELS, ROOT


def shape_errors(value: Any, type_name: str = f"model:{ROOT}", path: str = "$") -> list[str]:
    if type_name == "any":
        return []
    if type_name.startswith("optional[") and type_name.endswith("]"):
        return [] if value is None else shape_errors(value, type_name[len("optional["):-1], path)
    if type_name.startswith("list[") and type_name.endswith("]"):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        inner = type_name[len("list["):-1]
        return [e for i, item in enumerate(value) for e in shape_errors(item, inner, f"{path}[{i}]")]
    if type_name.startswith("dict[") and type_name.endswith("]"):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        inner = type_name[len("dict["):-1]
        return [e for k, item in value.items() for e in shape_errors(item, inner, f"{path}.{k}")]
    if type_name.startswith("enum:"):
        allowed = ENUMS[type_name[len("enum:"):]]
        return [] if value in allowed else [f"{path}: {value!r} is not one of Ray's {type_name[5:]} {allowed}"]
    if type_name.startswith("model:"):
        return _model_errors(value, type_name[len("model:"):], path)
    return _scalar_errors(value, type_name, path)


def _model_errors(value: Any, name: str, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected a {name} object, got {value!r}"]
    model = MODELS[name]
    fields: dict[str, tuple[bool, str]] = model["fields"]
    errors = [f"{path}.{key}: required by Ray's {name}, missing" for key, (required, _) in fields.items()
              if required and key not in value]
    for key, item in value.items():
        if key not in fields:
            if model["extra_forbidden"]:
                errors.append(f"{path}.{key}: Ray's {name} has no such field (it forbids extra keys)")
            continue
        errors += shape_errors(item, fields[key][1], f"{path}.{key}")
    return errors


def _scalar_errors(value: Any, type_name: str, path: str) -> list[str]:
    kinds: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
    if type_name not in kinds:
        raise ValueError(f"unknown type {type_name!r} in ray_serve_schema")
    ok = isinstance(value, kinds[type_name]) and (type_name == "bool" or not isinstance(value, bool))
    return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
