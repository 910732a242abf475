"""Requests a client can send, made by hand, against the real server: every mistake must get a
clear answer and cost nothing.

The standard: a client mistake is a 4.xx with a short diagnostic payload, never a 5.00, never a
traceback in the server log, never a partial or stray file, nothing read or written outside the
root, and the server keeps answering. Datagrams are encoded here (not by aiocoap) so that
malformed and unusual requests reach the server exactly as written.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import pytest

from coapfs.tree.hidden import SPOOL_PREFIX

from support.client import Client
from support.files import spool_files
from support.process import with_own_mount
from support.raw import (
    ACCEPT,
    BLOCK1,
    BLOCK2,
    CONTENT_FORMAT,
    DELETE,
    ETAG,
    FETCH,
    GET,
    IF_MATCH,
    IF_NONE_MATCH,
    IPATCH,
    OBSERVE,
    OSCORE,
    PATCH,
    POST,
    PROXY_SCHEME,
    PROXY_URI,
    PUT,
    SIZE1,
    URI_HOST,
    URI_PORT,
    URI_QUERY,
    Options,
    RawServer,
    Response,
    block,
    path,
    uint,
)
from support.tools import require


def answered(response: Response | None, *codes: str) -> Response:
    """Assert a response came with one of `codes`; a 4.xx or 5.xx must say why."""
    assert response is not None, "no response"
    assert response.code in codes, response
    if response.code[0] in "45":
        assert response.payload, f"{response.code} without a diagnostic"
    return response


def tree(top: Path) -> dict[str, bytes | None]:
    """Everything below `top`: file contents, None for directories."""
    return {
        str(p.relative_to(top)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(top.rglob("*"))
        if not p.is_symlink()
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RawServer, Path, Path]]:
    """A writable server on tmp_path/root, with tmp_path/outside next to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside the root")
    (root / "dir").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "big.bin").write_bytes(bytes(range(256)) * 20)
    (root / "escape").symlink_to(outside)
    before = tree(outside)
    server = RawServer(root, tmp_path / "server.log", "--write")
    try:
        yield server, root, outside
        server.assert_clean()
        assert tree(outside) == before
        assert not spool_files(root)
    finally:
        server.close()


# Observe only where it means something


def test_observe_of_well_known_core_or_a_bad_path_is_answered_once(served) -> None:
    server, _root, _outside = served
    wkc = answered(server.request(GET, [*path(".well-known", "core"), (OBSERVE, b"")]), "2.05")
    assert wkc.opt(OBSERVE) is None
    answered(server.request(GET, [*path(".."), (OBSERVE, b"")]), "4.00")
    answered(server.request(GET, [*path("a", "", "b"), (OBSERVE, b"")]), "4.00")
    answered(server.request(GET, path("a.txt")), "2.05")
    server.assert_clean()


def test_put_with_observe_is_done_once_and_never_repeated(served) -> None:
    server, root, _outside = served
    put = answered(server.request(PUT, [*path("a.txt"), (OBSERVE, b"")], b"mine"), "2.04")
    assert put.opt(OBSERVE) is None
    (root / "a.txt").write_bytes(b"someone else's")
    time.sleep(1.0)  # several coalescing periods: a repeated PUT would have rewritten it by now
    assert (root / "a.txt").read_bytes() == b"someone else's"
    deleted = answered(server.request(DELETE, [*path("a.txt"), (OBSERVE, b"")]), "2.02")
    assert deleted.opt(OBSERVE) is None


# Options the server does not act on


def test_unknown_critical_options_are_4_02_and_elective_ones_ignored(served) -> None:
    server, _root, _outside = served
    for number in (65001, 2049, OSCORE, 19):  # private, unassigned, OSCORE, Q-Block1
        response = answered(server.request(GET, [*path("a.txt"), (number, b"x")]), "4.02")
        assert str(number).encode() in response.payload
    ok = answered(server.request(GET, [*path("a.txt"), (65000, b"x")]), "2.05")
    assert ok.payload == b"hello\n"


