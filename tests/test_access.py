"""Access rules ([[access]]) against the real server with real OSCORE identities.

Alice (":alice") may write firmware/, Bob (":bob") may only read, an unauthenticated client may
read public/ only. Every method and kind of resource is tried by each of them in each area, on a
path that exists and on one that does not: what is allowed happens, what is refused is 4.01
where authenticating could help and 4.03 otherwise, with a short diagnostic, the same whether
or not the path exists, and nothing on disk changes. Listings show each peer only what it may
read (with an ETag of its own); rules by source network tell 127.0.0.1 from ::1; a reload that
revokes read access ends the observations it revokes; --check-config finds bad rules."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import BlockOption

from support.client import Client
from support.identities import Identities
from support.observer import Observer
from support.ondisk import snapshot
from support.polling import wait_until
from support.ports import free_udp_port
from support.server import Server, Servers, run_coapfs
from support.tools import require

EX_CONFIG = 78
BlockwiseTuple = BlockOption.BlockwiseTuple

RULES = """
[[access]]                  # the root's listing is anyone's: it shows what each may read
path = "/"
read = "anyone"
write = []

[[access]]
path = "public/"
read = "anyone"

[[access]]
path = "firmware/"
read = "authenticated"
write = ":alice"

[[access]]
path = "firmware/locked/"
write = []

