"""Control-plane security (plan section 4.E, T27–T29): only processes that hold the instance's
key can register as a replica or drive the supervisor; nothing of the instance is exposed.

Real supervisor, replica and proxy processes; the attacker is a raw ZeroMQ DEALER on the control
socket (a process of this user without the key), or, as root, a throwaway local user.

Two counters show that forged frames are never deserialised. Their payloads are pickles that
count their own loading: unpickling one anywhere creates a marker directory named for it. And
the module's instance runs with the deserialisers instrumented (a ``sitecustomize`` on its
PYTHONPATH): every call of ``msgpack.unpackb``, ``pickle.loads`` or ``cloudpickle.loads`` on
bytes that hold the forgeries' tag is written to a log, in the supervisor, the proxy and every
replica. Each test prints what it measured (run with ``-s``).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from helpers import live_children, python, wait_until

from shoal import serve
from shoal.controller import launch, rundir
from shoal.runtime import client, transport, wire
from shoal.runtime.wire import Kind, Message
from shoal.serve import _build

pytestmark = pytest.mark.timeout(60)


# -- helpers -------------------------------------------------------------------------------------

TAG = b"FORGED-4f2a"  # in every forged frame; counted when a deserialiser is given it

_COUNTING_SITECUSTOMIZE = f"""
import os
_log = os.environ.get("SHOAL_TEST_DECODE_LOG")
if _log:
    import cloudpickle, msgpack, pickle

    def _counted(name, decode):
        def counted(data, *args, **kwargs):
            if {TAG!r} in bytes(data):
                with open(_log, "a") as log:
                    log.write(f"{{os.getpid()}} {{name}}\\n")
            return decode(data, *args, **kwargs)
        return counted

    msgpack.unpackb = _counted("msgpack.unpackb", msgpack.unpackb)
    pickle.loads = _counted("pickle.loads", pickle.loads)
    cloudpickle.loads = _counted("cloudpickle.loads", cloudpickle.loads)
"""


class Marker:
    """Unpickling this creates ``path``: a deserialisation counter that works in any process."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


class Peer:
    """A raw DEALER on an instance's control socket: what any process of this user can open."""

    def __init__(self, endpoint: str) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def call(self, key: bytes, op: str, call_id: int, timeout_s: float = 10.0, **meta: Any) -> Message:
        """A signed CALL; returns the first message this socket receives (verified)."""
        [frame] = wire.encode(Message(Kind.CALL, 0, call_id, {"op": op, **meta}))
        self.send(wire.sign(frame, key))
        assert self.sock.poll(int(timeout_s * 1000)), f"no reply to '{op}' within {timeout_s}s"
        [reply] = self.sock.recv_multipart()
        return wire.decode([wire.verify(reply, key)])

    def close(self) -> None:
        self.sock.close()
        self._ctx.term()


def call_frame(op: str, call_id: int = 1, payload: bytes = b"", **meta: Any) -> bytes:
    [frame] = wire.encode(Message(Kind.CALL, 0, call_id, {"op": op, **meta}, (payload,) if payload else ()))
    return frame


def rejected_frames() -> int:
    reply, _ = client.get_runtime().call_sync("status")
    return int(reply["rejected_frames"])


def instance_key(run_dir: Path) -> bytes:
    return transport.read_key(rundir.control_endpoint(run_dir))


def shoal_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    return [supervisor, *supervisor.children(recursive=True)]


def connections(proc: psutil.Process, kind: str) -> list[Any]:
    method = getattr(proc, "net_connections", None) or proc.connections
    return list(method(kind=kind))


def replica_socket(pid: int) -> Path:
    """The path of the ROUTER socket the replica process ``pid`` bound: r<incarnation>.sock."""
    bound = {Path(c.laddr) for c in connections(psutil.Process(pid), "unix") if c.laddr}
    [path] = [p for p in bound if p.stem.startswith("r") and p.stem[1:].isdigit()]
    return path


@serve.deployment
def touch_marker(marker: Any) -> str:
    return "deployed"


@serve.deployment
class Hello:
    def __call__(self) -> str:
        return "hello"


@serve.deployment
class SlowStart:
    """Its constructor reports that it runs and then waits until the test opens its gate."""

    async def __init__(self, gate: Any, key: str) -> None:
        await gate.arrive.remote(key)
        await gate.wait.remote(key)

    def __call__(self) -> str:
        return "started"