def test_proxy_requests_are_refused_not_served_as_the_root(served) -> None:
    server, _root, _outside = served
    for options in (
        [(PROXY_URI, b"coap://127.0.0.1/a.txt")],
        [(PROXY_URI, b"coap://127.0.0.1/")],
        [*path("a.txt"), (PROXY_SCHEME, b"http")],
    ):
        response = answered(server.request(GET, options), "5.05")
        assert b"proxy" in response.payload


def test_accept_must_match_what_would_be_sent(served) -> None:
    server, _root, _outside = served
    answered(server.request(GET, [*path("a.txt"), (ACCEPT, uint(50))]), "4.06")
    answered(server.request(GET, [*path("a.txt"), (ACCEPT, uint(0))]), "2.05")
    answered(server.request(GET, [*path("big.bin"), (ACCEPT, uint(42))]), "2.05")
    answered(server.request(GET, [*path("dir", ""), (ACCEPT, uint(0))]), "4.06")
    answered(server.request(GET, [*path("dir", ""), (ACCEPT, uint(40))]), "2.05")
    answered(server.request(GET, [*path(".well-known", "core"), (ACCEPT, uint(50))]), "4.06")


# Preconditions apply to every method


def test_if_none_match_on_an_existing_file_fails_for_delete_and_get(served) -> None:
    server, root, _outside = served
    answered(server.request(DELETE, [*path("a.txt"), (IF_NONE_MATCH, b"")]), "4.12")
    assert (root / "a.txt").read_bytes() == b"hello\n"
    answered(server.request(GET, [*path("a.txt"), (IF_NONE_MATCH, b"")]), "4.12")
    answered(server.request(DELETE, [*path("missing"), (IF_NONE_MATCH, b"")]), "4.04")


def test_if_match_on_get(served) -> None:
    server, _root, _outside = served
    etag = answered(server.request(GET, path("a.txt")), "2.05").opt(ETAG)
    assert etag
    answered(server.request(GET, [*path("a.txt"), (IF_MATCH, etag)]), "2.05")
    answered(server.request(GET, [*path("a.txt"), (IF_MATCH, b"")]), "2.05")
    answered(server.request(GET, [*path("a.txt"), (IF_MATCH, b"nomatch!")]), "4.12")
    answered(server.request(GET, [*path("missing"), (IF_MATCH, b"")]), "4.04")


# Block-wise uploads that do not fit together


def test_block1_out_of_sequence_is_4_08_and_writes_nothing(served) -> None:
    server, root, _outside = served
    target = [*path("up.bin")]
    answered(server.request(PUT, [*target, (BLOCK1, block(3, False, 0))], b"x" * 5), "4.08")
    answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"a" * 16), "2.31")
    answered(server.request(PUT, [*target, (BLOCK1, block(2, True, 0))], b"c" * 16), "4.08")
    # the gap dropped the upload: its next block cannot complete it
    answered(server.request(PUT, [*target, (BLOCK1, block(1, False, 0))], b"b" * 16), "4.08")
    answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"short"), "4.08")
    answered(server.request(PUT, [*target, (BLOCK1, block(2**20 - 1, False, 0))], b"z"), "4.08")
    assert not (root / "up.bin").exists()
    # a proper upload afterwards works, and a late block cannot extend it
    answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"a" * 16), "2.31")
    done = answered(server.request(PUT, [*target, (BLOCK1, block(1, False, 0))], b"b"), "2.01")
    assert done.opt(BLOCK1) == block(1, False, 0)
    answered(server.request(PUT, [*target, (BLOCK1, block(2, False, 0))], b"c"), "4.08")
    assert (root / "up.bin").read_bytes() == b"a" * 16 + b"b"


