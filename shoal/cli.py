"""The ``shoal`` command (placeholder until the CLI issue lands: start, status, shutdown)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal", description="Operate shoal instances.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start this user's default instance, detached")
    sub.add_parser("status", help="print the status of the running instance as JSON")
    sub.add_parser("shutdown", help="stop the running instance")
    args = parser.parse_args(argv)

    from shoal.controller import launch, rundir
    from shoal.serve import api

    if args.command == "start":
        running = launch.find_running()
        if running is not None:
            print(f"shoal is already running at {running.run_dir}")
            return 0
        from shoal.serve.config import HTTPOptions

        instance = launch.start_supervisor(
            rundir.instance_dir("default"), private=False, http_options=HTTPOptions().model_dump()
        )
        print(f"shoal started: SHOAL_ADDRESS={instance.run_dir}")
        return 0
    if args.command == "status":
        print(json.dumps(api.status().to_dict(), indent=2))
        return 0
    api.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