[[access]]
path = "private/"
read = ":alice"
"""

WHO = ("anonymous", "bob", "alice")
AREAS = ("public", "firmware", "private")
#: The refusal each peer gets in each area; None: allowed. Written out, not derived from RULES.
READ = {
    "anonymous": {"public": None, "firmware": "4.01", "private": "4.01"},
    "bob": {"public": None, "firmware": None, "private": "4.03"},
    "alice": {"public": None, "firmware": None, "private": None},
}
WRITE = {
    "anonymous": {"public": "4.03", "firmware": "4.01", "private": "4.03"},
    "bob": {"public": "4.03", "firmware": "4.03", "private": "4.03"},
    "alice": {"public": "4.03", "firmware": None, "private": "4.03"},
}


def populate(root: Path) -> None:
    """Each area with a file, and for each peer its own things to replace and delete."""
    for area in AREAS:
        (root / area).mkdir(parents=True)
        (root / area / "file.txt").write_text(f"{area} content\n")
        for who in WHO:
            (root / area / f"put-{who}.txt").write_text("old\n")
            (root / area / f"del-{who}.txt").write_text("delete me\n")
            (root / area / f"sub-{who}").mkdir()
            (root / area / f"rmdir-{who}").mkdir()
            (root / area / f"rmdir-{who}" / "inside.txt").write_text("inside\n")
    (root / "firmware" / "locked").mkdir()
    (root / "firmware" / "locked" / "fw.bin").write_bytes(b"\x7fELF locked")


@dataclass
class Served:
    server: Server
    root: Path
    clients: dict[str, Client]

    def uri(self, path: str) -> str:
        return self.server.uri(path)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, start_module_server: Servers, client: Client
) -> Iterator[Served]:
    """One server of the rules above (-v: changes are logged), and a client per peer."""
    base = tmp_path_factory.mktemp("access")
    root = base / "root"
    populate(root)
    identities = Identities(base / "identities", "alice", "bob")
    conf = base / "server.toml"
    conf.write_text(RULES)
    args = ("-v", "--config", str(conf), "--credentials", str(identities.server))
    server = start_module_server(root, *args)
    assert server.port is not None
    clients = {"anonymous": client}
    try:
        for name in ("alice", "bob"):
            clients[name] = Client(identities.client(name, server.port))
        yield Served(server, root, clients)
    finally:
        for name in ("alice", "bob"):
            if name in clients:
                clients[name].close()


def send_observe(client: Client, uri: str) -> aiocoap.Message:
    """The first answer to an observation; an accepted one is cancelled after it."""
    observer = Observer(client, uri)
    observed = observer.first.opt.observe is not None
    if observed:
        observer.cancel()
    assert observed == observer.first.code.is_successful(), observer.first
    return observer.first


def send_get(client: Client, uri: str, who: str) -> aiocoap.Message:
    return client.get(uri)


def read_only(present: Path, absent: Path, who: str) -> bool:
    return True


@dataclass(frozen=True)
class Op:
    permission: str
    present: str  # a path that exists ({area}, {who} filled in)
    absent: str  # one that does not
    done: tuple[str, str]  # the codes when allowed, for present and absent
    send: Callable[[Client, str, str], aiocoap.Message] = send_get  # (client, uri, who)
    effect: Callable[[Path, Path, str], bool] = read_only  # (present, absent, who): done


OPS = {
    "GET": Op("read", "{area}/file.txt", "{area}/missing.txt", ("2.05", "4.04")),
    "listing": Op("read", "{area}/", "{area}/missing/", ("2.05", "4.04")),
    "Observe": Op(
        "read",
        "{area}/file.txt",
        "{area}/missing.txt",
        ("2.05", "4.04"),
        lambda c, uri, who: send_observe(c, uri),
    ),
    "PUT": Op(
        "write",
        "{area}/put-{who}.txt",
        "{area}/new-{who}.txt",
        ("2.04", "2.01"),
        lambda c, uri, who: c.put(uri, f"from {who}\n".encode()),
        lambda present, absent, who: present.read_text() == absent.read_text() == f"from {who}\n",
    ),
    "DELETE": Op(
        "write",
        "{area}/del-{who}.txt",
        "{area}/gone-{who}.txt",
        ("2.02", "4.04"),
        lambda c, uri, who: c.delete(uri),
        lambda present, absent, who: not present.exists() and not absent.exists(),
    ),
    "PUT dir/": Op(
        "write",
        "{area}/sub-{who}/",
        "{area}/dir-{who}/",
        ("2.04", "2.01"),
        lambda c, uri, who: c.put(uri, b""),
        lambda present, absent, who: present.is_dir() and absent.is_dir(),
    ),
    "DELETE dir/": Op(
        "write",
        "{area}/rmdir-{who}/",
        "{area}/norm-{who}/",
        ("2.02", "4.04"),
        lambda c, uri, who: c.delete(uri),
        lambda present, absent, who: not present.exists() and not absent.exists(),
    ),
}


def code(response: aiocoap.Message) -> str:
    return response.code.dotted


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("who", WHO)
def test_every_method_in_every_area(served: Served, who: str, op: str) -> None:
    """Allowed: done, with the usual codes. Refused: the same code and diagnostic for a path
    that exists and for one that does not, and nothing on disk changed."""
    spec = OPS[op]
    client = served.clients[who]
    for area in AREAS:
        refusal = (READ if spec.permission == "read" else WRITE)[who][area]
        present = spec.present.format(area=area, who=who)
        absent = spec.absent.format(area=area, who=who)
        before = snapshot(served.root)
        answers = [spec.send(client, served.uri(p), who) for p in (present, absent)]
        where = f"{who} {op} in {area}/: {answers}"
        if refusal is None:
            assert tuple(code(a) for a in answers) == spec.done, where
            assert spec.effect(served.root / present, served.root / absent, who), where
            continue
        assert [code(a) for a in answers] == [refusal, refusal], where
        assert answers[0].payload == answers[1].payload, where
        assert 0 < len(answers[0].payload) <= 64, where
        assert snapshot(served.root) == before, where


def test_no_rule_beneath_allows_what_a_deeper_rule_forbids(served: Served) -> None:
    """firmware/locked/ is nobody's to write: not Alice's file by file, nor by deleting
    firmware/ with everything in it; an anonymous writer is told 4.03 there, since no
    authentication would help."""
    alice, anonymous = served.clients["alice"], served.clients["anonymous"]
    before = snapshot(served.root)
    assert code(alice.put(served.uri("firmware/locked/new.bin"), b"x")) == "4.03"
    assert code(alice.delete(served.uri("firmware/locked/fw.bin"))) == "4.03"
    assert code(alice.put(served.uri("firmware/locked/sub/"), b"")) == "4.03"
    assert code(alice.delete(served.uri("firmware/"))) == "4.03"
    assert code(anonymous.put(served.uri("firmware/locked/new.bin"), b"x")) == "4.03"
    assert code(anonymous.put(served.uri("firmware/x.bin"), b"x")) == "4.01"
    assert snapshot(served.root) == before


def test_an_upload_is_refused_at_its_first_block(served: Served) -> None:
    """Before anything is spooled: block 0 of Bob's or an anonymous upload to firmware/ is
    already the refusal, where Alice's is a 2.31 Continue."""

    def block(who: str, num: int, more: bool) -> str:
        message = aiocoap.Message(
            code=aiocoap.PUT,
            uri=served.uri("firmware/upload.bin"),
            payload=b"x" * 1024,
            block1=BlockwiseTuple(num, more, 6),
        )
        client = served.clients[who]

        async def send() -> aiocoap.Message:
            return await client.context.request(message, handle_blockwise=False).response

        return code(client.run(send()))

    assert block("anonymous", 0, True) == "4.01"
    assert block("bob", 0, True) == "4.03"
    assert not (served.root / "firmware" / "upload.bin").exists()
    assert (block("alice", 0, True), block("alice", 1, False)) == ("2.31", "2.01")
    assert (served.root / "firmware" / "upload.bin").read_bytes() == b"x" * 2048