def test_interleaved_uploads_from_one_endpoint_are_never_stitched_together(served) -> None:
    server, root, _outside = served
    target = [*path("same.bin")]
    answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"A" * 16), "2.31")
    answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"B" * 16), "4.08")
    answered(server.request(PUT, [*target, (BLOCK1, block(1, False, 0))], b"A" * 16), "4.08")
    assert not (root / "same.bin").exists()
    # told apart by Request-Tag (RFC 9175), they are two uploads
    tag_a, tag_b = [(292, b"a")], [(292, b"b")]
    answered(server.request(PUT, [*target, *tag_a, (BLOCK1, block(0, True, 0))], b"A" * 16), "2.31")
    answered(server.request(PUT, [*target, *tag_b, (BLOCK1, block(0, True, 0))], b"B" * 16), "2.31")
    answered(server.request(PUT, [*target, *tag_a, (BLOCK1, block(1, False, 0))], b"A"), "2.01")
    assert (root / "same.bin").read_bytes() == b"A" * 17
    answered(server.request(PUT, [*target, *tag_b, (BLOCK1, block(1, False, 0))], b"B"), "2.04")
    assert (root / "same.bin").read_bytes() == b"B" * 17


def test_a_retransmitted_block_is_answered_again_not_appended(served) -> None:
    """Deduplication keeps no answer for intermediate upload blocks: a block sent again (its
    ACK lost), block 0 included, gets 2.31 again and the file has each block once."""
    server, root, _outside = served
    target = [*path("again.bin")]
    for _ in range(2):
        answered(server.request(PUT, [*target, (BLOCK1, block(0, True, 0))], b"A" * 16), "2.31")
    for _ in range(2):
        answered(server.request(PUT, [*target, (BLOCK1, block(1, True, 0))], b"B" * 16), "2.31")
    answered(server.request(PUT, [*target, (BLOCK1, block(2, False, 0))], b"C"), "2.01")
    assert (root / "again.bin").read_bytes() == b"A" * 16 + b"B" * 16 + b"C"


def test_parallel_uploads_to_one_name_leave_one_whole_file(served, client: Client) -> None:
    """aiocoap's client sends no Request-Tag: parallel uploads from one context collide (4.08
    for the colliding ones), uploads from separate endpoints both succeed; the file at the name
    is always one whole payload, and no spool file is left."""
    server, root, _outside = served
    uri = f"coap://127.0.0.1:{server.port}/same.bin"
    payloads = [bytes([i]) * (3000 + 100 * i) for i in range(8)]
    seen: set[bytes] = set()

    async def put(context: aiocoap.Context, payload: bytes) -> str:
        message = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=payload)
        return str((await context.request(message).response).code)

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            if (root / "same.bin").exists():
                seen.add((root / "same.bin").read_bytes())
            await asyncio.sleep(0.002)

    async def run() -> tuple[list[str], list[str]]:
        other = await aiocoap.Context.create_client_context()
        done = asyncio.Event()
        watcher = asyncio.ensure_future(watch(done))
        try:
            shared = await asyncio.gather(*(put(client.context, p) for p in payloads))
            separate = await asyncio.gather(
                put(client.context, payloads[0]), put(other, payloads[1])
            )
        finally:
            done.set()
            await watcher
            await other.shutdown()
        return shared, separate

    shared, separate = client.run(run(), timeout=120)
    assert set(shared) <= {"2.01 Created", "2.04 Changed", "4.08 Request Entity Incomplete"}
    assert all(code in {"2.01 Created", "2.04 Changed"} for code in separate), separate
    assert (root / "same.bin").read_bytes() in payloads[:2]
    assert seen <= set(payloads), "a file that no client sent appeared at the name"


