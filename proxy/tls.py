"""The proxy's TLS context, built from ``http_options`` (Ray Serve's ``ssl_*`` fields).

``server_context(options)`` returns None when ``ssl_keyfile`` and ``ssl_certfile`` are unset
(plain HTTP), else an ``ssl.SSLContext`` for a TLS server holding that certificate chain and
key (decrypted with ``ssl_keyfile_password`` if the key is encrypted). With ``ssl_ca_certs``
the proxy verifies client certificates, as Ray documents that field ("Path to the CA
certificate file for verifying client certificates"): a client must present a certificate
signed by one of those CAs, or the handshake fails.

The supervisor calls it before it starts the proxy, so that a missing file, an unreadable key
or a wrong password is an error at start naming the option (``ValueError``), not a proxy that
fails at every restart; the proxy calls it again to serve.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any

_PREFIX = "http_options"


def is_https(options: Mapping[str, Any] | None) -> bool:
    """True when ``options`` ask for HTTPS (both a key and a certificate are set)."""
    return bool(options and options.get("ssl_keyfile") and options.get("ssl_certfile"))


def server_context(options: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The TLS server context ``options`` describe, or None for plain HTTP.

    ValueError, naming the option, if a file is missing or unreadable, the key does not match
    the certificate or cannot be decrypted with ``ssl_keyfile_password``, or an option that only
    means something with HTTPS (``ssl_keyfile_password``, ``ssl_ca_certs``) is set without
    ``ssl_keyfile`` and ``ssl_certfile``.
    """
    keyfile = options.get("ssl_keyfile")
    certfile = options.get("ssl_certfile")
    password = options.get("ssl_keyfile_password")
    ca_certs = options.get("ssl_ca_certs")
    if bool(keyfile) != bool(certfile):
        raise ValueError("Both ssl_keyfile and ssl_certfile must be provided together to enable HTTPS.")
    if not keyfile or not certfile:
        for name in ("ssl_keyfile_password", "ssl_ca_certs"):
            if options.get(name):
                raise ValueError(
                    f"{_PREFIX}.{name} is set but HTTPS is not enabled: it needs ssl_keyfile and ssl_certfile."
                )
        return None
    for name, path in (("ssl_certfile", certfile), ("ssl_keyfile", keyfile), ("ssl_ca_certs", ca_certs)):
        if path is not None:
            _check_readable(name, str(path))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile), (lambda: str(password)) if password else None)
    except ssl.SSLError as exc:
        if password:
            hint = "the key does not match the certificate, or ssl_keyfile_password does not decrypt the key"
        else:
            hint = "the key does not match the certificate, or the key is encrypted and ssl_keyfile_password is unset"
        raise ValueError(
            f"{_PREFIX}.ssl_keyfile / ssl_certfile: cannot load the certificate '{certfile}' with the key "
            f"'{keyfile}' ({hint}): {exc.reason or exc}"
        ) from None
    except (OSError, TypeError) as exc:  # a wrong password may also surface as a decode error
        raise ValueError(
            f"{_PREFIX}.ssl_keyfile_password: cannot decrypt the key '{keyfile}': {exc}"
        ) from None
    if ca_certs:
        try:
            ctx.load_verify_locations(cafile=str(ca_certs))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"{_PREFIX}.ssl_ca_certs: cannot load CA certificates from '{ca_certs}': {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _check_readable(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{_PREFIX}.{name}: no such file: '{path}'")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{_PREFIX}.{name}: the file '{path}' is not readable")
