"""CoAP over TLS (--tls-server-certificate, --tls-server-key), as in aiocoap-fileserver: the TLS
transport listens one port above the CoAP port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiocoap
import aiocoap.credentials
import pytest
from aiocoap.numbers import codes

from support.tools import require


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require("openssl", "apt-get install openssl; it makes the test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-nodes",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_get_over_tls(client, start_server, tmp_path, certificate):
    cert, key = certificate
    root = tmp_path / "root"
    root.mkdir()
    (root / "over-tls.txt").write_text("sent over TLS")
    server = start_server(root, "--tls-server-certificate", str(cert), "--tls-server-key", str(key))
    uri = f"coaps+tcp://127.0.0.1:{server.port + 1}/over-tls.txt"
    client.context.client_credentials[f"coaps+tcp://127.0.0.1:{server.port + 1}/*"] = (
        aiocoap.credentials.TLSCert(certfile=str(cert))
    )
    r = client.request(aiocoap.Message(code=aiocoap.GET, uri=uri))
    assert r.code == codes.CONTENT and r.payload == b"sent over TLS"
    assert r.remote.scheme == "coaps+tcp"
