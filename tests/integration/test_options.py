"""Options that must take effect (issue 8, item 6): a config file's ``target_capacity``, an
application-level ``autoscaling_policy``, and ``logging_config`` at the deployment, application
and ``serve.start`` levels (JSON lines, log level, access log, logs_dir, extra attributes).

Real supervisor and replicas (one instance for the module). Config files are deployed as
``shoal deploy`` does (``config_file.build_specs`` then a declarative deploy).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS_DIR, app_status, wait_until

from shoal import serve
from shoal.serve import api, config_file
from shoal.serve.schema import ServeDeploySchema

pytestmark = pytest.mark.timeout(90)

APPS_DIR = TESTS_DIR / "integration" / "cli_apps"


@pytest.fixture(scope="module", autouse=True)
def apps_on_path() -> Iterator[None]:
    sys.path.insert(0, str(APPS_DIR))
    yield
    sys.path.remove(str(APPS_DIR))


def deploy_config(config: dict[str, Any]) -> None:
    specs = config_file.build_specs(ServeDeploySchema.model_validate(config))
    api.deploy_specs(specs, declarative=True, wait=True)


def running_pids(app: str, deployment: str) -> set[int]:
    status = app_status(app)
    if status is None:
        return set()
    return {r.pid for r in status.deployments[deployment].replicas if r.state == "RUNNING" and r.pid is not None}


def test_target_capacity_scales_every_target_and_changes_without_a_restart(serve_instance: Any) -> None:
    app = {"name": "capacity", "route_prefix": None, "import_path": "options_app:pid_app"}
    try:
        deploy_config({"applications": [app], "target_capacity": 50})
        first = wait_until(lambda: running_pids("capacity", "Pid") if len(running_pids("capacity", "Pid")) == 2 else None,
                           30, "2 of 4 replicas at 50% capacity")
        assert serve.status().target_capacity == 50
        deploy_config({"applications": [app], "target_capacity": 100})
        wait_until(lambda: len(running_pids("capacity", "Pid")) == 4, 30, "4 replicas at 100% capacity")
        assert first <= running_pids("capacity", "Pid")  # rescaled: the first two kept running
        assert serve.status().target_capacity == 100
        deploy_config({"applications": [app], "target_capacity": 0})
        wait_until(lambda: not running_pids("capacity", "Pid"), 30, "no replica at 0% capacity")
        deploy_config({"applications": [app]})
        wait_until(lambda: len(running_pids("capacity", "Pid")) == 4, 30, "4 replicas without a capacity")
        assert serve.status().target_capacity is None
    finally:
        serve.delete("capacity")


def test_an_application_level_policy_sets_every_deployments_count(serve_instance: Any) -> None:
    app = {
        "name": "policy",
        "route_prefix": None,
        "import_path": "options_app:pair_app",
        "autoscaling_policy": {"policy_function": "options_app:three_each"},
    }
    try:
        deploy_config({"applications": [app]})
        wait_until(
            lambda: len(running_pids("policy", "Left")) == 3 and len(running_pids("policy", "Right")) == 3,
            30, "the application's policy gives Left and Right 3 replicas each",
        )
        assert len(running_pids("policy", "Pair")) == 1  # not autoscaling: the policy leaves it
    finally:
        serve.delete("policy")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def log_file(logs_dir: Path, app: str, deployment: str) -> Path:
    found = wait_until(lambda: sorted(logs_dir.glob(f"replica_{app}_{deployment}_*.log")), 10, f"{deployment}'s log file")
    assert len(found) == 1
    return found[0]


def test_logging_config_levels_fields_and_precedence(serve_instance: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import options_app

    monkeypatch.setattr(api, "_instance_logging_config", None)
    # serve.start's config is the default of the apps this process deploys; serve.run's wins.
    serve.start(logging_config={"log_level": "WARNING", "encoding": "JSON"})
    app_config = {"encoding": "JSON", "log_level": "WARNING", "logs_dir": str(tmp_path),
                  "additional_log_standard_attrs": ["funcName"]}
    try:
        serve.run(options_app.talk_app(str(tmp_path)), name="talk", route_prefix="/talk", logging_config=app_config)
        for name in ("Inherits", "Debug", "Quiet"):
            handle = serve.get_deployment_handle(name, "talk")
            assert handle.remote("one").result(timeout_s=30) == "one"
            assert handle.remote("two").result(timeout_s=30) == "two"  # after "one"'s access line

        # Inherits: the app's config, whole: JSON, WARNING (no DEBUG, no INFO access line).
        records = [json.loads(line) for line in lines(log_file(tmp_path, "talk", "Inherits"))]
        messages = [r["message"] for r in records]
        assert "warning-two" in messages and "debug-two" not in messages
        assert not [m for m in messages if m.startswith("CALL")]
        warning = next(r for r in records if r["message"] == "warning-one")
        assert warning["levelname"] == "WARNING" and warning["funcName"] == "__call__"
        assert {"asctime", "deployment", "replica", "component_name", "request_id", "application"} <= set(warning)
        assert (warning["deployment"], warning["application"], warning["component_name"]) == ("Inherits", "talk", "replica")

        # Debug: its own config wins, whole: TEXT (the default encoding), DEBUG, access lines on.
        text = lines(log_file(tmp_path, "talk", "Debug"))
        assert any("debug-one" in line for line in text) and not any(line.startswith("{") for line in text)
        assert any(" -- CALL __call__ OK " in line and line.endswith("ms") for line in text)

        # Quiet: DEBUG, access lines off.
        quiet = lines(log_file(tmp_path, "talk", "Quiet"))
        assert any("debug-two" in line for line in quiet)
        assert not any("CALL __call__" in line for line in quiet)

        # HTTP requests are logged by method, route and status code.
        with urllib.request.urlopen(f"{serve.get_http_url()}/talk", timeout=30) as response:
            assert response.status == 200
        front = log_file(tmp_path, "talk", "Front")
        wait_until(lambda: any(" -- GET /talk 200 " in line for line in lines(front)), 10, "Front's HTTP access line")

        # Without serve.run's config, serve.start's applies: JSON at WARNING, into the replica's
        # log file in the run directory (no logs_dir).
        serve.run(options_app.Inherits.bind(), name="talk_default", route_prefix=None)
        handle = serve.get_deployment_handle("Inherits", "talk_default")
        assert handle.remote("three").result(timeout_s=30) == "three"
        default_log = log_file(serve_instance.run_dir / "logs", "talk_default", "Inherits")
        wait_until(lambda: any('"warning-three"' in line for line in lines(default_log)), 10, "the JSON warning line")
        logged = [json.loads(line) for line in lines(default_log) if line.startswith("{")]
        assert "debug-three" not in [r["message"] for r in logged]  # logged before the warning
    finally:
        serve.delete("talk")
        serve.delete("talk_default")
