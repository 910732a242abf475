"""50,000 mutated datagrams over UDP against the real server process (issue 10): bit flips,
truncation, option delta/length nibbles 13/14/15, token lengths 9-15, huge option values, on
valid requests of every kind, mostly NON and sent as fast as the server answers. It stays
alive, answers no 5.00, and logs no traceback (nor any ERROR line)."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import coapmsg

from support.flood import Flood
from support.raw import (
    BLOCK1,
    BLOCK2,
    CONTENT_FORMAT,
    DELETE,
    ETAG,
    GET,
    IF_MATCH,
    IF_NONE_MATCH,
    OBSERVE,
    PUT,
    SIZE1,
    RawServer,
    block,
    path,
    uint,
)
from support.rawpeer import RawPeer
from support.server import Server

COUNT = 50_000
NON, CON = 1, 0

SEEDS: list[tuple[int, list[tuple[int, bytes]], bytes]] = [
    (GET, path("a.txt"), b""),
    (GET, path("dir", ""), b""),
    (GET, [], b""),
    (GET, path(".well-known", "core"), b""),
    (GET, [*path("big.bin"), (BLOCK2, block(3, False, 4))], b""),
    (GET, [*path("a.txt"), (OBSERVE, b""), (ETAG, b"12345678")], b""),
    (GET, [*path("dir", "sub", ""), (IF_MATCH, b"")], b""),
    (PUT, path("dir", "new.txt"), b"payload"),
    (PUT, [*path("up.bin"), (BLOCK1, block(0, True, 0)), (SIZE1, uint(64))], b"x" * 16),
    (PUT, [*path("dir", "made", "")], b""),
    (PUT, [*path("a.txt"), (IF_NONE_MATCH, b"")], b"no"),
    (DELETE, path("dir", "new.txt"), b""),
    (DELETE, [*path("dir", "made", ""), (IF_MATCH, b"\x6c\xe8\x8b\x56")], b""),
]


def _flip(rng: random.Random, d: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(d))
        d[i] ^= 1 << rng.randrange(8)
    return d


def _truncate(rng: random.Random, d: bytearray) -> bytearray:
    return d[: rng.randrange(len(d))]


def _nibble(rng: random.Random, d: bytearray) -> bytearray:
    """An option header with delta and/or length 13, 14 or 15 where the options start."""
    at = 4 + (d[0] & 0x0F)
    header = (rng.choice((13, 14, 15, rng.randrange(16))) << 4) | rng.choice((13, 14, 15, 1))
    tail = bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    return d[:at] + bytes([header]) + tail + d[at:]


def _token_length(rng: random.Random, d: bytearray) -> bytearray:
    d[0] = (d[0] & 0xF0) | rng.randint(9, 15)
    return d


def _huge_option(rng: random.Random, d: bytearray) -> bytearray:
    """An option with a value of hundreds to thousands of bytes: encoded properly among the
    others, or its raw header (extended delta and length) appended at the end."""
    # Not Content-Format (12): a huge one on a PUT is a known 5.00, see the test below.
    number = rng.choice((1, 3, 4, 6, 11, 14, 15, 17, 23, 27, 28, 35, 60, 252, 258, 2049))
    size = rng.choice((255, 270, 1000, 3000))
    value = bytes(rng.randrange(256) for _ in range(size))
    if rng.random() < 0.5:
        try:
            message = coapmsg.parse(bytes(d))
        except (ValueError, IndexError):  # the codec is strict only where the benchmark needs
            pass
        else:
            message.options.append((number, value))
            return bytearray(message.encode())
    length = bytes([13, size - 13]) if size < 269 else bytes([14]) + (size - 269).to_bytes(2, "big")
    header = bytes([(13 << 4) | length[0], rng.randrange(256)]) + length[1:]
    return d + header + value


MUTATIONS: list[Callable[[random.Random, bytearray], bytearray]] = [
    _flip, _flip, _truncate, _nibble, _token_length, _huge_option,
]  # fmt: skip


def mutated(rng: random.Random) -> bytes:
    code, options, payload = rng.choice(SEEDS)
    mtype = NON if rng.random() < 0.9 else CON
    token = bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
    d = bytearray(coapmsg.Message(mtype, code, rng.randrange(65536), token, options, payload)
                  .encode())  # fmt: skip
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not d:
            break
        d = rng.choice(MUTATIONS)(rng, d)
    return bytes(d[:4000])


def datagrams(count: int, seed: int = 10) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        yield mutated(rng)


def test_fifty_thousand_mutated_datagrams(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "big.bin").write_bytes(bytes(range(256)) * 16)
    # Not RawServer: its debug log would cost the server more than the datagrams do.
    server = Server("--write", root=root, log=tmp_path / "server.log")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    peer = RawPeer(sock, ("127.0.0.1", server.port))
    wkc = path(".well-known", "core")
    flood = None
    try:
        server.wait_ready(lambda: peer.exchange(GET, wkc, timeout=0.5).response is not None)
        flood = Flood(sock, peer.server, window=64, patience=0.01)
        started = time.monotonic()
        flood.send(datagrams(COUNT))
        flood.drain(quiet=1.0)
        took = time.monotonic() - started
        print(f"\n{COUNT} mutated datagrams in {took:.1f} s: {flood.answered} answers, "
              f"{dict(flood.codes.most_common())}")  # fmt: skip
        assert flood.codes["5.00"] == 0, flood.codes
        assert flood.answered > COUNT // 4, flood.codes  # most were understood well enough
        flood.close()
        flood = None
        # From a fresh port: a Message ID of the flood's stored for this one must not answer.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
            fresh.bind(("127.0.0.1", 0))
            alive = RawPeer(fresh, peer.server).exchange(GET, wkc).response
        assert alive is not None and alive.code == "2.05", alive
        assert server.proc.poll() is None
        bad = [
            line for line in server.log().splitlines() if "Traceback" in line or " ERROR " in line
        ]
        assert not bad, "\n".join(bad[:20])
    finally:
        if flood is not None:
            flood.close()
        sock.close()
        server.close()


def test_a_put_with_a_content_format_of_thousands_of_bytes_is_a_client_error(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = RawServer(root, tmp_path / "server.log", "--write")
    try:
        for size in (3, 2000):
            response = server.request(PUT, [*path(f"cf{size}"), (CONTENT_FORMAT, b"\xff" * size)])
            assert response is not None and response.code.startswith("4."), response
        server.assert_clean()
    finally:
        server.close()
