"""The wire guards (coapfs/transport) of the real server, spoken to over loopback with
hand-made datagrams. With `[amplification] trusted = []` loopback counts as an unverified
address, so the amplification limit applies here without a network namespace (the namespace
test, tests/test_amplification.py, measures it from a public-looking address)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.raw import DELETE, GET, RawServer, path
from support.rawpeer import RawPeer

FACTOR = 3.0
NON = 1


def untrusted_server(tmp_path: Path, extra: str = "") -> RawServer:
    config = tmp_path / "untrusted.toml"
    config.write_text(f"[amplification]\ntrusted = []\n{extra}\n")
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
