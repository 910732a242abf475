"""The wire guards (coapfs/transport) of the real server, spoken to over loopback with
hand-made datagrams. With `[amplification] trusted = []` loopback counts as an unverified
address, so the amplification limit applies here without a network namespace (the namespace
test, tests/test_amplification.py, measures it from a public-looking address)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code
from test_core_oscore import write_context

from support.client import Client
from support.raw import DELETE, GET, RawServer, path
from support.rawpeer import RawPeer

FACTOR = 3.0
NON = 1
CONTENT = Code.CONTENT
BIG = bytes(range(256)) * 12


def untrusted_server(tmp_path: Path, extra: str = "") -> RawServer:
    config = tmp_path / "untrusted.toml"
    config.write_text(f"{extra}\n[amplification]\ntrusted = []\n")  # top-level keys first
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    return RawServer(root, tmp_path / "server.log", "--write", "--config", str(config))


@pytest.fixture
def untrusted(tmp_path: Path) -> Iterator[tuple[RawServer, RawPeer]]:
    server = untrusted_server(tmp_path, "[deduplication]\nmax_entries = 5")
    try:
        yield server, RawPeer(server.sock, ("127.0.0.1", server.port))
        server.assert_clean()
    finally:
        server.close()


def test_a_path_that_is_not_utf8_from_an_unverified_address_is_4_00(untrusted) -> None:
    """Measuring such a request for the amplification limit re-encodes its options: it must
    not fail on the surrogates the path was decoded with."""
    _server, peer = untrusted
    for mtype in (NON, 0):
        exchange = peer.exchange(GET, path(b"\xff\xfe"), mtype=mtype)
        assert exchange.response is not None and exchange.response.code == "4.00"
        assert exchange.ratio <= FACTOR


def test_a_refusal_for_a_full_deduplication_store_is_within_the_factor(untrusted) -> None:
    """The 5.03 sent when the store is full bypasses the request's pipe; it is limited too."""
    _server, peer = untrusted
    refused = None
    for i in range(10):
        exchange = peer.exchange(DELETE, path(f"m{i}"), token=b"")
        assert exchange.response is not None
        if exchange.response.code == "5.03":
            refused = peer.exchange(DELETE, [], token=b"")
            break
    assert refused is not None and refused.response is not None, "the store never filled"
    assert refused.response.code == "5.03"
    assert refused.ratio <= FACTOR, refused


def test_an_oscore_peer_at_an_unverified_address_gets_its_answers_whole(tmp_path: Path) -> None:
    """aiocoap unprotects OSCORE inside the site, so the limit sees the outer exchange; the
    protected response must not be replaced by an unprotected 4.01 the client cannot use."""
    secret = "wire guards 2026"
    write_context(tmp_path / "server-ctx", "srv", "cli", secret)
    write_context(tmp_path / "client-ctx", "cli", "srv", secret)
    credentials = tmp_path / "server.json"
    credentials.write_text(json.dumps({":cli": {"oscore": {"basedir": f"{tmp_path}/server-ctx/"}}}))
    server = untrusted_server(tmp_path, f"credentials = {json.dumps(str(credentials))}")
    (server.root / "big.bin").write_bytes(BIG)
    mine = tmp_path / "client.json"
    basedir = f"{tmp_path}/client-ctx/"
    mine.write_text(
        json.dumps({f"coap://127.0.0.1:{server.port}/*": {"oscore": {"basedir": basedir}}})
    )
    client = Client(mine)
    try:
        response = client.get(f"coap://127.0.0.1:{server.port}/big.bin")
        assert response.code == CONTENT and response.payload == BIG, response
        assert "oscore" in type(response.remote).__module__
        server.assert_clean()
    finally:
        client.close()
        server.close()


def test_an_option_delta_aiocoap_cannot_encode_again_is_answered(untrusted) -> None:
    """aiocoap decodes an option delta of 65804 (extended 0xFFFF) but refuses to encode it
    (its encoder stops at 65803): measuring such a request for the limit must not fail."""
    server, peer = untrusted
    header = bytes((0x40 | (NON << 4) | 1, GET, 0x12, 0x34, 0x77))
    datagram = header + bytes((0xB5,)) + b"a.txt" + bytes((0xE0, 0xFF, 0xFF))
    peer.send(datagram)
    answer = server.receive(b"\x77", 5)
    assert answer is not None and answer.code == "4.02", answer  # 65815 is critical, unknown
    server.assert_clean()
