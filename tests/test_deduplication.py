"""Deduplication state stays bounded (issue 10): the real server with `[deduplication]
max_entries = 50`, its figures read from its STATUS= line.

Requests that must not run twice (PUT, DELETE) are remembered with their response, so that a
retransmission (same Message ID) gets the same answer without running again — up to the bound;
beyond it new ones get 5.03 with Max-Age while GETs, which are simply rendered again and never
stored, go on being answered."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import coapmsg
import pytest

from support.flood import Flood
from support.raw import CON, DELETE, GET, PUT, Response, path
from support.rawpeer import RawPeer
from support.server import Server, Servers
from support.status import current_status, figure

MAX_ENTRIES = 50
MAX_AGE = 14


@pytest.fixture
def server(start_server: Servers, tmp_path: Path) -> Iterator[tuple[Server, RawPeer, Path]]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    config = tmp_path / "dedup.toml"
    config.write_text(f"[deduplication]\nmax_entries = {MAX_ENTRIES}\n")
    server = start_server.start("--write", "--config", str(config), root=root, notify=True)
    server.notify.wait_for("READY")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    with sock:
        yield server, RawPeer(sock, ("127.0.0.1", server.port)), root


def datagram(code: int, options, payload: bytes = b"", *, mid: int, mtype: int = CON) -> bytes:
    return coapmsg.Message(mtype, code, mid, os.urandom(4), list(options), payload).encode()


def test_beyond_the_bound_new_writes_get_5_03_gets_go_on_and_duplicates_get_the_same_answer(
    server,
) -> None:
    srv, peer, root = server
    # Within the bound: a PUT, and its retransmission answered from the store, not run again.
    put = datagram(PUT, path("p.txt"), b"first", mid=1000)
    peer.send(put)
    first = peer.sock.recv(2048)
    assert Response(first).code == "2.01"
    (root / "p.txt").write_text("changed by someone else")
    peer.send(put)
    assert peer.sock.recv(2048) == first, "the retransmission was not answered identically"
    assert (root / "p.txt").read_text() == "changed by someone else", "the PUT ran twice"

    # Fill the store with unique DELETEs of missing files; GETs meanwhile are always 2.05.
    codes = []
    for i in range(MAX_ENTRIES + 20):
        codes.append(peer.exchange(DELETE, path(f"missing-{i}")).response)
        got = peer.exchange(GET, path("a.txt")).response
        assert got is not None and got.code == "2.05" and got.payload == b"hello\n"
    assert all(c is not None for c in codes)
    seen = [c.code for c in codes if c is not None]
    assert seen[: MAX_ENTRIES - 1] == ["4.04"] * (MAX_ENTRIES - 1), seen
    assert seen[-20:] == ["5.03"] * 20, seen
    refused = codes[-1]
    assert refused is not None
    assert int.from_bytes(refused.opt(MAX_AGE) or b"", "big") > 0, refused
    # A refused PUT wrote nothing; its retransmission is refused again, still writing nothing.
    late = datagram(PUT, path("late.txt"), b"x", mid=2000)
    for _ in range(2):
        peer.send(late)
        assert Response(peer.sock.recv(2048)).code == "5.03"
    assert not (root / "late.txt").exists()

    status = current_status(srv)
    assert figure(status, "deduplication entries") == MAX_ENTRIES, status
    assert figure(status, "refused") >= 22, status


def test_unique_gets_leave_nothing_stored(server) -> None:
    """3,000 unique confirmable GETs (each its own Message ID): no entry is kept for any."""
    srv, peer, _root = server
    flood = Flood(peer.sock, peer.server, window=32)
    try:
        requests = (datagram(GET, path("a.txt"), mid=i) for i in range(3000))
        flood.send(requests)
        flood.drain()
    finally:
        flood.close()
    assert flood.codes["2.05"] == 3000, flood.codes
    status = current_status(srv)
    assert figure(status, "deduplication entries") == 0, status
    # A duplicate GET is simply answered again.
    again = [datagram(GET, path("a.txt"), mid=7)] * 2
    for d in again:
        peer.send(d)
        assert Response(peer.sock.recv(2048)).code == "2.05"
