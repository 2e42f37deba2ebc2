"""A certificate authority and a server certificate, made fresh for each test
run with ``openssl`` (loaded as a plugin by tests/conftest.py).

Fixtures:

``tls_files``
    (session) A :class:`TLSFiles`: a CA, and a certificate for ``127.0.0.1``
    and ``localhost`` that it signed, in a temporary directory.
``other_ca``
    (session) The certificate of another CA, which did not sign the server's:
    for the "wrong CA" tests.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

__all__ = ["TLSFiles", "make_ca", "make_server_cert"]

_DAYS = "2"


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    ca: str
    cert: str
    key: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def redis_options(self) -> dict[str, str]:
        """``EVENTSTREAM_REDIS_OPTIONS`` for a client that trusts the CA."""
        return {"ssl_ca_certs": self.ca}


def _openssl(openssl: str, *args: str, cwd: str) -> None:
    done = subprocess.run(
        [openssl, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace")
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{error}")


def _new_key(path: str) -> list[str]:
    """``openssl req`` arguments for a new P-256 key, unencrypted, at ``path``."""
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", path]  # fmt: skip


def make_ca(openssl: str, directory: str, name: str = "ca") -> tuple[str, str]:
    """A self-signed CA: (certificate path, key path)."""
    cert, key = f"{name}.pem", f"{name}.key"
    _openssl(
        openssl, "req", "-x509", *_new_key(key),
        "-out", cert, "-days", _DAYS,
        "-subj", f"/CN=flask-eventstream tests {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return os.path.join(directory, cert), os.path.join(directory, key)


def make_server_cert(
    openssl: str, directory: str, ca_cert: str, ca_key: str, name: str = "server"
) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost signed by the CA:
    (certificate path, key path)."""
    csr, cert, key = f"{name}.csr", f"{name}.pem", f"{name}.key"
    ext = os.path.join(directory, f"{name}.ext")
    with open(ext, "w", encoding="ascii") as f:
        f.write(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=CA:FALSE\n"
        )
    _openssl(
        openssl, "req", *_new_key(key), "-out", csr,
        "-subj", "/CN=127.0.0.1", cwd=directory,
    )  # fmt: skip
    _openssl(
        openssl, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
        "-CAcreateserial", "-out", cert, "-days", _DAYS, "-extfile", ext,
        cwd=directory,
    )  # fmt: skip
    return os.path.join(directory, cert), os.path.join(directory, key)


@pytest.fixture(scope="session")
def tls_files() -> Iterator[TLSFiles]:
    from tests.conftest import require_tool

    openssl = require_tool("openssl", "OpenSSL")
    with tempfile.TemporaryDirectory(prefix="eventstream-tls-") as directory:
        ca_cert, ca_key = make_ca(openssl, directory)
        cert, key = make_server_cert(openssl, directory, ca_cert, ca_key)
        yield TLSFiles(ca_cert, cert, key)


@pytest.fixture(scope="session")
def other_ca() -> Iterator[str]:
    from tests.conftest import require_tool

    openssl = require_tool("openssl", "OpenSSL")
    with tempfile.TemporaryDirectory(prefix="eventstream-tls-other-") as directory:
        cert, _ = make_ca(openssl, directory, "other-ca")
        yield cert
