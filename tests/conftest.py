"""Fixtures. Every shoal instance the tests start lives under one private run directory.

SHOAL_RUN_DIR is set here, when pytest imports this file and before any test starts anything, so
the tests never touch (or find) a user's instance.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_RUN_ROOT = Path(tempfile.mkdtemp(prefix="shoal-tests-"))  # created 0700
os.environ["SHOAL_RUN_DIR"] = str(_RUN_ROOT)
os.environ.pop("SHOAL_ADDRESS", None)
# One HTTP proxy unless a test asks for more (http_options.num_proxies): the default depends on
# the machine's cores, and tests that read the proxy's log file or count what its router queues
# assume one. Set it before running pytest to run the suite with another default.
os.environ.setdefault("SHOAL_DEFAULT_NUM_PROXIES", "1")

import psutil
from helpers import (
    Gate,
    kill_all,
    live_children,
    processes_in_run_dir,
    run_dir_of,
    sockets_in,
    supervisor_of,
    wait_until,
)

from shoal import serve


@pytest.fixture(scope="session", autouse=True)
def run_root() -> Iterator[Path]:
    """The base run directory of the session; at the end no process may still use it."""
    yield _RUN_ROOT
    try:
        wait_until(lambda: not processes_in_run_dir(_RUN_ROOT), 10, "no process uses the run root")
    except AssertionError:
        pass
    left = processes_in_run_dir(_RUN_ROOT)
    kill_all(left)
    shutil.rmtree(_RUN_ROOT, ignore_errors=True)
    assert not left, f"processes outlived the test session: {[p.pid for p in left]}"


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "(gone)"


def _assert_no_children(where: str) -> None:
    try:
        wait_until(lambda: not live_children(), 15, f"no child processes left after {where}")
    except AssertionError:
        left = live_children()
        described = [(p.pid, _cmdline(p)) for p in left]
        kill_all(left)
        raise AssertionError(f"child processes left after {where}: {described}") from None


class Instance:
    """The module's shoal instance: its supervisor and run directory."""

    def __init__(self, supervisor: psutil.Process) -> None:
        self.supervisor = supervisor
        self.run_dir = run_dir_of(supervisor)


@pytest.fixture(scope="module")
def serve_instance() -> Iterator[Instance]:
    """A private instance shared by the tests of one module; shut down and checked after."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0})  # port 0: never collide with anything on 8000
    instance = Instance(supervisor_of(psutil.Process()))
    yield instance
    serve.shutdown()
    _assert_no_children("serve.shutdown()")
    assert not sockets_in(instance.run_dir), f"socket files left in {instance.run_dir}"


@pytest.fixture
def app_name(request: pytest.FixtureRequest, serve_instance: Instance) -> Iterator[str]:
    """A name for the test's own application, deleted after the test."""
    name = re.sub(r"\W+", "_", request.node.name).strip("_")[:60]
    yield name
    serve.delete(name)


@pytest.fixture
def deploy(serve_instance: Instance) -> Iterator[Callable[..., Any]]:
    """``deploy(app, name)`` runs ``app`` (no route prefix) and deletes it after the test."""
    names: list[str] = []

    def run(app: Any, name: str, **kwargs: Any) -> Any:
        names.append(name)
        kwargs.setdefault("route_prefix", None)
        return serve.run(app, name=name, **kwargs)

    yield run
    for name in reversed(names):
        serve.delete(name)


@pytest.fixture(scope="module")
def gate(serve_instance: Instance) -> Iterator[Any]:
    """A handle to a ``Gate`` deployment (its own app), shared by a module's tests."""
    name = "gate"
    handle = serve.run(Gate.bind(), name=name, route_prefix=None)
    yield handle
    serve.delete(name)


@pytest.fixture
def private_run_dir(run_root: Path) -> Iterator[Path]:
    """A fresh SHOAL_RUN_DIR (0700) for a driver run in a subprocess; afterwards no process
    may still use it (they are killed if they do, and the test fails)."""
    path = Path(tempfile.mkdtemp(prefix="sub-", dir=run_root))
    yield path
    # The instance's last processes (multiprocessing's resource tracker) exit once they see the
    # supervisor gone: give them a bounded moment, as _assert_no_children does.
    try:
        wait_until(lambda: not processes_in_run_dir(path), 15, f"no process of {path} left")
    except AssertionError:
        pass
    left = processes_in_run_dir(path)
    described = [(p.pid, _cmdline(p)) for p in left]
    kill_all(left)
    assert not left, f"processes of {path} outlived the test: {described}"


@pytest.fixture
def no_processes() -> Iterator[None]:
    """For tests that must start no process: none before, none after (local testing mode)."""
    _assert_no_children("the previous test")
    yield
    _assert_no_children("a test that must not start processes")
