"""--credentials: an OSCORE-protected GET works, and a client with the wrong key gets nothing."""

from __future__ import annotations

import json
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from support.client import Client
from support.identities import write_context


@pytest.fixture
def credentials(tmp_path: Path):
    secret = "correct horse battery staple 2026"
    write_context(tmp_path / "server-ctx", "srv", "cli", secret)
    write_context(tmp_path / "client-ctx", "cli", "srv", secret)
    write_context(tmp_path / "wrong-ctx", "cli", "srv", "some other secret")
    server_creds = tmp_path / "server.json"
    server_map = {":cli": {"oscore": {"basedir": f"{tmp_path}/server-ctx/"}}}
    server_creds.write_text(json.dumps(server_map))

    def client_creds(name: str, port: int) -> Path:
        path = tmp_path / f"{name}.json"
        uri = f"coap://127.0.0.1:{port}/*"
        path.write_text(json.dumps({uri: {"oscore": {"basedir": f"{tmp_path}/{name}/"}}}))
        return path

    return server_creds, client_creds


def test_oscore_protected_get(start_server, tmp_path, credentials):
    server_creds, client_creds = credentials
    root = tmp_path / "root"
    root.mkdir()
    (root / "doc.txt").write_text("protected content")
    server = start_server(root, "--credentials", str(server_creds))

    good = Client(client_creds("client-ctx", server.port))
    try:
        r = good.request(aiocoap.Message(code=aiocoap.GET, uri=server.uri("doc.txt")))
        assert r.code == codes.CONTENT and r.payload == b"protected content"
        # The answer came through the OSCORE security context, not in the clear.
        assert "oscore" in type(r.remote).__module__, r.remote
    finally:
        good.close()

    wrong = Client(client_creds("wrong-ctx", server.port))
    try:
        try:
            r = wrong.request(aiocoap.Message(code=aiocoap.GET, uri=server.uri("doc.txt")))
        except aiocoap.error.Error:
            r = None
        assert r is None or r.code != codes.CONTENT, r
    finally:
        wrong.close()
