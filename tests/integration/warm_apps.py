"""Deployments for the warm-start tests (``test_warm_start.py``), importable by name so that the
template imports this module when it unpickles them.

When ``WARM_APPS_MARKER`` names a file (set through ``runtime_env``, so only shoal's processes
see it), importing this module appends its process's pid there: the file proves which
processes paid the import. With ``WARM_APPS_THREAD=1`` the import also starts a thread, which
makes a template refuse to fork.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path
from typing import Any

from shoal import serve

MARKER_ENV = "WARM_APPS_MARKER"
THREAD_ENV = "WARM_APPS_THREAD"

if os.environ.get(MARKER_ENV):
    with open(os.environ[MARKER_ENV], "a") as f:
        f.write(f"{os.getpid()}\n")

if os.environ.get(THREAD_ENV) == "1":
    _forever = threading.Event()
    threading.Thread(target=_forever.wait, name="import-time-thread", daemon=True).start()


@serve.deployment(num_replicas=2)
class Imported:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag  # another tag is another definition: a new version of the deployment

    def whoami(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "ppid": os.getppid(), "random": random.random(), "tag": self.tag}

    async def work(self, started_file: str, duration_s: float) -> str:
        """Say it started (a file), then work ``duration_s`` seconds."""
        Path(started_file).write_text(str(os.getpid()))
        await asyncio.sleep(duration_s)
        return "finished"
