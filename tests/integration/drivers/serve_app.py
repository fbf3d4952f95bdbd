"""A driver program for the lifecycle tests, run as ``python serve_app.py MODE``.

It deploys a two-replica app on a private instance (HTTP on port 0), prints one JSON line with
its own pid, the pids of every process under it and the instance's run directory, then:
``exit`` returns (a normal end of the script), ``wait`` waits forever (for a signal).
"""

import json
import os
import sys
import threading

import psutil

from shoal import serve


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, x):
        return x


def main() -> None:
    mode = sys.argv[1]
    serve.start(http_options={"port": 0})
    handle = serve.run(Echo.bind())
    assert handle.remote("hi").result(timeout_s=10) == "hi"
    me = psutil.Process()
    descendants = me.children(recursive=True)
    supervisors = [p for p in descendants if "shoal.controller" in p.cmdline()]
    argv = supervisors[0].cmdline()
    report = {
        "pid": os.getpid(),
        "descendants": [p.pid for p in descendants],
        "supervisor": supervisors[0].pid,
        "run_dir": argv[argv.index("--run-dir") + 1],
    }
    print(json.dumps(report), flush=True)
    if mode == "wait":
        threading.Event().wait()


if __name__ == "__main__":
    main()
