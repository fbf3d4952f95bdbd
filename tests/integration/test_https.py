"""HTTPS from the proxy: ``http_options.ssl_keyfile / ssl_certfile / ssl_keyfile_password /
ssl_ca_certs``.

Certificates are generated at test time with the ``openssl`` command; the clients are httpx with
an SSL context that trusts only the generated certificate (and, for client verification, holds
a client certificate signed by a generated CA). Real supervisor, proxy and replica processes.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import live_children, wait_until

from shoal import serve
from shoal.runtime.errors import RayServeException

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
_SAN = ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed server certificate (plain and encrypted key), two CAs and a client
    certificate signed by each."""
    d = tmp_path_factory.mktemp("certs")
    p = {name: d / name for name in (
        "key.pem", "cert.pem", "enc_key.pem", "enc_cert.pem", "ca_key.pem", "ca.pem",
        "client_key.pem", "client.csr", "client.pem", "other_ca_key.pem", "other_ca.pem",
        "other_client_key.pem", "other_client.csr", "other_client.pem",
    )}
    _openssl("req", "-x509", *_EC, "-nodes", "-keyout", str(p["key.pem"]), "-out", str(p["cert.pem"]),
             "-days", "1", "-subj", "/CN=localhost", *_SAN)
    _openssl("req", "-x509", *_EC, "-keyout", str(p["enc_key.pem"]), "-out", str(p["enc_cert.pem"]),
             "-days", "1", "-subj", "/CN=localhost", *_SAN, "-passout", "pass:s3cret")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", *_EC, "-nodes", "-keyout", str(p[f"{ca}_key.pem"]), "-out", str(p[f"{ca}.pem"]),
                 "-days", "1", "-subj", f"/CN=shoal test {ca}")
    _openssl("req", "-new", *_EC, "-nodes", "-keyout", str(p["client_key.pem"]), "-out", str(p["client.csr"]),
             "-subj", "/CN=client")
    for client, ca in (("client", "ca"), ("other_client", "other_ca")):
        if client != "client":
            _openssl("req", "-new", *_EC, "-nodes", "-keyout", str(p[f"{client}_key.pem"]),
                     "-out", str(p[f"{client}.csr"]), "-subj", f"/CN={client}")
        _openssl("x509", "-req", "-in", str(p[f"{client}.csr"]), "-CA", str(p[f"{ca}.pem"]),
                 "-CAkey", str(p[f"{ca}_key.pem"]), "-CAcreateserial", "-out", str(p[f"{client}.pem"]), "-days", "1")
    return p


@serve.deployment
class Hello:
    async def __call__(self, request: Any) -> dict[str, Any]:
        return {"scheme": request.url.scheme, "path": request.url.path}


def _trusting(cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


@pytest.fixture
def https_instance(certs: dict[str, Path]) -> Iterator[Any]:
    """``start(**ssl_options)``: a private instance serving HTTPS on a free port, with ``Hello``
    at ``/``; shut down after the test."""
    started: list[bool] = []

    def start(**ssl_options: Any) -> str:
        serve.start(http_options={"port": 0, **ssl_options})
        started.append(True)
        serve.run(Hello.bind(), name="hello", route_prefix="/")
        url = serve.get_http_url()
        assert url is not None
        return url

    assert not live_children(), "a previous test left processes behind"
    yield start
    if started:
        serve.shutdown()
    wait_until(lambda: not live_children(), 15, "no processes left after the HTTPS test")


def test_https_serves_over_tls_and_refuses_plain_http(https_instance: Any, certs: dict[str, Path]) -> None:
    url = https_instance(ssl_keyfile=str(certs["key.pem"]), ssl_certfile=str(certs["cert.pem"]))
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=_trusting(certs["cert.pem"]), timeout=30) as client:
        r = client.get(url + "/some/path")
        assert r.status_code == 200
        assert r.json() == {"scheme": "https", "path": "/some/path"}
        # The proxy's header limits hold over TLS too.
        too_many = {f"x-h{i}": "v" for i in range(150)}
        assert client.get(url + "/", headers=too_many).status_code == 431
    # A client that does not trust the certificate refuses the connection.
    with httpx.Client(timeout=30) as untrusting, pytest.raises(httpx.ConnectError):
        untrusting.get(url + "/")
    # Plain HTTP to the TLS port gets no HTTP answer.
    plain = url.replace("https://", "http://", 1)
    with httpx.Client(timeout=30) as client, pytest.raises(httpx.TransportError):
        client.get(plain + "/")


