"""A driver for the deadline test, run as ``python deploy_without_supervisor.py MARKER``.

It starts a private instance, prints one JSON line with the supervisor's pid, then deploys an
app whose constructor touches MARKER and never returns. Whatever ``serve.run`` ends with is
printed as a second JSON line (the test kills the supervisor in between).
"""

import json
import sys
import threading
from pathlib import Path

import psutil

from shoal import serve


@serve.deployment
class NeverReady:
    def __init__(self, marker: str) -> None:
        Path(marker).touch()
        threading.Event().wait()


def main() -> None:
    serve.start(http_options={"host": None})
    [supervisor] = [p for p in psutil.Process().children() if "shoal.controller" in p.cmdline()]
    print(json.dumps({"supervisor": supervisor.pid}), flush=True)
    try:
        serve.run(NeverReady.bind(sys.argv[1]), route_prefix=None)
        outcome = {"returned": True}
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