def test_listings_show_what_each_may_read_with_an_etag_of_their_own(served: Served) -> None:
    root_listing = {
        "anonymous": b"</public/>;ct=40",
        "bob": b"</firmware/>;ct=40,</public/>;ct=40",
        "alice": b"</firmware/>;ct=40,</private/>;ct=40,</public/>;ct=40",
    }
    etags = {}
    for who, expected in root_listing.items():
        response = served.clients[who].get(served.uri(""))
        assert (code(response), response.payload) == ("2.05", expected), who
        etags[who] = response.opt.etag
        assert served.clients[who].get(served.uri("")).opt.etag == etags[who], who
    assert len(set(etags.values())) == 3, etags
    # An ETag validates the variant it was given with, not another peer's.
    anonymous = served.clients["anonymous"]
    assert code(anonymous.get(served.uri(""), etag=etags["anonymous"])) == "2.03"
    assert code(anonymous.get(served.uri(""), etag=etags["alice"])) == "2.05"
    # Nothing beneath firmware/ is governed otherwise for reading: Bob sees all of it.
    listing = served.clients["bob"].get(served.uri("firmware/")).payload
    assert b"</firmware/locked/>;ct=40" in listing and b"</firmware/file.txt>" in listing


def test_every_change_is_logged_with_identity_size_and_etag(served: Served) -> None:
    alice = served.clients["alice"]
    payload = b"firmware image v2\n" * 100
    response = alice.put(served.uri("firmware/logged.bin"), payload)
    assert code(response) == "2.01"
    etag = response.opt.etag.hex()
    line = re.compile(
        rf":alice@127\.0\.0\.1:\d+ created /firmware/logged\.bin {len(payload)} B ETag {etag}$",
        re.M,
    )
    wait_until(lambda: line.search(served.server.log()), what=line.pattern)
    assert code(alice.delete(served.uri("firmware/logged.bin"))) == "2.02"
    deleted = re.compile(r":alice@127\.0\.0\.1:\d+ deleted /firmware/logged\.bin$", re.M)
    wait_until(lambda: deleted.search(served.server.log()), what=deleted.pattern)


NETWORK_RULES = """
[[access]]
path = "net/"
read = "127.0.0.0/8"
write = "::1/128"
"""