def test_ssl_ca_certs_requires_a_client_certificate_from_that_ca_with_an_encrypted_key(
    https_instance: Any, certs: dict[str, Path]
) -> None:
    """... served here with an encrypted key and its ssl_keyfile_password."""
    url = https_instance(
        ssl_keyfile=str(certs["enc_key.pem"]), ssl_certfile=str(certs["enc_cert.pem"]), ssl_keyfile_password="s3cret",
        ssl_ca_certs=str(certs["ca.pem"]),
    )
    good = _trusting(certs["enc_cert.pem"], (certs["client.pem"], certs["client_key.pem"]))
    with httpx.Client(verify=good, timeout=30) as client:
        assert client.get(url + "/x").json() == {"scheme": "https", "path": "/x"}
    # Without a client certificate the handshake fails (TLS 1.3 reports it on the first read).
    with httpx.Client(verify=_trusting(certs["enc_cert.pem"]), timeout=30) as client, \
            pytest.raises(httpx.TransportError):
        client.get(url + "/")
    # A certificate signed by another CA is refused as well.
    other = _trusting(certs["enc_cert.pem"], (certs["other_client.pem"], certs["other_client_key.pem"]))
    with httpx.Client(verify=other, timeout=30) as client, pytest.raises(httpx.TransportError):
        client.get(url + "/")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ssl_keyfile": "KEY", "ssl_certfile": "/nonexistent/cert.pem"}, "http_options.ssl_certfile"),
        ({"ssl_keyfile": "/nonexistent/key.pem", "ssl_certfile": "CERT"}, "http_options.ssl_keyfile"),
        ({"ssl_keyfile": "ENC_KEY", "ssl_certfile": "ENC_CERT", "ssl_keyfile_password": "wrong"},
         "ssl_keyfile_password"),
        ({"ssl_keyfile": "ENC_KEY", "ssl_certfile": "ENC_CERT"}, "ssl_keyfile_password"),
        ({"ssl_keyfile": "KEY", "ssl_certfile": "OTHER_CA"}, "http_options.ssl_keyfile / ssl_certfile"),
        ({"ssl_keyfile": "KEY", "ssl_certfile": "CERT", "ssl_ca_certs": "/nonexistent/ca.pem"},
         "http_options.ssl_ca_certs"),
        ({"ssl_ca_certs": "CA"}, "http_options.ssl_ca_certs is set but HTTPS is not enabled"),
    ],
)
def test_a_bad_tls_option_is_an_error_at_start_naming_it(
    certs: dict[str, Path], options: dict[str, str], named: str
) -> None:
    files = {"KEY": "key.pem", "CERT": "cert.pem", "ENC_KEY": "enc_key.pem", "ENC_CERT": "enc_cert.pem",
             "OTHER_CA": "other_ca.pem", "CA": "ca.pem"}
    resolved = {k: str(certs[files[v]]) if v in files else v for k, v in options.items()}
    assert not live_children()
    with pytest.raises(RayServeException, match=named.replace(".", r"\.")):
        serve.start(http_options={"port": 0, **resolved})
    wait_until(lambda: not live_children(), 15, "the supervisor exited after refusing the options")


def test_shoal_run_prints_and_serves_an_https_url(
    tmp_path: Path, certs: dict[str, Path], private_run_dir: Path
) -> None:
    """``shoal run`` with a config file whose http_options set a certificate prints an
    ``https://`` URL, which serves."""
    (tmp_path / "tls_app.py").write_text(
        "from shoal import serve\n\n"
        "@serve.deployment\n"
        "def hello() -> str:\n"
        "    return 'hello over tls'\n\n"
        "app = hello.bind()\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        "http_options:\n"
        "  port: 0\n"
        f"  ssl_keyfile: {certs['key.pem']}\n"
        f"  ssl_certfile: {certs['cert.pem']}\n"
        "applications:\n"
        "  - name: tls\n"
        "    route_prefix: /\n"
        "    import_path: tls_app:app\n"
    )
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    env.pop("SHOAL_ADDRESS", None)
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("shoal")), "run", str(config)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert cli.stdout is not None
        for line in cli.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=60)
            assert line is not None, f"shoal run exited:\n{''.join(seen)}"
            seen.append(line)
            found = re.search(r"serving .* on (\S+) ", line)
            if found:
                url = found.group(1)
                break
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=_trusting(certs["cert.pem"]), timeout=30) as client:
            assert client.get(url + "/").text == "hello over tls"
    finally:
        cli.send_signal(signal.SIGINT)
        try:
            cli.wait(60)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait(10)
        reader.join(10)
        assert cli.stdout is not None
        cli.stdout.close()


def test_shoal_start_ssl_flags(tmp_path: Path, certs: dict[str, Path], private_run_dir: Path) -> None:
    """``shoal start --ssl-keyfile --ssl-certfile`` serves HTTPS and says so; a missing file is
    a one-line error naming the option, and nothing is left running."""
    shoal = str(Path(sys.executable).with_name("shoal"))
    env = {**os.environ, "SHOAL_RUN_DIR": str(private_run_dir)}
    env.pop("SHOAL_ADDRESS", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shoal, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    bad = cli("start", "--http-port", "0", "--ssl-keyfile", str(certs["key.pem"]), "--ssl-certfile", "/nope.pem")
    assert bad.returncode == 1
    assert "shoal: http_options.ssl_certfile: no such file: '/nope.pem'" in bad.stderr
    started = cli("start", "--http-port", "0", "--ssl-keyfile", str(certs["key.pem"]),
                  "--ssl-certfile", str(certs["cert.pem"]))
    try:
        assert started.returncode == 0, started.stderr
        found = re.search(r"HTTP: (https://\S+)", started.stdout)
        assert found, started.stdout
        with httpx.Client(verify=_trusting(certs["cert.pem"]), timeout=30) as client:
            assert client.get(found.group(1) + "/-/healthz").status_code == 200
    finally:
        stopped = cli("shutdown", "--yes")
        assert stopped.returncode == 0, stopped.stderr
