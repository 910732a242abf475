"""The corpus's seeds: a valid request of every kind the server answers, written as
tests/fuzz/corpus/seed-NAME (`python tests/fuzz/seeds.py`). Inputs found by fuzzing join them
there under other names."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent / "bench")]

import coapmsg  # noqa: E402

from support.raw import (  # noqa: E402
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
    OBSERVE,
    POST,
    PROXY_SCHEME,
    PROXY_URI,
    PUT,
    SIZE1,
    URI_HOST,
    URI_PORT,
    URI_QUERY,
    block,
    path,
    uint,
)  # fmt: skip

CON, NON = 0, 1
REQUEST_TAG, ECHO = 292, 252

SEEDS: dict[str, tuple[int, int, list[tuple[int, bytes]], bytes]] = {
    "get-file": (CON, GET, path("a.txt"), b""),
    "get-root": (CON, GET, [], b""),
    "get-listing": (NON, GET, path("dir", ""), b""),
    "get-listing-block": (CON, GET, [*path("dir", ""), (BLOCK2, block(1, False, 1))], b""),
    "get-big-block": (CON, GET, [*path("big.bin"), (BLOCK2, block(2, False, 6))], b""),
    "get-big-szx7": (CON, GET, [*path("big.bin"), (BLOCK2, block(1, False, 7))], b""),
    "get-through-link": (CON, GET, path("inside", "b.json"), b""),
    "get-link-out": (CON, GET, path("escape", "secret"), b""),
    "get-absolute-link": (CON, GET, path("absolute"), b""),
    "get-fifo": (CON, GET, path("fifo"), b""),
    "get-hidden": (CON, GET, path(".hidden"), b""),
    "get-dotdot": (CON, GET, path("..", "outside", "secret"), b""),
    "get-double-slash": (CON, GET, path("", "etc"), b""),
    "get-not-utf8": (CON, GET, path(b"\xff\xfe"), b""),
    "get-deep": (NON, GET, path(*["d"] * 70), b""),
    "get-wkc": (CON, GET, path(".well-known", "core"), b""),
    "get-etag": (CON, GET, [*path("a.txt"), (ETAG, b"12345678")], b""),
    "get-if-match": (CON, GET, [*path("a.txt"), (IF_MATCH, b"")], b""),
    "get-if-none-match": (CON, GET, [*path("a.txt"), (IF_NONE_MATCH, b"")], b""),
    "get-accept": (CON, GET, [*path("dir", "b.json"), (ACCEPT, uint(50))], b""),
    "get-uri-host-port-query": (
        CON,
        GET,
        [(URI_HOST, b"h"), (URI_PORT, uint(5683)), *path("a.txt"), (URI_QUERY, b"q")],
        b"",
    ),
    "get-critical-unknown": (CON, GET, [*path("a.txt"), (65001, b"x")], b""),
    "get-proxy-uri": (CON, GET, [(PROXY_URI, b"coap://example/")], b""),
    "get-proxy-scheme": (CON, GET, [*path("a.txt"), (PROXY_SCHEME, b"http")], b""),
    "get-echo": (CON, GET, [*path("big.bin"), (ECHO, b"\x00\x01abcdef")], b""),
    "observe-file": (CON, GET, [*path("a.txt"), (OBSERVE, b"")], b""),
    "observe-listing": (CON, GET, [*path("dir", ""), (OBSERVE, b"")], b""),
    "observe-deregister": (CON, GET, [*path("a.txt"), (OBSERVE, uint(1))], b""),
    "put-file": (CON, PUT, [*path("dir", "new.txt"), (CONTENT_FORMAT, uint(0))], b"new"),
    "put-if-none-match": (CON, PUT, [*path("a.txt"), (IF_NONE_MATCH, b"")], b"x"),
    "put-if-match": (CON, PUT, [*path("a.txt"), (IF_MATCH, b"\x00" * 8)], b"x"),
    "put-block1-first": (
        CON,
        PUT,
        [*path("up.bin"), (BLOCK1, block(0, True, 0)), (SIZE1, uint(40))],
        b"u" * 16,
    ),
    "put-block1-tagged": (
        CON,
        PUT,
        [*path("up.bin"), (REQUEST_TAG, b"t"), (BLOCK1, block(1, False, 0))],
        b"v",
    ),
    "put-too-large": (
        CON,
        PUT,
        [*path("x"), (BLOCK1, block(0, True, 6)), (SIZE1, uint(2**40))],
        b"z" * 1024,
    ),
    "put-directory": (CON, PUT, path("dir", "made", ""), b""),
    "put-through-link-out": (CON, PUT, path("escape", "new"), b"x"),
    "put-root": (CON, PUT, [], b"x"),
    "delete-file": (CON, DELETE, path("dir", "b.json"), b""),
    "delete-missing": (NON, DELETE, path("missing"), b""),
    "delete-directory-if-empty": (
        CON,
        DELETE,
        [*path("dir", "sub", ""), (IF_MATCH, bytes.fromhex("6ce88b56"))],
        b"",
    ),
    "delete-directory": (CON, DELETE, path("dir", "made", ""), b""),
    "post": (CON, POST, path("a.txt"), b"x"),
    "fetch": (CON, FETCH, path("a.txt"), b"x"),
}


def main() -> None:
    corpus = Path(__file__).resolve().parent / "corpus"
    corpus.mkdir(exist_ok=True)
    for mid, (name, (mtype, code, options, payload)) in enumerate(sorted(SEEDS.items())):
        message = coapmsg.Message(mtype, code, mid, bytes([mid]), options, payload)
        (corpus / f"seed-{name}").write_bytes(message.encode())


if __name__ == "__main__":
    main()
