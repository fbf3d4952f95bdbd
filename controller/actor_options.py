"""What each ``ray_actor_options`` entry does in shoal, checked when a deployment is deployed.

Every entry a user can set takes effect, is refused with an error naming it, or (where it has
no effect on one machine and no harm) logs one warning naming it:

- ``num_cpus``: accepted and not reserved: the operating system schedules processes on one
  machine (Ray's default of one CPU per replica would refuse most apps on a small machine);
- ``num_gpus``: each replica gets its own devices through ``CUDA_VISIBLE_DEVICES``
  (``controller.gpus``); more per replica than the machine has is refused;
- ``memory`` (bytes): enforced as the replica process's ``RLIMIT_DATA`` (heap and private
  mappings): an allocation past it raises ``MemoryError`` in the replica, which is Ray's
  reservation made into a limit on the one process it reserves for;
- ``runtime_env``: ``env_vars`` are set in the replica's environment before the deployment's
  module is imported; ``config`` and ``excludes`` warn (they only tune how Ray installs an
  environment, and ``excludes`` only filters an upload); every other key is refused:
  ``working_dir``/``py_modules`` (shoal imports the code from the driver's ``sys.path``),
  ``pip``/``uv``/``conda``/``container``/``image_uri`` (shoal installs nothing: use the
  environment shoal runs in);
- ``resources``, ``accelerator_type``, ``label_selector``, ``fallback_strategy``: refused when
  set (non-empty): shoal declares no custom resources, does not check the GPU model and has
  no node labels, so a replica asking for them would never be scheduled on Ray either.

Application-level ``runtime_env`` (config files) is merged under each deployment's as Ray
merges them (``merge_runtime_envs``): the deployment's keys win, ``env_vars`` merge key by key.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from shoal.controller import gpus

logger = logging.getLogger("shoal.controller")

_WARNED_RUNTIME_ENV_KEYS = {
    "config": "it only tunes how Ray sets an environment up (timeouts, eager install)",
    "excludes": "it only filters the files Ray uploads for working_dir/py_modules",
}
_REFUSED_RUNTIME_ENV_KEYS = {
    "working_dir": "shoal imports the deployment's code from the driver's sys.path; run from that directory instead",
    "py_modules": "shoal imports modules from the driver's sys.path; put them there instead",
    "pip": "shoal installs no packages; install them into the environment shoal runs in",
    "uv": "shoal installs no packages; install them into the environment shoal runs in",
    "conda": "shoal installs no environments; run shoal in the environment you need",
    "container": "shoal runs replicas as local processes, not containers",
    "image_uri": "shoal runs replicas as local processes, not containers",
}
_UNSCHEDULABLE = {
    "resources": "shoal declares no custom resources (one machine), so no replica could ever be placed",
    "accelerator_type": "shoal does not check the GPU model; use num_gpus",
    "label_selector": "shoal has one machine and no node labels",
    "fallback_strategy": "shoal has one machine and no node labels to fall back between",
}


class ActorOptionsError(ValueError):
    """A ``ray_actor_options`` entry shoal cannot honour; the message names it."""


def merge_runtime_envs(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent`` (Ray's ``override_runtime_envs_except_env_vars``): every key
    of ``child`` wins, except ``env_vars``, which merge (``child``'s win per variable)."""
    merged = copy.deepcopy(parent)
    merged.update(copy.deepcopy(child))
    env_vars = {**(parent.get("env_vars") or {}), **(child.get("env_vars") or {})}
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def check(deployment: str, options: dict[str, Any], gpu_count: int) -> list[str]:
    """The warnings for deployment ``deployment``'s ``options`` (its ``ray_actor_options``) on a
    machine with ``gpu_count`` GPUs; ActorOptionsError for an entry that cannot be honoured."""
    where = f"Deployment '{deployment}': "
    for key, why in _UNSCHEDULABLE.items():
        if options.get(key):
            raise ActorOptionsError(f"{where}ray_actor_options['{key}']={options[key]!r} is not supported: {why}.")
    problem = gpus.check_request(float(options.get("num_gpus") or 0), gpu_count)
    if problem is not None:
        raise ActorOptionsError(where + problem + ".")
    warnings = []
    runtime_env = options.get("runtime_env") or {}
    for key, value in runtime_env.items():
        if key == "env_vars":
            _check_env_vars(where, value)
        elif key in _WARNED_RUNTIME_ENV_KEYS:
            warnings.append(
                f"{where}runtime_env['{key}'] has no effect in shoal: {_WARNED_RUNTIME_ENV_KEYS[key]}."
            )
        else:
            why = _REFUSED_RUNTIME_ENV_KEYS.get(key, "shoal supports only env_vars in runtime_env")
            raise ActorOptionsError(f"{where}runtime_env['{key}'] is not supported: {why}.")
    return warnings


def _check_env_vars(where: str, env_vars: Any) -> None:
    if not isinstance(env_vars, dict):
        raise ActorOptionsError(f"{where}runtime_env['env_vars'] must be a dict of strings, got {type(env_vars).__name__}.")
    for name, value in env_vars.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ActorOptionsError(
                f"{where}runtime_env['env_vars'] must map strings to strings; {name!r}: {value!r} is not."
            )
    from shoal.controller.template import start_method_from

    try:
        start_method_from(env_vars)  # how its replicas start (SHOAL_WORKER_START)
    except ValueError as exc:
        raise ActorOptionsError(f"{where}runtime_env['env_vars']: {exc}.") from None


def environment(options: dict[str, Any], devices: tuple[str, ...]) -> dict[str, str]:
    """The variables a replica with ``options`` sets in its environment, holding ``devices``."""
    env = dict((options.get("runtime_env") or {}).get("env_vars") or {})
    if float(options.get("num_gpus") or 0) > 0:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def memory_limit_bytes(options: dict[str, Any]) -> int | None:
    """The replica process's RLIMIT_DATA, from ``memory``; None when not set (or 0)."""
    memory = options.get("memory")
    return int(memory) if memory else None
