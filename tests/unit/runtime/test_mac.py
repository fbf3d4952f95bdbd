"""The instance key and frame MACs: ``wire.sign``/``wire.verify``, ``rundir.create_key`` and
``transport.read_key``, a signing ``transport.Channel``. No processes; files in a private
temporary directory, sockets ``inproc://``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from inproc import run

from shoal.controller import rundir
from shoal.runtime import client, transport, wire
from shoal.runtime.errors import ShoalConnectionError
from shoal.runtime.wire import Kind, Message, ProtocolError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _frame(meta: dict[str, object] | None = None, payload: bytes = b"") -> bytes:
    [frame] = wire.encode(Message(Kind.CALL, 0, 7, meta or {"op": "status"}, (payload,) if payload else ()))
    return frame


def test_a_signed_frame_is_the_frame_and_a_truncated_hmac_sha256() -> None:
    frame = _frame()
    signed = wire.sign(frame, KEY)
    assert signed == frame + hmac.new(KEY, frame, hashlib.sha256).digest()[:16]
    assert len(signed) == len(frame) + wire.MAC_BYTES == len(frame) + 16
    assert wire.verify(signed, KEY) == frame
    assert wire.decode([wire.verify(signed, KEY)]) == Message(Kind.CALL, 0, 7, {"op": "status"})


def test_golden_signed_frame() -> None:
    """A change here is a wire contract change: bump PROTOCOL_VERSION with it."""
    header_and_meta = bytes.fromhex("16" "00000000" "0000000000000007" "0000000b" "81a26f70a6737461747573")
    assert _frame() == header_and_meta
    assert wire.sign(_frame(), KEY) == header_and_meta + bytes.fromhex("c4d5a1419c4b2b1ed44c7e7f890bc21b")


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda f: f, id="unsigned"),
        pytest.param(lambda f: wire.sign(f, OTHER_KEY), id="another key"),
        pytest.param(lambda f: wire.sign(f, KEY)[:-1], id="MAC cut short"),
        pytest.param(lambda f: wire.sign(f, KEY)[: wire.MAC_BYTES], id="header cut short"),
        pytest.param(lambda f: b"", id="empty"),
        pytest.param(lambda f: wire.sign(f, KEY) + b"\x00", id="a byte appended"),
        pytest.param(lambda f: f[:-1] + wire.sign(f, KEY)[-wire.MAC_BYTES:], id="MAC of another frame"),
    ],
)
def test_verify_refuses_frames_not_signed_with_the_key(forge: Callable[[bytes], bytes]) -> None:
    frame = _frame({"op": "deploy"}, b"payload")
    with pytest.raises(ProtocolError):
        wire.verify(forge(frame), KEY)


@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_changed_byte_fails_verification(payload: bytes, data: st.DataObject) -> None:
    signed = bytearray(wire.sign(_frame(payload=payload), KEY))
    index = data.draw(st.integers(0, len(signed) - 1))
    signed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        wire.verify(bytes(signed), KEY)


def test_a_replayed_frame_cannot_be_moved_to_another_incarnation() -> None:
    """The MAC covers the fixed header: rewriting a READY's incarnation breaks it."""
    [frame] = wire.encode(Message(Kind.READY, 3, 0, {"replica_id": "app#d#1", "pid": 1, "protocol": 2}))
    signed = wire.sign(frame, KEY)
    moved = signed[:1] + (4).to_bytes(4, "big") + signed[5:]
    with pytest.raises(ProtocolError):
        wire.verify(moved, KEY)


def test_verify_decodes_nothing() -> None:
    """A frame whose meta is not msgpack still verifies: decoding comes after, and fails there."""
    garbage = wire._HEADER.pack(Kind.CALL, 0, 1, 3) + b"\xc1\xc1\xc1"
    body = wire.verify(wire.sign(garbage, KEY), KEY)
    assert body == garbage
    with pytest.raises(ProtocolError):
        wire.decode([body])


# -- the key file --------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def test_create_key_writes_a_private_file_that_read_key_reads(run_dir: Path) -> None:
    key = rundir.create_key(run_dir)
    path = run_dir / transport.KEY_FILE
    assert len(key) == wire.KEY_BYTES and key != rundir.create_key(run_dir.parent)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert transport.read_key(rundir.control_endpoint(run_dir)) == key


def test_create_key_never_reuses_or_follows_an_existing_path(run_dir: Path, tmp_path: Path) -> None:
    rundir.create_key(run_dir)
    with pytest.raises(FileExistsError):
        rundir.create_key(run_dir)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    target = tmp_path / "planted"
    (other / transport.KEY_FILE).symlink_to(target)
    with pytest.raises(FileExistsError):
        rundir.create_key(other)
    assert not target.exists()


def test_remove_sockets_removes_the_key(run_dir: Path) -> None:
    rundir.create_key(run_dir)
    rundir.remove_sockets(run_dir)
    assert not (run_dir / transport.KEY_FILE).exists()


def test_read_key_refuses_a_missing_key(run_dir: Path) -> None:
    with pytest.raises(ShoalConnectionError, match="is the supervisor running"):
        transport.read_key(rundir.control_endpoint(run_dir))


def test_read_key_refuses_a_key_others_can_read(run_dir: Path) -> None:
    rundir.create_key(run_dir)
    os.chmod(run_dir / transport.KEY_FILE, 0o644)
    with pytest.raises(ShoalConnectionError, match="mode 600"):
        transport.read_key(rundir.control_endpoint(run_dir))


def test_read_key_refuses_a_symlink(run_dir: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    real.write_bytes(KEY)
    real.chmod(0o600)
    (run_dir / transport.KEY_FILE).symlink_to(real)
    with pytest.raises(ShoalConnectionError):
        transport.read_key(rundir.control_endpoint(run_dir))


@pytest.mark.parametrize("size", [0, 31, 33])
def test_read_key_refuses_a_file_that_holds_no_key(run_dir: Path, size: int) -> None:
    path = run_dir / transport.KEY_FILE
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(ShoalConnectionError, match=f"holds {size} bytes"):
        transport.read_key(rundir.control_endpoint(run_dir))


def test_a_runtime_reads_the_key_again_when_a_new_supervisor_replaced_it(run_dir: Path) -> None:
    first = rundir.create_key(run_dir)
    loop = asyncio.new_event_loop()
    try:
        rt = client.Runtime(loop, rundir.control_endpoint(run_dir))
        assert rt._current_key() == first
        rundir.remove_sockets(run_dir)  # what a supervisor started again on the run dir does
        second = rundir.create_key(run_dir)
        assert rt._current_key() == second != first
        rundir.remove_sockets(run_dir)  # no supervisor now: the last key stays
        assert rt._current_key() == second
    finally:
        loop.close()


def test_a_channel_with_a_key_signs_what_it_sends() -> None:
    async def main() -> None:
        got: asyncio.Queue[list[bytes]] = asyncio.Queue()
        server_sock = transport.make_socket(zmq.ROUTER)
        server_sock.bind("inproc://mac-signed")
        server = transport.Channel(server_sock, got.put_nowait)
        client_sock = transport.make_socket(zmq.DEALER)
        client_sock.connect("inproc://mac-signed")
        signing = transport.Channel(client_sock, lambda frames: None, key=KEY)
        msg = Message(Kind.CALL, 0, 3, {"op": "ping"})
        signing.send_message(msg)
        signing.key = None  # unsigned from now on
        signing.send_message(msg)
        _, signed = await got.get()
        _, plain = await got.get()
        assert wire.decode([wire.verify(signed, KEY)]) == msg
        assert plain == wire.encode(msg)[0]
        signing.close()
        server.close()

    run(main)