@pytest.fixture(scope="module", autouse=True)
def decode_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The log of deserialiser calls on tagged bytes (one line each), for the instance this
    module starts: set up before ``serve_instance`` (autouse fixtures come first)."""
    hook = tmp_path_factory.mktemp("decode-counter")
    (hook / "sitecustomize.py").write_text(_COUNTING_SITECUSTOMIZE)
    log = hook / "decodes.log"
    log.touch()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
        mp.setenv("SHOAL_TEST_DECODE_LOG", str(log))
        yield log


def decodes(log: Path) -> list[str]:
    return log.read_text().splitlines()


@pytest.fixture(scope="module")
def hello(serve_instance: Any) -> Iterator[Any]:
    handle = serve.run(Hello.bind(), name="hello", route_prefix=None)
    yield handle
    serve.delete("hello")


@pytest.fixture
def peer(serve_instance: Any) -> Iterator[Peer]:
    p = Peer(rundir.control_endpoint(serve_instance.run_dir))
    yield p
    p.close()


# -- registering as a replica --------------------------------------------------------------------


def test_a_forged_ready_never_registers_a_replica(
    serve_instance: Any, gate: Any, peer: Peer, app_name: str, decode_log: Path
) -> None:
    """T28 (READY): a replica is starting (its constructor waits on a gate). READY frames for its
    replica id and incarnation, without the key, are dropped and counted; a validly signed
    READY for another incarnation of it (a replay) changes nothing. Only its own READY counts."""
    key = instance_key(serve_instance.run_dir)
    runner = threading.Thread(target=serve.run, args=(SlowStart.bind(gate, app_name),),
                              kwargs={"name": app_name, "route_prefix": None}, daemon=True)
    runner.start()
    gate.arrived.remote(app_name).result(timeout_s=30)
    [replica] = serve.status().applications[app_name].deployments["SlowStart"].replicas
    endpoint = replica_socket(replica.pid)
    incarnation = int(endpoint.stem[1:])
    meta = {"replica_id": replica.replica_id, "pid": replica.pid, "protocol": wire.PROTOCOL_VERSION,
            "endpoint": f"ipc://{endpoint}"}
    [ready] = wire.encode(Message(Kind.READY, incarnation, 0, {**meta, "tag": TAG}))
    [stale] = wire.encode(Message(Kind.READY, incarnation - 1, 0, meta))
    signed_stale = wire.sign(stale, key)
    moved = signed_stale[:1] + incarnation.to_bytes(4, "big") + signed_stale[5:]  # stale MAC, current incarnation
    forged = {
        "no MAC": ready,
        "another key": wire.sign(ready, secrets.token_bytes(32)),
        "stale MAC moved to this incarnation": moved,
        "MAC cut off": wire.sign(ready, key)[: len(ready)],
    }
    before, decoded_before = rejected_frames(), len(decodes(decode_log))
    peer.send(signed_stale)  # handled first: one peer's frames are handled in order
    for frame in forged.values():
        peer.send(frame)
    wait_until(lambda: rejected_frames() >= before + len(forged), 10, "the forged READY frames are counted")
    rejected = rejected_frames() - before
    decoded = decodes(decode_log)[decoded_before:]
    status = serve.status().applications[app_name]
    states = status.deployments["SlowStart"].replica_states
    figures = (
        f"forged READY frames={len(forged)} rejected={rejected} deserialiser calls on them={decoded} "
        f"replica states after={states} app={status.status}"
    )
    print(figures)
    assert rejected == len(forged) and decoded == [], figures
    assert states == {"STARTING": 1} and status.status == "DEPLOYING", figures
    gate.open.remote(app_name).result()
    runner.join(30)
    assert serve.get_app_handle(app_name).remote().result(timeout_s=10) == "started"


# -- driving the controller ----------------------------------------------------------------------


def test_forged_control_calls_get_no_effect_and_no_answer(
    serve_instance: Any, hello: Any, peer: Peer, tmp_path: Path, decode_log: Path
) -> None:
    """T28: deploy and shutdown CALLs that are unsigned, signed with another key, cut short,
    tampered with, malformed or oversize are all dropped before anything in them is decoded:
    no marker is created (their pickled payloads are never loaded), no app appears, the
    supervisor answers none of them and keeps serving, and each one is counted."""
    key = instance_key(serve_instance.run_dir)
    markers = tmp_path / "markers"
    markers.mkdir()

    def deploy_frame(label: str) -> bytes:
        deployments, ingress = _build.build(touch_marker.bind(Marker(markers / label)), f"forged_{label}")
        spec = _build.to_spec(deployments, ingress, f"forged_{label}", None)
        return call_frame("deploy_many", 7, wire.pack([spec]), tag=TAG)

    shutdown = call_frame("shutdown", 8, tag=TAG)
    signed = wire.sign(deploy_frame("tampered"), key)
    tampered = signed[:-40] + bytes([signed[-40] ^ 1]) + signed[-39:]
    forged: dict[str, list[bytes]] = {
        "deploy, no MAC": [deploy_frame("no_mac")],
        "deploy, another key": [wire.sign(deploy_frame("other_key"), secrets.token_bytes(32))],
        "deploy, MAC of another frame": [deploy_frame("spliced") + wire.sign(shutdown, key)[-wire.MAC_BYTES:]],
        "deploy, tampered after signing": [tampered],
        "deploy, truncated": [wire.sign(deploy_frame("truncated"), key)[:-1]],
        "deploy, three frames": [deploy_frame("multipart"), b"x", b"y"],
        "deploy, 16 MiB, no MAC": [deploy_frame("oversize") + bytes(16 * 2**20)],
        "shutdown, no MAC": [shutdown],
        "shutdown, another key": [wire.sign(shutdown, secrets.token_bytes(32))],
        "tiny frame": [b"\x16"],
        "meta not msgpack, no MAC": [wire._HEADER.pack(Kind.CALL, 0, 9, 3) + b"\xc1\xc1\xc1" + TAG],
        "meta a list, valid MAC": [wire.sign(wire._HEADER.pack(Kind.CALL, 0, 9, 3) + b"\x92\x01\x02", key)],
        "meta not msgpack, valid MAC": [wire.sign(wire._HEADER.pack(Kind.CALL, 0, 9, 1) + b"\xc1", key)],
    }
    before, decoded_before = rejected_frames(), len(decodes(decode_log))
    supervisor = serve_instance.supervisor
    for frames in forged.values():
        peer.send(*frames)
    wait_until(lambda: rejected_frames() >= before + len(forged), 15, "every forged frame is counted")
    # The first message this peer gets: nothing answered the forgeries. Its CALL carries the tag
    # and a valid MAC, so it is decoded once: the counter does count.
    first = peer.call(key, "ping", 99, tag=TAG)
    rejected = rejected_frames() - before
    decoded = decodes(decode_log)[decoded_before:]
    counted_ping = [line for line in decoded if line == f"{supervisor.pid} msgpack.unpackb"]
    made = sorted(p.name for p in markers.iterdir())
    apps = sorted(n for n in serve.status().applications if n.startswith("forged_"))
    served = hello.remote().result(timeout_s=10)
    figures = (
        f"forged frames by class={list(forged)} sent={len(forged)} rejected={rejected} "
        f"deserialised (markers)={len(made)} {made} deserialiser calls on forged bytes={len(decoded) - 1} "
        f"(the signed ping: {len(counted_ping)}) forged apps={apps} first reply call_id={first.call_id} "
        f"supervisor alive={supervisor.is_running()} served after={served!r}"
    )
    print(figures)
    assert rejected == len(forged), figures
    assert made == [] and apps == [], figures
    assert decoded == counted_ping and len(counted_ping) == 1, figures
    assert first.call_id == 99 and first.meta["ok"], figures
    assert supervisor.is_running() and served == "hello", figures


def test_a_request_for_a_previous_incarnation_never_runs(
    serve_instance: Any, hello: Any, tmp_path: Path, decode_log: Path
) -> None:
    """T28 (stale epoch): a REQUEST on a replica's own socket but addressed to the incarnation
    before it, with a pickled payload, is refused (REJECTED) before its payload is decoded."""
    [replica] = serve.status().applications["hello"].deployments["Hello"].replicas
    endpoint = replica_socket(replica.pid)
    incarnation = int(endpoint.stem[1:])
    marker = tmp_path / "stale"
    header = wire.RequestHeader("__call__", "stale-1", wire.Encoding.PICKLE)
    payload = wire.dumps_args((Marker(marker), TAG), {})[1]
    [frame] = wire.encode(wire.request(incarnation - 1, 5, header, payload))
    decoded_before = len(decodes(decode_log))
    peer = Peer(f"ipc://{endpoint}")
    try:
        peer.send(frame)
        assert peer.sock.poll(10_000), "no reply from the replica within 10 s"
        reply = wire.decode(peer.sock.recv_multipart())
    finally:
        peer.close()
    decoded = decodes(decode_log)[decoded_before:]
    figures = f"reply={reply.kind.name} marker={marker.exists()} deserialiser calls on the payload={decoded}"
    print(figures)
    assert reply.kind == Kind.REJECTED and not marker.exists() and decoded == [], figures
    assert hello.remote().result(timeout_s=10) == "hello"


def test_a_frame_flood_without_the_key_is_absorbed(serve_instance: Any, hello: Any) -> None:
    """T28 (flood, shrunk): 50,000 tiny unsigned frames from one peer are all counted and
    dropped; control calls and handle calls keep working during the flood."""
    count = 50_000
    rt = client.get_runtime()

    def ping_ms(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            rt.call_sync("ping")
            times.append((time.perf_counter() - start) * 1000)
        return sorted(times)

    baseline = ping_ms(50)
    before = rejected_frames()
    flooder = Peer(rundir.control_endpoint(serve_instance.run_dir))
    try:
        started = time.perf_counter()
        sender = threading.Thread(target=lambda: [flooder.send(b"\x16" * 20) for _ in range(count)], daemon=True)
        sender.start()
        during: list[float] = []
        while sender.is_alive() or rejected_frames() < before + count:
            during += ping_ms(5)
            assert time.perf_counter() - started < 30, "the flood was not absorbed within 30 s"
        absorbed_s = time.perf_counter() - started
        sender.join(5)
    finally:
        flooder.close()
    during.sort()
    rejected = rejected_frames() - before
    served = hello.remote().result(timeout_s=10)

    def p(ts: list[float], q: float) -> float:
        return ts[min(len(ts) - 1, int(q * len(ts)))]

    figures = (
        f"flood frames={count} rejected={rejected} absorbed in {absorbed_s:.2f}s "
        f"({count / absorbed_s:,.0f} frames/s); control ping ms p50/p99 before={p(baseline, .5):.2f}/"
        f"{p(baseline, .99):.2f} during={p(during, .5):.2f}/{p(during, .99):.2f} (n={len(during)}); "
        f"handle call after={served!r}"
    )
    print(figures)
    assert rejected == count and served == "hello", figures


# -- exposure --------------------------------------------------------------------------------------


def test_the_key_is_private_and_never_in_argv_or_environ(serve_instance: Any, hello: Any) -> None:
    """T29 (part): run dir 0700, key file 0600, both ours; the key (raw, hex or base64) is in
    no shoal process's command line or environment (supervisor, proxy, replicas, driver)."""
    run_dir = serve_instance.run_dir
    key = instance_key(run_dir)
    key_path = run_dir / transport.KEY_FILE
    dir_st, key_st = os.lstat(run_dir), os.lstat(key_path)
    procs = [psutil.Process(), *shoal_processes(serve_instance.supervisor)]
    forms = [key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)]
    leaks = []
    for proc in procs:
        for name in ("cmdline", "environ"):
            data = Path(f"/proc/{proc.pid}/{name}").read_bytes()
            leaks += [f"{proc.pid}/{name}" for form in forms if form in data]
    names = sorted({p.name() for p in procs})
    figures = (
        f"run dir mode={stat.S_IMODE(dir_st.st_mode):o} key mode={stat.S_IMODE(key_st.st_mode):o} "
        f"owners={dir_st.st_uid},{key_st.st_uid} processes checked={len(procs)} {names} leaks={leaks}"
    )
    print(figures)
    assert stat.S_IMODE(dir_st.st_mode) == 0o700 and stat.S_IMODE(key_st.st_mode) == 0o600, figures
    assert dir_st.st_uid == key_st.st_uid == os.getuid(), figures
    assert "shoal-replica" in names and "shoal-proxy" in names, figures
    assert leaks == [], figures