def test_rules_by_source_network(start_server: Servers, tmp_path: Path) -> None:
    """net/ is readable from 127.0.0.0/8 and writable from ::1 (the server listens on both);
    from each, the other is 4.03 (no authentication would help), and a listing from ::1
    leaves net/ out."""
    root = tmp_path / "root"
    (root / "net").mkdir(parents=True)
    (root / "net" / "a.txt").write_text("a\n")
    (root / "other.txt").write_text("other\n")
    conf = tmp_path / "server.toml"
    conf.write_text(NETWORK_RULES)
    port = free_udp_port()
    v4, v6 = f"coap://127.0.0.1:{port}", f"coap://[::1]:{port}"
    binds = ("--bind", f"127.0.0.1:{port}", "--bind", f"[::1]:{port}")
    server = start_server.start("-v", *binds, "--config", str(conf), str(root))
    v4client, v6client = Client(), Client()
    try:
        server.wait_ready(lambda: v4client.answers(f"{v4}/other.txt"))
        ready = re.compile(r"Ready: .*, read-write, ")  # writable by a rule, not write = true
        wait_until(lambda: ready.search(server.log()), what=ready.pattern, details=server.log)
        assert code(v4client.get(f"{v4}/net/a.txt")) == "2.05"
        refused = v4client.put(f"{v4}/net/b.txt", b"b\n")
        assert code(refused) == "4.03" and refused.payload
        assert not (root / "net" / "b.txt").exists()
        refused = v6client.get(f"{v6}/net/a.txt")
        assert code(refused) == "4.03" and refused.payload
        assert code(v6client.put(f"{v6}/net/b.txt", b"b\n")) == "2.01"
        assert (root / "net" / "b.txt").read_text() == "b\n"
        assert v4client.get(f"{v4}/").payload == b"</net/>;ct=40,</other.txt>"
        assert v6client.get(f"{v6}/").payload == b"</other.txt>"
        # Without an identity, a change is logged with the address it came from.
        logged = re.compile(r"^.*\[::1\]:\d+ created /net/b\.txt 2 B ETag [0-9a-f]{16}$", re.M)
        wait_until(lambda: logged.search(server.log()), what=logged.pattern)
    finally:
        v4client.close()
        v6client.close()


def test_a_reload_that_revokes_reading_ends_that_observation(
    start_server: Servers, tmp_path: Path
) -> None:
    """Bob and Alice observe a firmware file; the rules change so that only Alice may read
    firmware/, and the server reloads: Bob gets a final 4.03 that ends his observation,
    Alice keeps getting notifications."""
    root = tmp_path / "root"
    populate(root)
    identities = Identities(tmp_path / "identities", "alice", "bob")
    conf = tmp_path / "server.toml"
    conf.write_text(RULES)
    server = start_server.start(
        "-v", "--config", str(conf), "--credentials", str(identities.server), root=root, notify=True
    )
    assert server.port is not None and server.notify is not None
    server.notify.wait_for("READY")
    alice = Client(identities.client("alice", server.port))
    bob = Client(identities.client("bob", server.port))
    try:
        uri = server.uri("firmware/file.txt")
        observers = {"alice": Observer(alice, uri), "bob": Observer(bob, uri)}
        for who, observer in observers.items():
            assert observer.first.code == codes.CONTENT and observer.first.opt.observe is not None
            assert observer.first.payload == b"firmware content\n", who

        conf.write_text(RULES.replace('read = "authenticated"', 'read = ":alice"'))
        server.send(signal.SIGHUP)
        server.notify.wait_for("RELOADING")
        assert "FAILED" not in server.notify.wait_for("READY")["STATUS"]

        bob_observer = observers["bob"]
        assert bob_observer.wait_ended(), bob_observer.notifications
        final = (
            bob_observer.notifications[-1]
            if bob_observer.notifications
            else bob_observer.ended.coapmessage
        )
        assert final.code == codes.FORBIDDEN and final.payload, final
        assert code(bob.get(uri)) == "4.03"

        (root / "firmware" / "file.txt").write_text("firmware v2\n")
        notified = observers["alice"].wait_for(lambda m: m.payload == b"firmware v2\n")
        assert notified is not None and notified.code == codes.CONTENT
        assert observers["alice"].ended is None
        observers["alice"].cancel()
    finally:
        alice.close()
        bob.close()


WARNING = "write = true and no [[access]] rule restricts writing"


