"""The ``shoal`` command, run as a user runs it: a subprocess per command, in a working directory
holding the app modules and config files of ``cli_apps/``, on a private SHOAL_RUN_DIR.

``shoal run`` gets ``--port 0`` and prints the URL it really serves on; the tests read that line
(an event), never a fixed port. At the end of each test no process may use its run directory.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import processes_in_run_dir, sockets_in, wait_until

pytestmark = pytest.mark.timeout(90)

CLI_APPS = Path(__file__).resolve().parent / "cli_apps"
SHOAL = str(Path(sys.executable).with_name("shoal"))
COMMANDS = ("run", "start", "deploy", "status", "config", "build", "shutdown")


# -- running the command ------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with copies of the app modules and config files."""
    for source in CLI_APPS.iterdir():
        if source.suffix in (".py", ".yaml"):
            shutil.copy(source, tmp_path / source.name)
    return tmp_path


@pytest.fixture
def env(private_run_dir: Path) -> dict[str, str]:
    values = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    values.pop("SHOAL_ADDRESS", None)
    return values


class Cli:
    """Runs ``shoal`` commands in ``workdir`` with the test's environment."""

    def __init__(self, workdir: Path, env: dict[str, str], run_dir: Path) -> None:
        self.workdir = workdir
        self.env = env
        self.run_dir = run_dir
        self.foreground: list[Foreground] = []

    def __call__(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SHOAL, *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.returncode == 0, f"shoal {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        return result.stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.ok("status", "--json"))

    def run(self, *args: str) -> Foreground:
        proc = Foreground([SHOAL, "run", *args], self.workdir, self.env)
        self.foreground.append(proc)
        return proc

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=60
        )