def test_upload_beyond_the_space_left_is_4_13(tmp_path: Path) -> None:
    """The root is a 256 KiB tmpfs, mounted in a user and mount namespace of the server's own."""
    root = tmp_path / "small"
    root.mkdir()
    wrapper = with_own_mount(root, options="size=256k")
    server = RawServer(root, tmp_path / "server.log", "--write", wrapper=wrapper)
    try:
        target = path("x")
        announced = [*target, (SIZE1, uint(10**9)), (BLOCK1, block(0, True, 6))]
        refused = answered(server.request(PUT, announced, b"a" * 1024), "4.13")
        assert 0 < int.from_bytes(refused.opt(SIZE1) or b"", "big") <= 256 * 1024
        first = [*target, (BLOCK1, block(0, True, 6))]
        answered(server.request(PUT, first, b"a" * 1024), "2.31")
        code = "2.31"
        for num in range(1, 400):
            response = server.request(PUT, [*target, (BLOCK1, block(num, True, 6))], b"a" * 1024)
            code = answered(response, "2.31", "4.13").code
            if code == "4.13":
                break
        assert code == "4.13"
        answered(server.request(GET, path("")), "2.05")
        server.assert_clean()
    finally:
        server.close()


# A sweep of odd requests: each answered, nothing leaks


ODD_REQUESTS: list[tuple[str, int, Options, bytes, set[str]]] = [
    ("255-byte segment", GET, path("x" * 255), b"", {"4.04"}),
    ("256-byte segment", GET, path("x" * 256), b"", {"4.00"}),
    ("1000-byte segment", PUT, path("x" * 1000), b"x", {"4.00"}),
    ("many segments", GET, path(*["dir"] * 100), b"", {"4.00"}),
    ("64 segments, the most served", GET, path(*["dir"] * 64), b"", {"4.04"}),
    ("percent", GET, path("%2e%2e", "secret"), b"", {"4.04"}),
    ("backslash", GET, path("..\\outside\\secret"), b"", {"4.04"}),
    ("double slash", GET, path("", "etc", "hostname"), b"", {"4.00"}),
    ("dot dot", PUT, path("..", "outside", "secret"), b"x", {"4.00"}),
    ("NUL", GET, path("a\0b"), b"", {"4.00"}),
    ("symlink out", GET, path("escape", "secret"), b"", {"4.03"}),
    ("PUT through symlink", PUT, path("escape", "new"), b"x", {"4.03"}),
    ("root", GET, [], b"", {"2.05"}),
    ("root slash", GET, path(""), b"", {"2.05"}),
    ("dir without slash", GET, path("dir"), b"", {"4.00"}),
    ("file with slash", GET, path("a.txt", ""), b"", {"4.00"}),
    ("below a file", GET, path("a.txt", "x"), b"", {"4.04"}),
    ("hidden spool name", PUT, path(SPOOL_PREFIX + "x"), b"x", {"4.04"}),
    ("POST", POST, path("a.txt"), b"x", {"4.05"}),
    ("FETCH", FETCH, path("a.txt"), b"x", {"4.05"}),
    ("PATCH", PATCH, path("a.txt"), b"x", {"4.05"}),
    ("iPATCH", IPATCH, path("dir", ""), b"x", {"4.05"}),
    ("unassigned method", 0x1F, path("a.txt"), b"", {"4.05"}),
    (
        "Block2 beyond the end",
        GET,
        [*path("big.bin"), (BLOCK2, block(100, False, 6))],
        b"",
        {"4.02"},
    ),
    (
        "Block2 NUM 2^20-1",
        GET,
        [*path("big.bin"), (BLOCK2, block(2**20 - 1, False, 0))],
        b"",
        {"4.02"},
    ),
    ("Block2 szx 7", GET, [*path("big.bin"), (BLOCK2, block(1, False, 7))], b"", {"2.05"}),
    ("Block2 on a listing", GET, [*path(""), (BLOCK2, block(1, False, 0))], b"", {"2.05"}),
    ("Block2 far on a listing", GET, [*path(""), (BLOCK2, block(999, False, 0))], b"", {"4.02"}),
    ("Observe 5", GET, [*path("a.txt"), (OBSERVE, uint(5))], b"", {"2.05"}),
    ("Observe 1", GET, [*path("a.txt"), (OBSERVE, uint(1))], b"", {"2.05"}),
    (
        "many If-Match",
        PUT,
        [*path("a.txt"), *((IF_MATCH, bytes([i]) * 8) for i in range(40))],
        b"x",
        {"4.12"},
    ),
    (
        "If-Match and If-None-Match",
        PUT,
        [*path("new"), (IF_MATCH, b""), (IF_NONE_MATCH, b"")],
        b"x",
        {"4.12"},
    ),
    (
        "Uri-Host, Uri-Port, Uri-Query",
        GET,
        [(URI_HOST, b"example.com"), (URI_PORT, uint(1)), *path("a.txt"), (URI_QUERY, b"q")],
        b"",
        {"2.05"},
    ),
    (
        "PUT with Content-Format",
        PUT,
        [*path("cf.json"), (CONTENT_FORMAT, uint(50))],
        b"{}",
        {"2.01"},
    ),
    ("PUT empty", PUT, path("empty"), b"", {"2.01"}),
    ("PUT root", PUT, [], b"x", {"4.03"}),
    ("DELETE dir", DELETE, path("dir"), b"", {"4.00"}),
    ("PUT into a missing dir", PUT, path("nodir", "x"), b"x", {"4.04"}),
]