def test_write_true_beyond_loopback_without_a_rule_is_warned_of(
    start_server: Servers, tmp_path: Path
) -> None:
    """At start and after every reload that changes write, the rules or the binds: warned of
    when anyone may write and the server is reachable beyond loopback, not otherwise. The
    server runs in a (user and) network namespace of its own, so binding all addresses
    exposes nothing."""
    unshare, ip = require("unshare", "util-linux"), require("ip", "iproute2")
    net = [unshare, "--user", "--map-root-user", "--net"]
    wrapper = [*net, "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]
    root = tmp_path / "root"
    root.mkdir()
    conf = tmp_path / "server.toml"
    restricted = '[[access]]\npath = "/"\nwrite = "127.0.0.0/8"\n'

    def configure(bind: str, rules: str = "") -> None:
        conf.write_text(f'root = "{root}"\nwrite = true\nbind = [{bind}]\n{rules}')

    configure("")  # all addresses
    server = start_server.start("-v", "--config", str(conf), wrapper=wrapper, notify=True)
    assert server.notify is not None
    server.notify.wait_for("READY")
    warned = [server.log().count(WARNING)]
    for bind, rules in [
        ('"127.0.0.1:5683", "[::1]:5683"', ""),  # loopback only
        ('"[::]:5683"', restricted),  # beyond, but a rule says who writes
        ('"[::]:5683"', ""),  # beyond, and anyone writes
        ('"[::]:5683"', ""),  # unchanged: said once is enough
    ]:
        configure(bind, rules)
        server.send(signal.SIGHUP)
        server.notify.wait_for("RELOADING")
        assert "FAILED" not in server.notify.wait_for("READY")["STATUS"], server.log()
        warned.append(server.log().count(WARNING))
    assert warned == [1, 1, 1, 2, 2], server.log()
    assert "anyone who can reach all addresses may replace and delete files" in server.log()
    assert "anyone who can reach [::]:5683 may" in server.log()


@pytest.mark.parametrize(
    "rules, key, value, expected",
    [
        (
            '[[access]]\npath = "/"\nread = "anyone"\n'
            '[[access]]\npath = "firmware/"\nwrite = ":mallory"\n',
            "access[2].write",
            '":mallory"',
            "unknown credential label; expected a label of the credentials file",
        ),
        (
            '[[access]]\npath = "lan/"\nread = "192.168.1.1/24"\n',
            "access[1].read",
            '"192.168.1.1/24"',
            "expected a network without host bits (e.g. 192.168.1.0/24)",
        ),
        (
            '[[access]]\npath = "lan/"\nwrite = "::ffff:192.168.1.7"\n',
            "access[1].write",
            '"::ffff:192.168.1.7"',
            'expected its IPv4 form "192.168.1.7" (IPv4-mapped peers are matched as IPv4)',
        ),
        (
            '[[access]]\npath = "lan/"\nread = "my-laptop"\n',
            "access[1].read",
            '"my-laptop"',
            'expected "anyone", "authenticated", a credential label',
        ),
        (
            '[[access]]\npath = "firmware"\nread = "anyone"\n'
            '[[access]]\npath = "/firmware/"\nwrite = ":alice"\n',
            "access[2].path",
            '"/firmware/"',
            "expected each prefix once (rule [1] has it)",
        ),
        (
            '[[access]]\npath = "firmware/"\nwirte = ":alice"\n',
            "access[1].wirte",
            '":alice"',
            "expected one of path, read, write",
        ),
    ],
    ids=[
        "unknown label",
        "host bits",
        "IPv4-mapped",
        "no principal",
        "duplicate prefix",
        "unknown key",
    ],
)
def test_check_config_finds_bad_rules(
    tmp_path: Path, rules: str, key: str, value: str, expected: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    identities = Identities(tmp_path / "identities", "alice", "bob")
    conf = tmp_path / "server.toml"
    conf.write_text(f'root = "{root}"\ncredentials = "{identities.server}"\n{rules}')
    result = run_coapfs(
        ["--check-config", "--config", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == EX_CONFIG, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{conf}: {key} = {value}: " in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr
