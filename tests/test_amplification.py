"""No amplification from an unverified address (RFC 9175 2.4), seen from a public-looking
address: the server runs in a network namespace of its own (198.51.100.1), the clients in
another (198.51.100.2-5), joined by a veth pair.

Every kind of request — a large listing, a big file's first block, /.well-known/core, every
error — is sent as small as it can be made, and the largest datagram that comes back must be at
most 3 times the request (CoAP bytes, the stricter measure: UDP and IP headers add the same on
both sides). Once the address is verified by an Echo value, the same requests get full-size
answers. The clients people use get whole files: libcoap's coap-client and aiocoap's."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_core_oscore import write_context

from support.child import child_environment, command
from support.netns import Host, linked_hosts
from support.polling import wait_until
from support.raw import (
    ACCEPT,
    BLOCK1,
    BLOCK2,
    DELETE,
    GET,
    IF_MATCH,
    IF_NONE_MATCH,
    OBSERVE,
    POST,
    PROXY_SCHEME,
    PROXY_URI,
    PUT,
    SIZE1,
    Options,
    block,
    path,
    uint,
)
from support.rawpeer import Exchange, RawPeer
from support.repo import environment
from support.server import COAPFS, Server
from support.tools import libcoap_client

pytestmark = pytest.mark.needs_root

ECHO = 252
FACTOR = 3.0
PORT = 5683
NON = 1
LISTING_ENTRIES = 1000
BIG = bytes(range(256)) * 80  # 20 KiB


def write_config(directory: Path, name: str, root: Path, port: int, extra: str = "") -> Path:
    config = directory / f"{name}.toml"
    config.write_text(
        f"root = {json.dumps(str(root))}\n"
        f'bind = ["198.51.100.1:{port}"]\n'
        "write = true\n"
        "verbosity = 2\n"
        f"{extra}\n"
        "[deduplication]\nmax_entries = 200\n"
        '[[access]]\npath = "private/"\nread = "authenticated"\n'
        '[[access]]\npath = "ro/"\nwrite = []\n'
    )
    return config


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    with linked_hosts() as linked:
        yield linked


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("amplification")
    root = top / "root"
    (root / "dir").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "ro").mkdir()
    (root / "private" / "p.txt").write_text("private\n")
    (top / "outside").mkdir()
    (root / "escape").symlink_to(top / "outside")
    for i in range(LISTING_ENTRIES):
        (root / "dir" / f"entry-{i:04d}.txt").touch()
    (root / "a.txt").write_text("hello\n")
    (root / "big.bin").write_bytes(BIG)
    (root / "observed.bin").write_bytes(BIG)
    return root


class NetServer:
    """A coap-fileserver in the server namespace, configured by a file."""

    def __init__(self, server_host: Host, client_host: Host, config: Path, port: int) -> None:
        self.port = port
        self.server = Server(
            "--config", str(config), log=config.with_suffix(".log"),
            wrapper=server_host.command(),
        )  # fmt: skip
        self.client_host = client_host
        probe = self.peer(client_host.addresses[-1])
        self.server.wait_ready(lambda: probe.exchange(GET, timeout=0.3).response is not None)

    def peer(self, address: str) -> RawPeer:
        return RawPeer(self.client_host.socket(address), ("198.51.100.1", self.port))

    def uri(self, name: str) -> str:
        return f"coap://198.51.100.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.close()
        log = self.server.log()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def oscore(tmp_path_factory) -> Path:
    """OSCORE contexts for a server and its client (the client's credentials: `client.json`,
    for the "oscore" server's port)."""
    directory = tmp_path_factory.mktemp("oscore")
    secret = "amplification test 2026"
    write_context(directory / "server-ctx", "srv", "cli", secret)
    write_context(directory / "client-ctx", "cli", "srv", secret)
    server_map = {":cli": {"oscore": {"basedir": f"{directory}/server-ctx/"}}}
    (directory / "server.json").write_text(json.dumps(server_map))
    uri = f"coap://198.51.100.1:{PORT + 3}/*"
    client_map = {uri: {"oscore": {"basedir": f"{directory}/client-ctx/"}}}
    (directory / "client.json").write_text(json.dumps(client_map))
    return directory


@pytest.fixture(scope="module")
def servers(hosts, root, oscore, tmp_path_factory) -> Iterator[dict[str, NetServer]]:
    """Servers of the same tree: the defaults ("small-blocks"), `unverified = "echo"`, one
    that trusts the client's network, and one with OSCORE credentials."""
    server_host, client_host = hosts
    directory = tmp_path_factory.mktemp("configs")
    variants = {
        "default": "",
        "echo": '[amplification]\nunverified = "echo"',
        "trusted": '[amplification]\ntrusted = ["198.51.100.0/24"]',
        "oscore": f"credentials = {json.dumps(str(oscore / 'server.json'))}",
    }
    started: dict[str, NetServer] = {}
    try:
        for i, (name, extra) in enumerate(variants.items()):
            config = write_config(directory, name, root, PORT + i, extra)
            started[name] = NetServer(server_host, client_host, config, PORT + i)
        yield started
    finally:
        for server in started.values():
            server.close()


# Each request kind as small as it can be sent (no token), and once more with a long token.
REQUESTS: list[tuple[str, int, Options, bytes]] = [
    ("listing of 1,000 entries", GET, path("dir", ""), b""),
    ("listing, Block2 0 of 1024", GET, [*path("dir", ""), (BLOCK2, block(0, False, 6))], b""),
    ("root listing", GET, [], b""),
    ("big file", GET, path("big.bin"), b""),
    ("big file, Block2 0 of 1024", GET, [*path("big.bin"), (BLOCK2, block(0, False, 6))], b""),
    ("big file, Block2 szx 7", GET, [*path("big.bin"), (BLOCK2, block(0, False, 7))], b""),
    ("small file", GET, path("a.txt"), b""),
    ("/.well-known/core", GET, path(".well-known", "core"), b""),
    ("observe big file", GET, [*path("big.bin"), (OBSERVE, b"")], b""),
    ("4.04 missing", GET, path("m"), b""),
    ("4.04 hidden", GET, path(".h"), b""),
    ("4.00 file/", GET, path("a.txt", ""), b""),
    ("4.00 dir", GET, path("dir"), b""),
    ("4.00 //", GET, path("", ""), b""),
    ("4.00 ..", GET, path(".."), b""),
    ("4.00 not UTF-8", GET, path(b"\xff"), b""),
    ("4.00 too deep", GET, path(*["d"] * 65), b""),
    ("4.01 authenticated only", GET, path("private", "p.txt"), b""),
    ("4.02 critical option", GET, [(65001, b"")], b""),
    ("4.02 Block2 beyond the end", GET, [*path("big.bin"), (BLOCK2, block(999, False, 6))], b""),
    ("4.03 symlink out", GET, path("escape", ""), b""),
    ("4.03 write refused", PUT, path("ro", "x"), b""),
    ("4.05 POST", POST, [], b""),
    ("4.06 Accept", GET, [*path("a.txt"), (ACCEPT, uint(50))], b""),
    ("4.08 stray block", PUT, [*path("u"), (BLOCK1, block(3, False, 0))], b"x"),
    ("4.12 If-Match", GET, [*path("a.txt"), (IF_MATCH, b"\x00")], b""),
    ("4.12 If-None-Match", DELETE, [*path("a.txt"), (IF_NONE_MATCH, b"")], b""),
    ("4.13 Size1", PUT, [*path("u"), (BLOCK1, block(0, True, 0)), (SIZE1, uint(2**40))], b"x"),
    ("5.05 Proxy-Uri", GET, [(PROXY_URI, b"coap://a")], b""),
    ("5.05 Proxy-Scheme", GET, [(PROXY_SCHEME, b"h")], b""),
    ("4.04 DELETE", DELETE, path("m"), b""),
    ("2.31 Continue", PUT, [*path("u2"), (BLOCK1, block(0, True, 0))], b"x" * 16),
    ("2.01 PUT", PUT, path("n"), b""),
]


def measure(peer: RawPeer, echo: bytes | None = None) -> dict[str, Exchange]:
    """Every request kind once with no token and once with 8 bytes of token (both NON and
    CON): the exchange with the largest ratio per kind."""
    worst: dict[str, Exchange] = {}
    for label, code, options, payload in REQUESTS:
        opts = [*options, (ECHO, echo)] if echo is not None else list(options)
        for token in (b"", os.urandom(8)):
            for mtype in (NON, 0):
                exchange = peer.exchange(code, opts, payload, token=token, mtype=mtype)
                assert exchange.response is not None, (label, token, mtype)
                if label not in worst or exchange.ratio > worst[label].ratio:
                    worst[label] = exchange
    return worst


def report(title: str, worst: dict[str, Exchange]) -> None:
    print(f"\n{title}: request bytes -> largest response bytes (ratio), code")
    for label, exchange in worst.items():
        assert exchange.response is not None
        print(f"  {label:32} {exchange.sent:5} -> {exchange.largest:5} "
              f"({exchange.ratio:6.2f}) {exchange.response.code}")  # fmt: skip


def test_unverified_answers_stay_within_the_factor_and_verified_ones_are_whole(
    servers,
) -> None:
    server = servers["default"]
    peer = server.peer("198.51.100.3")
    before = measure(peer)
    report("unverified", before)
    over = {k: e.ratio for k, e in before.items() if e.ratio > FACTOR}
    assert not over, over
    # The large answers were cut down: a smaller block with Echo attached, or 4.01 with Echo.
    listing = before["listing, Block2 0 of 1024"].response
    assert listing is not None and listing.code in ("2.05", "4.01")
    assert len(listing.payload) < 1024
    echo = next(
        (e.response.opt(ECHO) for e in before.values() if e.response and e.response.opt(ECHO)),
        None,
    )
    assert echo, "no Echo value was offered"

    after = measure(peer, echo)
    report("verified (Echo sent back)", after)
    listing = after["listing, Block2 0 of 1024"].response
    assert listing is not None and listing.code == "2.05" and len(listing.payload) == 1024
    first = after["big file, Block2 0 of 1024"].response
    assert first is not None and first.code == "2.05" and first.payload == BIG[:1024]
    missing = after["4.04 missing"].response
    assert missing is not None and missing.payload, "a verified peer gets the diagnostic"
    # Verified stays verified: the same request without Echo is answered in full too.
    again = peer.exchange(GET, path("dir", ""))
    assert again.response is not None and len(again.response.payload) == 1024


def test_notifications_to_an_unverified_observer_stay_within_the_factor(servers, root) -> None:
    server = servers["default"]
    peer = server.peer("198.51.100.5")
    registration = peer.exchange(GET, [*path("observed.bin"), (OBSERVE, b"")], token=b"")
    assert registration.response is not None
    assert registration.response.opt(OBSERVE) is not None, registration.response
    (root / "observed.bin").write_bytes(BIG[::-1])
    notifications = wait_until(
        lambda: peer.receive(0.5), 10, what="a notification of the change"
    )  # fmt: skip
    largest = max(map(len, notifications))
    print(f"\nnotification: request {registration.sent} -> {largest} bytes")
    assert largest <= FACTOR * registration.sent


def test_a_refusal_of_a_full_deduplication_store_stays_within_the_factor(servers) -> None:
    """With the store full, a new DELETE is refused with 5.03 — also within the factor."""
    peer = servers["default"].peer("198.51.100.4")
    for i in range(200):
        peer.exchange(DELETE, path(f"missing-{i}"), token=b"")
    refused = peer.exchange(DELETE, [], token=b"")
    assert refused.response is not None and refused.response.code == "5.03", refused.response
    print(f"\n5.03 refusal: {refused.sent} -> {refused.largest} bytes")
    assert refused.ratio <= FACTOR


def test_echo_mode_answers_4_01_with_echo_then_the_full_block(servers) -> None:
    peer = servers["echo"].peer("198.51.100.3")
    request = [*path("big.bin"), (BLOCK2, block(0, False, 6))]
    challenge = peer.exchange(GET, request, token=os.urandom(8)).response
    assert challenge is not None and challenge.code == "4.01", challenge
    echo = challenge.opt(ECHO)
    assert echo
    answer = peer.exchange(GET, [*request, (ECHO, echo)], token=os.urandom(8)).response
    assert answer is not None and answer.code == "2.05" and answer.payload == BIG[:1024]
    # A forged or foreign Echo value verifies nothing.
    other = servers["echo"].peer("198.51.100.4")
    forged = other.exchange(GET, [*request, (ECHO, echo)], token=os.urandom(8)).response
    assert forged is not None and forged.code == "4.01", forged


def test_a_trusted_network_is_exempt(servers) -> None:
    peer = servers["trusted"].peer("198.51.100.3")
    listing = peer.exchange(GET, path("dir", ""), token=b"").response
    assert listing is not None and listing.code == "2.05" and len(listing.payload) == 1024
    error = peer.exchange(GET, path("a.txt", ""), token=b"").response
    assert error is not None and error.code == "4.00" and error.payload


@pytest.mark.parametrize("variant", ["default", "echo"])
def test_libcoap_client_fetches_a_big_file_whole(servers, hosts, variant, tmp_path) -> None:
    """coap-client answers the 4.01 Echo challenge by itself (and copes with small blocks)."""
    coap_client = libcoap_client()
    _server_host, client_host = hosts
    out = tmp_path / "big.bin"
    address = "198.51.100.2" if variant == "default" else "198.51.100.5"
    command = [coap_client, "-a", address, "-o", str(out), servers[variant].uri("big.bin")]
    done = subprocess.run(client_host.command(*command), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == BIG


def test_aiocoap_client_fetches_a_big_file_whole_in_small_blocks(servers, hosts) -> None:
    """aiocoap's client does not send Echo back (aiocoap #273): with the default "small-blocks"
    it still gets the file whole, in blocks small enough for the factor."""
    _server_host, client_host = hosts
    command = [*COAPFS[:1], "-m", "aiocoap.cli.client", servers["default"].uri("big.bin")]
    done = subprocess.run(
        client_host.command(*command), capture_output=True, timeout=300, env=environment()
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == BIG, (len(done.stdout), done.stderr[-2000:])


def test_oscore_peers_are_exempt(servers, hosts, oscore) -> None:
    """An OSCORE-protected GET from an unverified address gets its protected answer in full:
    only a holder of the key can have sent it (the replay window sees to copies)."""
    _server_host, client_host = hosts
    uri = servers["oscore"].uri("big.bin")
    fetch = command("fetch", uri, str(oscore / "client.json"))
    done = subprocess.run(
        client_host.command(*fetch), capture_output=True, timeout=120, env=child_environment()
    )
    assert done.returncode == 0, done.stderr
    assert b"oscore" in done.stderr, done.stderr  # the answer came through OSCORE
    assert done.stdout == BIG, (len(done.stdout), done.stderr[-2000:])
