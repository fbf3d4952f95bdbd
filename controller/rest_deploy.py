"""A REST API ``PUT``'s config, deployed as ``shoal deploy CONFIG`` deploys a config file.

Run by the supervisor's REST API (``rest_api``) as a child process, so that the user code a
config imports neither runs in nor blocks the supervisor::

    SHOAL_ADDRESS=RUN_DIR python -m shoal.controller.rest_deploy --app-dir DIR < config.json

It reads one JSON Serve config from stdin, validates it, imports and builds every application
(``config_file.build_specs``), applies ``http_options.num_proxies`` if the config sets it, and
deploys them declaratively to the instance at ``SHOAL_ADDRESS`` without waiting, all as
``shoal deploy`` does. Exit codes: 0 deployed (stderr: warnings, such as options that only act
when an instance starts); 3 the config was refused (stderr: why, for the client; nothing was
deployed); anything else: an unexpected failure (stderr: the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pydantic

BAD_CONFIG = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.controller.rest_deploy")
    parser.add_argument("--app-dir", default=".", help="directory prepended to sys.path")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.app_dir))

    from shoal.runtime.errors import RayServeException
    from shoal.serve import api, config_file
    from shoal.serve.schema import ServeDeploySchema, format_validation_error

    try:
        raw = json.loads(sys.stdin.buffer.read())
        schema = ServeDeploySchema.model_validate(raw)
    except (ValueError, pydantic.ValidationError) as exc:
        detail = format_validation_error(exc) if isinstance(exc, pydantic.ValidationError) else str(exc)
        print(f"the config is not a valid Serve config:\n{detail}", file=sys.stderr)
        return BAD_CONFIG
    try:
        specs = config_file.build_specs(schema)
    except Exception as exc:  # the user's import or builder failed: the client's to fix
        print(f"{type(exc).__name__}: {exc}" if not isinstance(exc, config_file.ConfigError) else str(exc), file=sys.stderr)
        return BAD_CONFIG
    try:
        if "num_proxies" in schema.http_options.model_fields_set:
            api.set_num_proxies(schema.http_options.num_proxies)
        api.deploy_specs(specs, declarative=True, wait=False)
    except RayServeException as exc:  # the controller refused it (a route prefix taken, ...)
        print(str(exc), file=sys.stderr)
        return BAD_CONFIG
    start_only = config_file.start_only_options(schema)
    if "http_options" in start_only and schema.http_options.model_fields_set == {"num_proxies"}:
        start_only.remove("http_options")  # applied above
    if start_only:
        print(
            f"the instance is already running, so the config's {', '.join(start_only)} are not applied",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
