"""Warm start: replicas forked from a template that imported the deployment once.

The proof that the import ran once, in the template, is a marker file the app's module appends
its pid to when imported (``warm_apps``), never a timing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import alive, app_status, replica_pids, wait_until
from warm_apps import MARKER_ENV, THREAD_ENV, Imported

from shoal import serve

pytestmark = pytest.mark.timeout(90)


def _templates(supervisor: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in supervisor.children():
        try:
            if child.name() == "shoal-template" and alive(child.pid):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def no_template_left(serve_instance: Any) -> Any:
    """Each test starts with no template, and its deployment's template stops after it."""
    wait_until(lambda: not _templates(serve_instance.supervisor), 30, "no template from an earlier test")
    yield
    # (the app is deleted by the ``deploy`` fixture after this; the next test's check covers it)


def _app(env: dict[str, str], tag: str = "", **options: Any) -> Any:
    return Imported.options(ray_actor_options={"runtime_env": {"env_vars": env}}, **options).bind(tag)


def _whoami_all(handle: Any, count: int) -> dict[int, dict[str, Any]]:
    """``whoami`` of ``count`` distinct replicas, by pid (calls until each has answered)."""
    seen: dict[int, dict[str, Any]] = {}

    def ask() -> bool:
        answer = handle.whoami.remote().result(timeout_s=30)
        seen[answer["pid"]] = answer
        return len(seen) >= count

    wait_until(ask, 30, f"{count} replicas answered")
    return seen


def _marker_pids(marker: Path) -> list[int]:
    return [int(line) for line in marker.read_text().split()] if marker.exists() else []


def _running(name: str, count: int) -> bool:
    status = app_status(name)
    if status is None:
        return False
    deployment = status.deployments["Imported"]
    return bool(deployment.replica_states.get("RUNNING") == count and len(deployment.replicas) == count)


def test_replicas_fork_from_one_template_that_imported_once(
    deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    handle = deploy(_app({MARKER_ENV: str(marker)}), app_name)
    (template,) = _templates(serve_instance.supervisor)
    answers = _whoami_all(handle, 2)
    assert set(answers) == replica_pids(serve_instance.supervisor)
    for pid, answer in answers.items():
        assert pid != template.pid
        assert answer["ppid"] == template.pid  # forked by the template
    assert _marker_pids(marker) == [template.pid]  # imported once, in the template only
    first, second = (a["random"] for a in answers.values())
    assert first != second  # each child re-seeded its random generator
    replicas = serve.status().applications[app_name].deployments["Imported"].replicas
    assert {r.pid for r in replicas} == set(answers)


def test_crashed_forked_replica_is_replaced_by_a_fork(deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    handle = deploy(_app({MARKER_ENV: str(marker)}), app_name)
    (template,) = _templates(serve_instance.supervisor)
    victim, survivor = _whoami_all(handle, 2)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 10, "the killed replica is gone")
    wait_until(lambda: app_status(app_name).deployments["Imported"].restarts >= 1, 30, "the exit was seen")
    wait_until(lambda: _running(app_name, 2) and victim not in replica_pids(serve_instance.supervisor), 30, "replaced")
    answers = _whoami_all(handle, 2)
    assert survivor in answers and victim not in answers
    assert all(a["ppid"] == template.pid for a in answers.values())
    assert _marker_pids(marker) == [template.pid]


def test_stop_drains_a_forked_replica(deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path) -> None:
    handle = deploy(_app({}, num_replicas=1, graceful_shutdown_timeout_s=30), app_name)
    (template,) = _templates(serve_instance.supervisor)
    started = tmp_path / "started"
    response = handle.work.remote(str(started), 1.0)
    pid = int(wait_until(lambda: started.exists() and started.read_text(), 30, "the call started"))
    assert psutil.Process(pid).ppid() == template.pid
    serve.delete(app_name, _blocking=False)  # SIGTERM after unrouting: the replica drains
    assert response.result(timeout_s=30) == "finished"
    wait_until(lambda: not alive(pid), 30, "the drained replica exited")
    wait_until(lambda: not _templates(serve_instance.supervisor), 30, "the template stopped with its deployment")


def test_killed_template_is_replaced_and_its_replicas_too(
    deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path
) -> None:
    handle = deploy(_app({}), app_name)
    (template,) = _templates(serve_instance.supervisor)
    old = set(_whoami_all(handle, 2))
    template.kill()
    wait_until(lambda: not any(alive(pid) for pid in old), 10, "its replicas died with it")
    wait_until(lambda: _running(app_name, 2) and not (old & replica_pids(serve_instance.supervisor)), 60, "replaced")
    (new_template,) = wait_until(lambda: _templates(serve_instance.supervisor), 30, "a new template")
    assert new_template.pid != template.pid
    assert all(a["ppid"] in (new_template.pid, serve_instance.supervisor.pid) for a in _whoami_all(handle, 2).values())


def test_new_version_gets_a_new_template_and_the_old_one_stops(
    deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    handle = deploy(_app({MARKER_ENV: str(marker)}, tag="v1"), app_name)
    (old,) = _templates(serve_instance.supervisor)
    old_replicas = set(_whoami_all(handle, 2))
    handle = serve.run(_app({MARKER_ENV: str(marker)}, tag="v2"), name=app_name, route_prefix=None)
    wait_until(lambda: not alive(old.pid), 60, "the old template stopped once its replicas were replaced")
    (new,) = _templates(serve_instance.supervisor)
    answers = _whoami_all(handle, 2)
    assert not (set(answers) & old_replicas)
    assert all(a["ppid"] == new.pid and a["tag"] == "v2" for a in answers.values())
    assert _marker_pids(marker) == [old.pid, new.pid]  # the new code was imported afresh, once


def test_option_spawn_starts_fresh_interpreters(deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    handle = deploy(_app({MARKER_ENV: str(marker), "SHOAL_WORKER_START": "spawn"}), app_name)
    answers = _whoami_all(handle, 2)
    assert not _templates(serve_instance.supervisor)
    assert all(a["ppid"] == serve_instance.supervisor.pid for a in answers.values())
    assert sorted(_marker_pids(marker)) == sorted(answers)  # each replica paid its own import


def test_template_that_is_not_fork_safe_falls_back_to_spawn(
    deploy: Any, app_name: str, serve_instance: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    handle = deploy(_app({MARKER_ENV: str(marker), THREAD_ENV: "1"}), app_name)
    answers = _whoami_all(handle, 2)
    assert all(a["ppid"] == serve_instance.supervisor.pid for a in answers.values())
    imported = _marker_pids(marker)
    assert set(answers) <= set(imported) and len(imported) == 3  # the refusing template, then each replica
    wait_until(lambda: not _templates(serve_instance.supervisor), 30, "the refusing template exited")


def test_unknown_start_method_is_refused(app_name: str, serve_instance: Any) -> None:
    with pytest.raises(Exception, match="SHOAL_WORKER_START"):
        serve.run(_app({"SHOAL_WORKER_START": "vfork"}), name=app_name, route_prefix=None)
    assert app_status(app_name) is None