class Foreground:
    """``shoal run`` in its own process group (as started from a shell); its output is read by
    threads so that it never blocks on a full pipe."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str], announce: bool) -> None:
        with stream:
            for line in stream:
                into.append(line)
                if announce:
                    self.lines.put(line)
        if announce:
            self.lines.put(None)

    def wait_serving(self, timeout_s: float = 60) -> str:
        """The base URL from the ``shoal: serving ... on URL`` line."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"shoal run did not start serving within {timeout_s}s") from None
            if line is None:
                self.proc.wait(10)
                self._readers[1].join(timeout=10)
                raise AssertionError(f"shoal run exited with {self.proc.returncode}:\n{''.join(self.stderr)}")
            match = re.match(r"shoal: serving .* on (http://\S+) ", line)
            if match:
                return match.group(1)

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C: SIGINT to the process group; its exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self._wait(timeout_s)

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM to ``shoal run`` alone, as a service manager stops it; its exit code."""
        self.proc.terminate()
        return self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout_s)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.interrupt(timeout_s=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def cli(workdir: Path, env: dict[str, str], private_run_dir: Path) -> Iterator[Cli]:
    runner = Cli(workdir, env, private_run_dir)
    yield runner
    for proc in runner.foreground:
        proc.stop()


def _assert_nothing_left(run_dir: Path) -> None:
    wait_until(lambda: not processes_in_run_dir(run_dir), 20, f"no process uses {run_dir}")
    assert not sockets_in(run_dir), f"socket files left: {sockets_in(run_dir)}"


def _get(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _pids(status: dict[str, Any], app: str, deployment: str) -> set[int]:
    replicas = status["applications"][app]["deployments"][deployment]["replicas"]
    return {r["pid"] for r in replicas if r["state"] == "RUNNING"}


# -- help -----------------------------------------------------------------------------------------


EXPECTED_OPTIONS = {
    "run": ("--host", "--port", "--reload", "--name", "--route-prefix", "--app-dir"),
    "start": ("--http-host", "--http-port"),
    "deploy": ("--wait", "--name", "--route-prefix", "--app-dir"),
    "status": ("--name", "--json", "--yaml"),
    "config": ("--name",),
    "build": ("--output-path", "--app-dir"),
    "shutdown": ("--yes",),
}


def test_every_command_has_help(workdir: Path, env: dict[str, str]) -> None:
    argvs = [[SHOAL, "--help"]] + [[SHOAL, command, "--help"] for command in COMMANDS]
    procs = [
        subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        outputs.append((proc.returncode, out, err))
    code, out, _ = outputs[0]
    assert code == 0
    assert all(command in out for command in COMMANDS), out
    for command, (code, out, err) in zip(COMMANDS, outputs[1:]):
        assert code == 0, f"shoal {command} --help exited {code}: {err}"
        assert out.startswith(f"usage: shoal {command}"), out
        missing = [option for option in EXPECTED_OPTIONS[command] if option not in out]
        assert not missing, f"shoal {command} --help does not mention {missing}:\n{out}"


# -- run, status, config, Ctrl-C --------------------------------------------------------------------


def test_run_status_config_and_ctrl_c(cli: Cli) -> None:
    server = cli.run("greet_app:app", "--port", "0")
    url = server.wait_serving()
    assert httpx.get(f"{url}/-/healthz", timeout=10).status_code == 200
    answer = _get(f"{url}/")
    assert answer["greeting"] == "hello"
    pid = answer["pid"]

    table = cli.ok("status")
    row = next(line for line in table.splitlines() if line.startswith("default "))
    assert row.split()[:4] == ["default", "RUNNING", "Greeter", "HEALTHY"], table
    assert str(pid) in row.split()
    as_json = cli.status()
    app = as_json["applications"]["default"]
    assert app["status"] == "RUNNING" and app["route_prefix"] == "/"
    assert _pids(as_json, "default", "Greeter") == {pid}
    assert app["deployments"]["Greeter"]["restarts"] == 0
    as_yaml = yaml.safe_load(cli.ok("status", "--yaml"))
    assert as_yaml == as_json
    assert cli.ok("status", "--name", "nothing").strip() == "No applications are running."

    config = yaml.safe_load(cli.ok("config"))
    assert config["name"] == "default" and config["import_path"] == "greet_app:app"
    assert cli.ok("config", "--name", "nothing").strip() == "No configuration was found."

    assert server.interrupt() == 0, "".join(server.stderr)
    assert "draining and stopping" in "".join(server.stdout)
    assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)
    _assert_nothing_left(cli.run_dir)
    # With nothing running, status says so (and starts nothing).
    assert cli.ok("status").strip() == "No applications are running."
    assert not processes_in_run_dir(cli.run_dir)



def test_run_serves_holding_only_the_lifeline(cli: Cli) -> None:
    """Once serving, ``shoal run`` is the small lifeline holder (same pid, no application modules);
    it still answers SIGTERM with an orderly stop, and killing it stops the whole instance."""
    server = cli.run("greet_app:app", "--port", "0")
    url = server.wait_serving()
    pid = server.proc.pid
    wait_until(lambda: _is_lifeline_holder(pid), 30, "shoal run became the lifeline holder")
    assert _get(f"{url}/")["greeting"] == "hello"
    assert server.terminate() == 0, "".join(server.stderr)
    assert "draining and stopping" in "".join(server.stdout)
    _assert_nothing_left(cli.run_dir)

    server = cli.run("greet_app:app", "--port", "0")
    server.wait_serving()
    wait_until(lambda: _is_lifeline_holder(server.proc.pid), 30, "shoal run became the lifeline holder")
    server.proc.kill()  # however the command dies, its supervisor and replicas follow
    server.proc.wait(10)
    _assert_nothing_left(cli.run_dir)


def _is_lifeline_holder(pid: int) -> bool:
    try:
        return "shoal/cli_wait.py" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")[3]
    except (OSError, IndexError):
        return False


# -- config files -------------------------------------------------------------------------------


def test_run_config_file_with_typed_args_and_overrides(cli: Cli) -> None:
    server = cli.run("greet.yaml", "--port", "0")
    url = server.wait_serving()
    status = cli.status()
    dep = status["applications"]["greet"]["deployments"]["Greeter"]
    assert dep["replica_states"] == {"RUNNING": 2}  # num_replicas from the file
    pids = _pids(status, "greet", "Greeter")
    seen: dict[int, str] = {}
    for _ in range(100):
        answer = _get(f"{url}/greet")
        seen[answer["pid"]] = answer["greeting"]
        if set(seen) == pids:
            break
    # user_config from the file on every replica; args validated ("2" -> 2) by the builder's model.
    assert seen == {pid: "hi!!" for pid in pids}
    assert server.terminate() == 0, "".join(server.stderr)
    _assert_nothing_left(cli.run_dir)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param("bad_unknown_key.yaml", ["applications.0.deployments.0.bogus_key", "Extra inputs"], id="unknown key"),
        pytest.param("bad_type.yaml", ["applications.0.deployments.0.max_ongoing_requests"], id="wrong type"),
        pytest.param("bad_args.yaml", ["greet_app:builder", "repeat"], id="builder args"),
        pytest.param("bad_deployment_name.yaml", ["applications.0.deployments.0.name", "NoSuchDeployment"], id="no such deployment"),
    ],
)
def test_run_rejects_an_invalid_config(cli: Cli, config: str, expected: list[str]) -> None:
    result = cli("run", config, "--port", "0")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("shoal: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    # Nothing was deployed, and the supervisor started alongside goes away.
    assert not list(cli.run_dir.rglob("replica_*.log"))
    _assert_nothing_left(cli.run_dir)


def test_builder_args_model_with_postponed_annotations(cli: Cli) -> None:
    """A builder's pydantic model is used when the module has ``from __future__ import
    annotations`` (its annotation is then the string ``"SuffixArgs"``)."""
    server = cli.run("annotated_builder.yaml", "--port", "0")
    url = server.wait_serving()
    assert _get(f"{url}/")["greeting"] == "hello??"
    assert server.interrupt() == 0


# -- deploy -------------------------------------------------------------------------------------


def test_deploy_is_declarative_and_validated_first(cli: Cli) -> None:
    server = cli.run("two_apps.yaml", "--port", "0")
    url = server.wait_serving()
    assert _get(f"{url}/greet")["greeting"] == "hi"
    other = _get(f"{url}/other")
    before = cli.status()
    greet_pids = _pids(before, "greet", "Greeter")
    other_pids = _pids(before, "other", "Other")
    assert other_pids == {other["pid"]}

    # Only user_config changes: reconfigured in place, same pids; the other app is untouched.
    assert "Sent deploy request successfully" in cli.ok("deploy", "two_apps_new_config.yaml", "--wait")
    answer = _get(f"{url}/greet")
    assert answer["greeting"] == "hey"
    after = cli.status()
    assert _pids(after, "greet", "Greeter") == greet_pids == {answer["pid"]}
    assert _pids(after, "other", "Other") == other_pids
    config = yaml.safe_load(cli.ok("config", "--name", "greet"))
    assert config["deployments"][0]["user_config"] == {"greeting": "hey"}

    # Files that fail validation or cannot be built change nothing, not even their valid parts.
    for bad in ("bad_unknown_key.yaml", "bad_type.yaml", "bad_second_app.yaml"):
        result = cli("deploy", bad, "--wait")
        assert result.returncode == 1, (bad, result.stdout, result.stderr)
        assert result.stderr.startswith("shoal: "), result.stderr
        assert cli.status() == after, f"shoal deploy {bad} changed the status"
        assert _get(f"{url}/greet")["greeting"] == "hey"
    assert "no_such_module" in result.stderr

    # A file without `other` deletes it.
    cli.ok("deploy", "greet_only.yaml", "--wait")
    wait_until(lambda: "other" not in cli.status()["applications"], 20, "the app the file omits is deleted")
    assert httpx.get(f"{url}/other", timeout=10).status_code == 404
    assert _get(f"{url}/greet") == answer
    assert set(cli.status()["applications"]) == {"greet"}
    assert server.interrupt() == 0
    _assert_nothing_left(cli.run_dir)


# -- build --------------------------------------------------------------------------------------


def test_build_writes_a_config_that_runs(cli: Cli) -> None:
    out = cli.workdir / "out.yaml"
    assert "Wrote" in cli.ok("build", "greet_app:app", "-o", str(out))
    config = yaml.safe_load(out.read_text())
    assert yaml.safe_load(cli.ok("build", "greet_app:app")) == config
    (application,) = config["applications"]
    assert application["import_path"] == "greet_app:app"
    (deployment,) = application["deployments"]
    assert deployment["name"] == "Greeter" and deployment["user_config"] == {"greeting": "hello"}
    assert not processes_in_run_dir(cli.run_dir)  # building starts nothing

    server = cli.run(str(out), "--port", "0")
    url = server.wait_serving()
    assert _get(f"{url}/")["greeting"] == "hello"
    assert server.interrupt() == 0
    _assert_nothing_left(cli.run_dir)


# -- start, a script, shutdown --------------------------------------------------------------------


def test_start_then_script_then_shutdown(cli: Cli) -> None:
    try:
        started = cli.ok("start", "--http-port", "0")
        assert "shoal started" in started
        assert "already running" in cli.ok("start", "--http-port", "0")
        script = cli.python("deploy_script.py")
        assert script.returncode == 0, script.stderr
        url = json.loads(script.stdout.strip().splitlines()[-1])["url"]
        (supervisor,) = [p for p in processes_in_run_dir(cli.run_dir) if p.name() == "shoal"]
        # The script is gone; its app runs on in the detached instance.
        status = cli.status()
        assert status["applications"]["scripted"]["status"] == "RUNNING"
        assert _get(f"{url}/scripted")["greeting"] == "hello-scripted"
        assert "scripted" in cli.ok("status")
        assert "shoal stopped" in cli.ok("shutdown", "-y")
    finally:
        cli("shutdown", "-y")
    _assert_nothing_left(cli.run_dir)
    assert cli.ok("status").strip() == "No applications are running."
    # With no instance running, deploy says how to start one, and starts nothing.
    result = cli("deploy", "greet_only.yaml")
    assert result.returncode == 1 and "shoal start" in result.stderr, result.stderr
    assert not processes_in_run_dir(cli.run_dir)
    # What `shoal start` printed describes the instance it started.
    assert f"supervisor pid {supervisor.pid}" in started, started
    assert f"HTTP: {url} " in started, started