def test_odd_requests_are_answered_and_nothing_leaks(served) -> None:
    server, root, _outside = served
    for label, code, options, payload, expected in ODD_REQUESTS:
        response = server.request(code, options, payload)
        answered(response, *expected)
        assert response is not None
        assert b"outside the root" not in response.payload, label
    assert (root / "empty").read_bytes() == b""
    answered(server.request(GET, path("a.txt")), "2.05")


def test_unreadable_directory_is_4_03(tmp_path: Path) -> None:
    """As root, the server runs without the capabilities that override file permissions."""
    root = tmp_path / "root"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "f").write_bytes(b"x")
    (root / "locked").chmod(0)
    wrapper: list[str] = []
    if os.geteuid() == 0:
        setpriv = require("setpriv", "util-linux")
        caps = "-dac_override,-dac_read_search"
        wrapper = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    server = RawServer(root, tmp_path / "server.log", "--write", wrapper=wrapper)
    try:
        answered(server.request(GET, path("locked", "")), "4.03")
        answered(server.request(GET, path("locked", "f")), "4.03")
        answered(server.request(PUT, path("locked", "g"), b"x"), "4.03")
        answered(server.request(GET, [*path("locked", ""), (OBSERVE, b"")]), "4.03")
        answered(server.request(GET, path("")), "2.05")
        server.assert_clean()
    finally:
        server.close()
        (root / "locked").chmod(0o755)


def test_uri_path_that_is_not_utf8_is_4_00_wherever_it_gets_through() -> None:
    """aiocoap (0.4.14-0.4.17) drops such a datagram while decoding it, logging a traceback
    (chrysn/aiocoap#176, #417); should it pass the bytes on as surrogates instead, the path is
    still refused rather than opened by its raw bytes."""
    from coapfs.tree.path import parse_uri_path
    from coapfs.tree.problems import BadPath

    for segment in (b"\xff\xfe", b"caf\xc3", b"\xc0\x80"):
        with pytest.raises(BadPath):
            parse_uri_path(["dir", segment.decode("utf-8", "surrogateescape")])
    assert parse_uri_path(["café", ""]).segments == ("café",)


def test_uri_path_that_is_not_utf8_is_answered_4_00_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    server = RawServer(tmp_path, tmp_path.parent / f"{tmp_path.name}.log", "--write")
    try:
        answered(server.request(GET, path(b"\xff\xfe")), "4.00")
        answered(server.request(PUT, path(b"caf\xc3"), b"x"), "4.00")
        answered(server.request(DELETE, path(b"\xc0\x80")), "4.00")
        answered(server.request(GET, path("a.txt")), "2.05")
        assert "Traceback" not in server.log(), server.log()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    finally:
        server.close()