def test_only_the_http_port_listens_and_only_on_loopback(serve_instance: Any, hello: Any) -> None:
    """T29 (part): the only TCP sockets any shoal process listens on are the HTTP port and the
    metrics port, on 127.0.0.1; every Unix socket is a named one inside the run directory (none
    abstract)."""
    url, metrics_url = serve.get_http_url(), serve.get_metrics_url()
    assert url is not None and metrics_url is not None
    port = int(url.rsplit(":", 1)[1])
    metrics_port = int(metrics_url.removesuffix("/metrics").rsplit(":", 1)[1])
    listening, unix_paths = set(), set()
    for proc in shoal_processes(serve_instance.supervisor):
        listening |= {(c.laddr.ip, c.laddr.port) for c in connections(proc, "inet") if c.status == psutil.CONN_LISTEN}
        unix_paths |= {c.laddr for c in connections(proc, "unix") if c.laddr}
    outside = sorted(p for p in unix_paths if p.startswith(("\0", "@")) or not p.startswith(str(serve_instance.run_dir)))
    figures = f"listening TCP={sorted(listening)} unix sockets={len(unix_paths)} outside the run dir or abstract={outside}"
    print(figures)
    assert listening == {("127.0.0.1", port), ("127.0.0.1", metrics_port)}, figures
    assert outside == [], figures


