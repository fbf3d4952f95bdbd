"""Client data is never unpickled; errors and request ids are hygienic (plan T30).

Real proxy and replica processes; the client is httpx or a raw socket (for header bytes that
httpx refuses to send). Pickle payloads count their own deserialisation: loading one anywhere
creates a marker directory. Each test prints what it measured (run with ``-s``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cloudpickle
import httpx
import msgpack
import pytest
from starlette.requests import Request

from shoal import serve

pytestmark = pytest.mark.timeout(60)


class Marker:
    """Unpickling this creates ``path``: a deserialisation counter that works in any process."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


@serve.deployment
class Inspect:
    """Says what it received; ``/boom`` raises with internal details in the message, ``/json``
    parses the body as JSON."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        if request.url.path.endswith("/boom"):
            raise ValueError(f"internal detail: {__file__}")
        if request.url.path.endswith("/json"):
            value = json.loads(body)
            return {"parsed": type(value).__name__}
        return {"type": type(body).__name__, "len": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.fixture(scope="module")
def url(serve_instance: Any) -> Iterator[str]:
    serve.run(Inspect.bind(), name="inspect", route_prefix="/t30")
    base = serve.get_http_url()
    assert base is not None
    yield base
    serve.delete("inspect")


def _leaks(text: str) -> list[str]:
    return [s for s in ("Traceback", 'File "', "internal detail", __file__, "/site-packages/") if s in text]


def test_pickled_bodies_reach_the_handler_as_bytes_and_are_never_loaded(url: str, tmp_path: Path) -> None:
    """Pickles (every protocol, cloudpickle, a msgpack ext wrapping one) posted with binary and
    pickle content types reach the handler as the same bytes; none is ever loaded."""
    markers = tmp_path / "markers"
    markers.mkdir()
    bodies = {f"pickle protocol {p}": pickle.dumps(Marker(markers / f"p{p}"), protocol=p) for p in range(6)}
    bodies["cloudpickle"] = cloudpickle.dumps(Marker(markers / "cloudpickle"))
    bodies["msgpack ext 1 holding a pickle"] = msgpack.packb(msgpack.ExtType(1, pickle.dumps(Marker(markers / "ext"))))
    results = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, body in bodies.items():
            for content_type in ("application/octet-stream", "application/python-pickle"):
                r = http.post("/t30", content=body, headers={"content-type": content_type})
                results[(name, content_type)] = (r.status_code, r.json())
    made = sorted(p.name for p in markers.iterdir())
    wrong = {k: v for k, v in results.items() if v[0] != 200 or v[1]["type"] != "bytes"}
    mismatched = [k for k, v in results.items() if v[1].get("sha256") != hashlib.sha256(bodies[k[0]]).hexdigest()]
    figures = f"pickle bodies sent={len(results)} markers created={made} not bytes={wrong} changed={mismatched}"
    print(figures)
    assert made == [] and not wrong and not mismatched, figures


def _raw_request(url: str, head: bytes) -> tuple[int, list[bytes], bytes]:
    """Send ``head`` (a request without body) on a fresh connection; the status, the raw header
    lines and the body of the response (read until the server closes)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.split(b"\r\n")
    return int(status_line.split()[1]), lines, body


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param(b"abc\rx-injected: 1", id="bare CR"),
        pytest.param(b"abc\x1b[31mred\x1b[0m", id="ANSI escape"),
        pytest.param(b"r" * 10_240, id="10 KiB"),
        pytest.param(b"abc\x00def", id="NUL"),
    ],
)
def test_request_ids_are_never_echoed_raw_into_a_response_header(url: str, request_id: bytes) -> None:
    """An ``x-request-id`` with CR, an ANSI escape, NUL or 10 KiB: no response header carries
    a CR or LF or an injected header, an echoed id is at most 128 bytes, no traceback."""
    head = b"GET /t30 HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-request-id: " + request_id + b"\r\n\r\n"
    status, lines, body = _raw_request(url, head)
    echoed = [line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"x-request-id:")]
    injected = [line for line in lines if line.lower().startswith(b"x-injected")]
    broken = [line for line in lines if b"\r" in line or b"\n" in line]
    controls = [e for e in echoed if any(c < 0x20 or c == 0x7F for c in e)]
    figures = (
        f"status={status} echoed ids={[e[:40] for e in echoed]} (length {[len(e) for e in echoed]}) "
        f"injected headers={injected} header lines with CR/LF={broken} control chars echoed={len(controls)} "
        f"traceback leaks={_leaks(body.decode('latin-1'))}"
    )
    print(figures)
    assert not injected and not broken, figures
    assert all(len(e) <= 128 for e in echoed), figures
    assert not _leaks(body.decode("latin-1")), figures


def test_errors_and_hostile_input_leak_no_traceback(url: str) -> None:
    """A handler that raises, JSON nested 100,000 deep, and an ANSI escape in the path: the
    responses carry no traceback or internal path, and the app keeps serving."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with httpx.Client(base_url=url, timeout=30) as http:
        responses = {
            "handler raises": http.post("/t30/boom", content=b"x"),
            "JSON 100,000 deep": http.post("/t30/json", content=deep, headers={"content-type": "application/json"}),
            "path with %1b[": http.get("/t30/%1b[31m"),
            "unknown route with %1b[": http.get("/%1b[31mnowhere"),
        }
        after = http.post("/t30", content=b"still here")
    leaks = {name: _leaks(r.text) for name, r in responses.items() if _leaks(r.text)}
    statuses = {name: r.status_code for name, r in responses.items()}
    figures = f"statuses={statuses} traceback leaks={leaks} served after={after.status_code}"
    print(figures)
    assert not leaks, figures
    assert statuses["handler raises"] == 500 and statuses["JSON 100,000 deep"] in (400, 413, 422, 500), figures
    assert after.status_code == 200 and after.json()["len"] == len(b"still here"), figures
