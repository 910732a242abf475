"""Two replicas on one distributed file system: a real GlusterFS replica-2 volume (private
glusterd in the test's own network namespace), mounted twice with FUSE, each mount served by a
real server with writes allowed (A serves mount 1, B mount 2), the real aiocoap client talking to
both. One volume and one pair of servers for the module (setup about 4 s).

What must hold across replicas: equal ETags for one file state (also after a restart), a
block-wise download that moves from A to B is whole (and a change meanwhile shows as a new
ETag), Observe on B follows changes made through A within a few poll intervals, If-None-Match
and If-Match have exactly one winner when A and B race (and locking a file being replaced
through the other mount never fails), and a server's sweep of abandoned upload spools spares
another replica's upload in progress."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import BlockOption

from coapfs.tree.hidden import SPOOL_PREFIX
from coapfs.tree.locks import locked_existing

from support.client import Client
from support.files import spool_files
from support.gluster import GlusterVolume
from support.observer import Observer
from support.polling import wait_until
from support.server import Server, Servers

pytestmark = pytest.mark.needs_root

POLL_INTERVAL = 0.2
#: A change made through the other replica reaches an observer within this: a poll interval, the
#: notification's coalescing (100 ms), the round trip, and slack for two loaded cores.
NOTICED_WITHIN = 5 * POLL_INTERVAL + 1.0
ROUNDS = 20


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterVolume]:
    volume = GlusterVolume(tmp_path_factory.mktemp("gluster"))
    yield volume
    volume.close()


@dataclass
class Replicas:
    volume: GlusterVolume
    servers: Servers
    config: Path
    a: Server
    b: Server

    def start(self, mount: Path) -> Server:
        server = self.servers.start(
            "-v",
            "--write",
            "--config",
            str(self.config),
            root=mount,
            wrapper=self.volume.enter_mounts(),
        )
        client = self.servers.client
        server.wait_ready(lambda: client.answers(server.uri(".well-known/core")))
        return server

    def restart_b(self) -> Server:
        assert self.b.stop() == 0, self.b.log()
        self.b = self.start(self.volume.mounts[1])
        return self.b

    def path(self, name: str) -> Path:
        """`name` on the volume, as this process reads it (through mount 1)."""
        return self.volume.outside(self.volume.mounts[0]) / name


@pytest.fixture(scope="module")
def replicas(
    volume: GlusterVolume, start_module_server: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Replicas:
    config = tmp_path_factory.mktemp("replica-config") / "replica.toml"
    config.write_text(f"[cache]\npoll_interval = {POLL_INTERVAL}\n")
    replicas = Replicas(volume, start_module_server, config, None, None)  # type: ignore[arg-type]
    replicas.a = replicas.start(volume.mounts[0])
    replicas.b = replicas.start(volume.mounts[1])
    return replicas


def directory(replicas: Replicas, name: str) -> str:
    """A fresh directory on the volume for one test (made through mount 1)."""
    replicas.path(name).mkdir()
    return name


# --- change detection -------------------------------------------------------------------------


def test_each_replica_polls_its_fuse_root(replicas: Replicas) -> None:
    """inotify on one mount sees nothing of what is written through the other: both servers find
    their root on FUSE and say they poll it, at the configured interval."""
    for server, mount in (
        (replicas.a, replicas.volume.mounts[0]),
        (replicas.b, replicas.volume.mounts[1]),
    ):
        line = (
            f"watching {mount} by polling every {POLL_INTERVAL:g} s "
            "(fuse: inotify does not see changes made by other machines)"
        )
        assert line in server.log(), server.log()


# --- ETags ------------------------------------------------------------------------------------


def test_a_file_put_through_a_is_served_by_b_with_the_same_etag(
    client: Client, replicas: Replicas
) -> None:
    base = directory(replicas, "etags")
    a, b = replicas.a, replicas.b
    created = client.put(a.uri(f"{base}/f.txt"), b"version 1")
    assert created.code == codes.CREATED and created.opt.etag, created
    etag = created.opt.etag

    for server in (b, a):
        got = client.get(server.uri(f"{base}/f.txt"))
        assert (got.code, got.payload, got.opt.etag) == (codes.CONTENT, b"version 1", etag), server
    assert client.get(b.uri(f"{base}/f.txt"), etags=[etag]).code == codes.VALID
    listings = [client.get(server.uri(f"{base}/")) for server in (a, b)]
    assert listings[0].payload == listings[1].payload == f"</{base}/f.txt>".encode()
    assert listings[0].opt.etag == listings[1].opt.etag is not None

    changed = client.put(b.uri(f"{base}/f.txt"), b"version 2")
    assert changed.code == codes.CHANGED and changed.opt.etag not in (None, etag), changed
    new = changed.opt.etag
    got = client.get(a.uri(f"{base}/f.txt"), etags=[etag])
    assert (got.code, got.payload, got.opt.etag) == (codes.CONTENT, b"version 2", new)

    # A device that saved the ETag resumes after B restarted: the ETag is the same.
    b = replicas.restart_b()
    got = client.get(b.uri(f"{base}/f.txt"))
    assert (got.code, got.payload, got.opt.etag) == (codes.CONTENT, b"version 2", new)
    assert client.get(b.uri(f"{base}/f.txt"), etags=[new]).code == codes.VALID


def test_a_restarted_replica_sweeps_stale_spools_but_not_an_upload_in_progress_elsewhere(
    client: Client, replicas: Replicas
) -> None:
    """At start-up a server removes upload spools left by interrupted writes once they are older
    than [upload] idle_timeout (60 s), on the shared volume too; another replica's upload in
    progress is left alone and completes, even where its spool looks as old (to a replica whose
    clock runs ahead, or with a shorter idle_timeout): its writer holds a lock on it."""
    base = directory(replicas, "sweep")
    two_minutes_ago = (time.time() - 120, time.time() - 120)
    stale = replicas.path(f"{base}/{SPOOL_PREFIX}left-by-a-crash")
    stale.write_bytes(b"half an upload")
    os.utime(stale, two_minutes_ago)
    payload = os.urandom(3000)
    uri = replicas.a.uri(f"{base}/uploaded.bin")
    first = put_block(client, uri, payload, 0, if_none_match=True)
    assert first.code == codes.CONTINUE, first
    in_progress = [p for p in spool_files(replicas.path(base)) if p != stale]
    assert len(in_progress) == 1, spool_files(replicas.path(base))
    os.utime(in_progress[0], two_minutes_ago)

    b = replicas.restart_b()
    wait_until(
        lambda: "Removed 1 file(s) left behind by interrupted writes" in b.log(),
        10,
        what="B sweeps the stale spool",
        details=b.log,
    )
    assert not stale.exists()
    assert in_progress[0].exists()
    for number in (1, 2):
        last = put_block(client, uri, payload, number, if_none_match=True)
    assert last.code == codes.CREATED, last
    assert replicas.path(f"{base}/uploaded.bin").read_bytes() == payload
    assert spool_files(replicas.path(base)) == []


# --- block-wise downloads ---------------------------------------------------------------------


def get_block(client: Client, server: Server, name: str, number: int) -> aiocoap.Message:
    block = client.get(server.uri(name), block2=BlockOption.BlockwiseTuple(number, False, 6))
    assert block.code == codes.CONTENT, (server, number, block)
    assert block.opt.block2.block_number == number
    return block


@pytest.mark.parametrize("size", [20_000, 100_000], ids=["kept whole", "read by block"])
def test_a_blockwise_download_started_on_a_is_finished_on_b(
    client: Client, replicas: Replicas, size: int
) -> None:
    """1024-byte blocks: the first third from A, the rest from B; every block has the ETag of
    the upload and the blocks make the file. Then a download whose file is replaced through A
    halfway: B's next block carries a new ETag, so the client knows to start over."""
    base = directory(replicas, f"download-{size}")
    a, b = replicas.a, replicas.b
    content = os.urandom(size)
    put = client.put(a.uri(f"{base}/image.bin"), content)
    assert put.code == codes.CREATED, put
    count = -(-size // 1024)

    blocks = [
        get_block(client, a if number < count // 3 else b, f"{base}/image.bin", number)
        for number in range(count)
    ]
    assert {block.opt.etag for block in blocks} == {put.opt.etag}
    assert [block.opt.block2.more for block in blocks] == [True] * (count - 1) + [False]
    assert b"".join(block.payload for block in blocks) == content

    first = get_block(client, a, f"{base}/image.bin", 0)
    replaced = client.put(a.uri(f"{base}/image.bin"), os.urandom(size))
    assert replaced.code == codes.CHANGED
    later = get_block(client, b, f"{base}/image.bin", count // 2)
    assert later.opt.etag == replaced.opt.etag != first.opt.etag


@pytest.mark.parametrize("size", [1000, 100_000], ids=["kept whole", "read by block"])
def test_b_serves_a_file_that_is_replaced_through_the_other_mount_meanwhile(
    client: Client, replicas: Replicas, size: int
) -> None:
    """While the file is replaced through mount 1 again and again (as A commits a PUT: a spool
    renamed over it), B answers every GET with one whole version: never 4.04 or 5.03 (GlusterFS
    answers ENOENT or ESTALE for the replaced inode between finding the name and reading it),
    and one ETag never stands for two contents."""
    base = directory(replicas, f"replaced-{size}")
    folder = replicas.path(base)
    (folder / "hot.bin").write_bytes(bytes([0]) * size)
    stop = threading.Event()
    replaced = []

    def replace_again_and_again() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            spool = folder / f"{SPOOL_PREFIX}replacing"
            spool.write_bytes(bytes([version % 256]) * size)
            os.rename(spool, folder / "hot.bin")
            replaced.append(version)

    writer = threading.Thread(target=replace_again_and_again)
    writer.start()
    answers = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            block2 = BlockOption.BlockwiseTuple(size // 2048, False, 6)
            got = client.get(replicas.b.uri(f"{base}/hot.bin"), block2=block2)
            answers.append((got.code, got.payload[:100], got.opt.etag, got.payload))
    finally:
        stop.set()
        writer.join()
    assert len(replaced) > 20, "the file was hardly replaced: the test proves little"
    failed = [(code, diagnostic) for code, diagnostic, _, _ in answers if code != codes.CONTENT]
    assert failed == [], f"{len(failed)} of {len(answers)} GETs failed"
    contents: dict[bytes, set[bytes]] = {}
    for _, _, etag, payload in answers:
        assert len(set(payload)) == 1, "a block mixes two versions"
        contents.setdefault(etag, set()).add(payload)
    assert all(len(c) == 1 for c in contents.values()), "one ETag for two contents"


# --- Observe ----------------------------------------------------------------------------------


def test_observing_on_b_follows_changes_made_through_a(client: Client, replicas: Replicas) -> None:
    """A file and its directory observed on B; a PUT, a new file and a DELETE through A each
    reach B's observers within a few poll intervals."""
    base = directory(replicas, "observed")
    a, b = replicas.a, replicas.b
    assert client.put(a.uri(f"{base}/state.txt"), b"state 1").code == codes.CREATED
    on_file = Observer(client, b.uri(f"{base}/state.txt"))
    on_dir = Observer(client, b.uri(f"{base}/"))
    assert on_file.first.payload == b"state 1" and on_file.first.opt.observe is not None
    assert on_dir.first.opt.observe is not None

    put = client.put(a.uri(f"{base}/state.txt"), b"state 2")
    changed = time.monotonic()
    seen = on_file.wait_for(lambda m: m.payload == b"state 2", NOTICED_WITHIN)
    latency = time.monotonic() - changed
    assert seen is not None, on_file.notifications
    assert seen.opt.etag == put.opt.etag
    assert latency < NOTICED_WITHIN

    assert client.put(a.uri(f"{base}/new.txt"), b"new").code == codes.CREATED
    link = f"</{base}/new.txt>".encode()
    assert on_dir.wait_for(lambda m: link in m.payload, NOTICED_WITHIN) is not None

    assert client.delete(a.uri(f"{base}/state.txt")).code == codes.DELETED
    assert on_file.wait_ended(NOTICED_WITHIN)
    final = on_file.notifications[-1] if on_file.notifications else on_file.ended.coapmessage
    assert final.code == codes.NOT_FOUND
    on_dir.cancel()


# --- preconditions across replicas ------------------------------------------------------------


def put_block(client: Client, uri: str, payload: bytes, number: int, **options) -> aiocoap.Message:
    """Block `number` (1024 bytes, szx 6) of an upload of `payload`, sent as it is."""
    chunk = payload[number * 1024 : (number + 1) * 1024]
    more = (number + 1) * 1024 < len(payload)
    message = aiocoap.Message(
        code=aiocoap.PUT,
        uri=uri,
        payload=chunk,
        block1=BlockOption.BlockwiseTuple(number, more, 6),
        **options,
    )

    async def send() -> aiocoap.Message:
        return await client.context.request(message, handle_blockwise=False).response

    return client.run(send())


async def put_both(
    context: aiocoap.Context, uris: list[str], payloads: list[bytes], *, staged: bool, **options
) -> list[aiocoap.Message]:
    """One PUT to each URI at once. `staged`: block-wise, and every upload's first block is
    taken (its precondition checked and passed) before any last block is sent, so both reach
    the commit."""

    async def request(uri: str, payload: bytes, block1=None) -> aiocoap.Message:
        message = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=payload, **options)
        if block1 is not None:
            message.opt.block1 = block1
        return await context.request(message, handle_blockwise=block1 is None).response

    if not staged:
        return await asyncio.gather(*(request(u, p) for u, p in zip(uris, payloads, strict=True)))
    firsts = await asyncio.gather(
        *(
            request(u, p[:1024], BlockOption.BlockwiseTuple(0, True, 6))
            for u, p in zip(uris, payloads, strict=True)
        )
    )
    assert [f.code for f in firsts] == [codes.CONTINUE] * len(uris), firsts
    return await asyncio.gather(
        *(
            request(u, p[1024:], BlockOption.BlockwiseTuple(1, False, 6))
            for u, p in zip(uris, payloads, strict=True)
        )
    )


def race(
    client: Client, replicas: Replicas, name: str, i: int, staged: bool, **precondition: Any
) -> tuple[list[aiocoap.numbers.Code], list[bytes], bytes, list[bytes]]:
    """Round `i`: PUTs of `name` through A and through B at once, each with `precondition`
    and its own content; their codes, the diagnostics of the failed, what the file then holds,
    and the two contents (A's first)."""
    size = 1500 if staged else 600
    payloads = [bytes([i, side]) * (size // 2) for side in (0, 1)]
    uris = [replicas.a.uri(name), replicas.b.uri(name)]
    responses = client.run(put_both(client.context, uris, payloads, staged=staged, **precondition))
    got = [r.code for r in responses]
    diagnostics = [r.payload[:100] for r in responses if not r.code.is_successful()]
    return got, diagnostics, replicas.path(name).read_bytes(), payloads


STAGINGS = pytest.mark.parametrize(
    "staged", [False, True], ids=["single datagrams at once", "block-wise, both past block 0"]
)


@STAGINGS
def test_if_none_match_puts_through_a_and_b_have_one_winner(
    client: Client, replicas: Replicas, staged: bool
) -> None:
    """Rounds of one new name PUT with If-None-Match through A and through B at once: one 2.01,
    one 4.12, the file is the winner's, nothing is left spooled."""
    base = directory(replicas, f"create-{'staged' if staged else 'at-once'}")
    results = [
        race(client, replicas, f"{base}/new-{i}.bin", i, staged, if_none_match=True)
        for i in range(ROUNDS)
    ]
    for i, (got, diagnostics, content, payloads) in enumerate(results):
        assert sorted(got) == [codes.CREATED, codes.PRECONDITION_FAILED], (i, got, diagnostics)
        assert content == payloads[got.index(codes.CREATED)], i
    assert spool_files(replicas.path(base)) == []


@STAGINGS
def test_if_match_puts_through_a_and_b_have_one_winner(
    client: Client, replicas: Replicas, staged: bool
) -> None:
    """Rounds of PUTs through A and through B at once, both with If-Match carrying the file's
    current ETag (the same on both): one 2.04, one 4.12, the file is the winner's."""
    base = directory(replicas, f"replace-{'staged' if staged else 'at-once'}")
    a, b = replicas.a, replicas.b
    name = f"{base}/contested.bin"
    assert client.put(a.uri(name), b"initial").code == codes.CREATED
    results = []
    for i in range(ROUNDS):
        etag = client.get(b.uri(name)).opt.etag
        assert client.get(a.uri(name)).opt.etag == etag
        results.append(race(client, replicas, name, i, staged, if_match=[etag]))
    for i, (got, diagnostics, content, payloads) in enumerate(results):
        assert sorted(got) == [codes.CHANGED, codes.PRECONDITION_FAILED], (i, got, diagnostics)
        assert content == payloads[got.index(codes.CHANGED)], i
    assert spool_files(replicas.path(base)) == []


def test_locking_a_file_that_the_other_mount_replaces_meanwhile(replicas: Replicas) -> None:
    """What a commit through B does while A replaces the file under its lock: B waits, then
    locks the file A put there. GlusterFS answers ENOENT or ESTALE for the replaced inode here
    (from fstat, flock, even close), about once in 40 rounds; none may fail the commit."""
    base = directory(replicas, "locking")
    mounts = [replicas.volume.outside(m) / base for m in replicas.volume.mounts]
    a, b = (os.open(m, os.O_RDONLY | os.O_DIRECTORY) for m in mounts)

    def lock_through_b(waiting: threading.Event, locked: list) -> None:
        waiting.wait()
        try:
            with locked_existing(b, "f") as st:
                locked.append(st)
        except OSError as e:
            locked.append(e)

    try:
        (mounts[0] / "f").write_bytes(b"0")
        results = []
        for i in range(150):
            (mounts[0] / f"{SPOOL_PREFIX}next").write_bytes(b"%d" % (i + 1))
            waiting, locked = threading.Event(), []
            thread = threading.Thread(target=lock_through_b, args=(waiting, locked))
            thread.start()
            with locked_existing(a, "f"):
                waiting.set()
                time.sleep(0.002)  # B is waiting for the lock
                os.rename(f"{SPOOL_PREFIX}next", "f", src_dir_fd=a, dst_dir_fd=a)
            thread.join()
            # What B locked is what A put there (looked at through A: a look through B would
            # refresh B's view, which the next round must find stale).
            results.append((locked[0], os.stat("f", dir_fd=a).st_ino))
        failures = [(i, got) for i, (got, _) in enumerate(results) if isinstance(got, OSError)]
        assert failures == []
        assert all(got.st_ino == ino for got, ino in results)
    finally:
        os.close(a)
        os.close(b)