def _refusal(run_dir: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [python(), "-m", "shoal.controller", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=30,
    )
    return proc.returncode, proc.stderr.strip()


def test_an_unsafe_run_dir_is_refused(tmp_path: Path) -> None:
    """T29 (part): a supervisor refuses a run directory that is mode 777, a symlink, or
    (as root) owned by another user, with a message naming the problem, and creates nothing."""
    cases: dict[str, tuple[Path, str]] = {}
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    cases["mode 777"] = (loose, "has mode 777; it must be 700")
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    cases["symlink"] = (link, "is a symlink")
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        cases["owned by uid 65534"] = (foreign, "belongs to uid 65534")
    results = {name: _refusal(path) for name, (path, _) in cases.items()}
    print(f"refusals: {results}")
    for name, (path, message) in cases.items():
        code, stderr = results[name]
        assert code == 2 and message in stderr, (name, code, stderr)
        assert list(Path(os.path.realpath(path)).iterdir()) == [], (name, "created files in a refused dir")


# -- another local user --------------------------------------------------------------------------

_FOREIGN_PROBE = r"""
import json, os, socket, sys
run_dir = sys.argv[1]
control = os.path.join(run_dir, "control.sock")
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "ok"
    except OSError as exc:
        results[name] = os.strerror(exc.errno)
def connect_and_send():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(control)
    s.sendall(b"\xff" + bytes(8) + b"\x7f")
def bind_in_dir():
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(os.path.join(run_dir, "evil.sock"))
attempt("list the run dir", lambda: os.listdir(run_dir))
attempt("stat the control socket", lambda: os.stat(control))
attempt("read the key", lambda: open(os.path.join(run_dir, "instance.key"), "rb").read())
attempt("connect to the control socket", connect_and_send)
attempt("unlink the control socket (to re-bind it)", lambda: os.unlink(control))
attempt("bind a socket in the run dir", bind_in_dir)
print(json.dumps(results))
"""


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A local user made for this test and deleted after it (root only)."""
    if os.getuid() != 0:
        pytest.skip("T27 needs root to create a throwaway user")
    if not (shutil.which("useradd") and shutil.which("userdel") and os.path.exists("/usr/bin/python3")):
        pytest.skip("T27 needs useradd, userdel and /usr/bin/python3")
    name = f"shoalt27{secrets.token_hex(3)}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
                          capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


def test_another_local_user_cannot_reach_the_instance(throwaway_user: str, tmp_path: Path) -> None:
    """T27: an instance whose run dir sits in a world-searchable directory (/tmp); another
    local user cannot list it, stat or connect to its sockets, read the key, take over the
    control endpoint or bind beside it. The instance sees no frame and keeps answering."""
    run_dir = Path(tempfile.mkdtemp(prefix="shoal-t27-"))  # 0700, in /tmp (mode 1777)
    instance = launch.start_supervisor(run_dir, private=True, http_options=None)
    try:
        key = instance_key(run_dir)
        pw = pwd.getpwnam(throwaway_user)
        probe = subprocess.run(
            ["/usr/bin/python3", "-c", _FOREIGN_PROBE, str(run_dir)],
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
            capture_output=True, text=True, timeout=30,
        )
        results = json.loads(probe.stdout) if probe.returncode == 0 else {"probe failed": probe.stderr}
        peer = Peer(rundir.control_endpoint(run_dir))
        try:
            status = peer.call(key, "status", 1)
        finally:
            peer.close()
        figures = f"as uid {pw.pw_uid}: {results}; rejected frames={status.meta['rejected_frames']} answering={status.meta['ok']}"
        print(figures)
        assert results and all(r == "Permission denied" for r in results.values()), figures
        assert status.meta["ok"] and status.meta["rejected_frames"] == 0, figures
        assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".sock") == ["control.sock"], figures
    finally:
        instance.wait_stopped(timeout_s=20)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not [p for p in live_children() if p.pid == instance.pid]

