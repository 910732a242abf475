"""Uploads against the real server: streamed to disk (flat memory for 16 MiB), preconditions
race-free (one winner among concurrent If-None-Match or If-Match PUTs), nothing visible after a
`kill -9` in the middle of an upload, a full disk answered cleanly with nothing left on it, the
[upload] limits (size, concurrency, idle timeout), the modes of what is created, and the
Content-Format a PUT stores with the file."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from coapfs.tree.attributes import CONTENT_FORMAT

from support.client import Client
from support.files import spool_files
from support.ondisk import snapshot
from support.polling import wait_until
from support.process import held_spools, peak_rss, seen_by, with_own_mount
from support.raw import (
    BLOCK1,
    GET,
    PUT,
    SIZE1,
    Options,
    RawServer,
    Response,
    block,
    path,
    uint,
)
from support.server import Server, Servers
from support.tools import missing

MiB = 1024 * 1024
MAX_AGE = 14


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def server(start_module_server: Servers, root: Path) -> Server:
    """One writable server for the tests that need nothing else of it."""
    return start_module_server(root, "--write")


def put_block(
    server: RawServer, name: str, num: int, payload: bytes, *, more: bool, options=()
) -> Response:
    """Block `num` (1024 bytes a block but the last) of an upload to `name` ("dir/file")."""
    target = path(*name.split("/"))
    return ask(server, PUT, [*target, *options, (BLOCK1, block(num, more, 6))], payload)


def ask(server: RawServer, code: int, options: Options, payload: bytes = b"") -> Response:
    response = server.request(code, options, payload)
    assert response is not None, f"no answer to {code} {options}"
    return response


def size1(response: Response) -> int | None:
    value = response.opt(SIZE1)
    return None if value is None else int.from_bytes(value, "big")


# --- streamed to disk -------------------------------------------------------------------------


def test_a_16_mib_upload_is_streamed_to_disk(start_server: Servers, tmp_path: Path) -> None:
    """Block by block (szx 6) through aiocoap's client: the server's peak memory grows by far
    less than the upload (assembling it in memory would add at least its 16 MiB), the file is
    exactly what was sent, and no spool is left or held."""
    root = tmp_path / "root"
    root.mkdir()
    server = start_server(root, "--write")
    client = start_server.client
    warm = os.urandom(64 * 1024)  # the upload code paths, run once before measuring
    assert client.put(server.uri("warm.bin"), warm).code == codes.CREATED
    data = os.urandom(16 * MiB)
    before = peak_rss(server.proc.pid)
    response = client.put(server.uri("big.bin"), data, timeout=300)
    growth = peak_rss(server.proc.pid) - before
    assert response.code == codes.CREATED, response
    assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert growth < 8 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for a 16 MiB upload"
    assert not spool_files(root)
    assert held_spools(server.proc.pid, root) == []


# --- preconditions without races ----------------------------------------------------------------


def test_concurrent_if_none_match_puts_have_one_winner(server: Server, root: Path) -> None:
    """50 PUTs of one new name with If-None-Match at once: one 2.01, 49 4.12, and the file is
    the winner's payload, whole."""
    client = Client()
    uri = server.uri("once.bin")
    payloads = [bytes([i]) * (300 + i) for i in range(50)]

    async def race() -> list[aiocoap.Message]:
        requests = [
            client.context.request(
                aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=p, if_none_match=True)
            ).response
            for p in payloads
        ]
        return await asyncio.gather(*requests)

    try:
        responses = client.run(race(), timeout=120)
    finally:
        client.close()
    got = [r.code for r in responses]
    assert got.count(codes.CREATED) == 1, got
    assert got.count(codes.PRECONDITION_FAILED) == 49, got
    winner = payloads[got.index(codes.CREATED)]
    assert (root / "once.bin").read_bytes() == winner
    assert not spool_files(root)


@pytest.mark.parametrize("size", [200, 2500], ids=["single datagram", "block-wise"])
def test_concurrent_if_match_puts_with_the_same_etag_have_one_winner(
    server: Server, root: Path, size: int
) -> None:
    """50 rounds: two clients (two endpoints, so block-wise uploads do not collide) PUT at once
    with If-Match carrying the file's current ETag; one gets 2.04, the other 4.12, and the file
    is the winner's."""
    name = f"contested-{size}.bin"
    (root / name).write_bytes(b"initial")
    uri = server.uri(name)
    client = Client()

    async def put(context: aiocoap.Context, payload: bytes, etag: bytes) -> aiocoap.Message:
        message = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=payload, if_match=[etag])
        return await context.request(message).response

    async def rounds() -> list[tuple[list[aiocoap.numbers.Code], bytes, list[bytes]]]:
        contexts = [client.context, await aiocoap.Context.create_client_context()]
        results = []
        try:
            for i in range(50):
                get = aiocoap.Message(code=aiocoap.GET, uri=uri)
                etag = (await client.context.request(get).response).opt.etag
                payloads = [bytes([i, side]) * (size // 2) for side in (0, 1)]
                responses = await asyncio.gather(
                    *(put(c, p, etag) for c, p in zip(contexts, payloads, strict=True))
                )
                content = (root / name).read_bytes()
                results.append(([r.code for r in responses], content, payloads))
        finally:
            await contexts[1].shutdown()
        return results

    try:
        results = client.run(rounds(), timeout=300)
    finally:
        client.close()
    for i, (got, content, payloads) in enumerate(results):
        assert sorted(got) == [codes.CHANGED, codes.PRECONDITION_FAILED], (i, got)
        assert content == payloads[got.index(codes.CHANGED)], i
    assert not spool_files(root)


def test_a_delete_and_a_put_with_the_same_etag_have_one_winner(server: Server, root: Path) -> None:
    """30 rounds: a DELETE and a PUT at once, both with If-Match carrying the file's current ETag:
    either the DELETE wins (2.02; the PUT finds nothing: 4.12) or the PUT (2.04; the DELETE
    finds another ETag: 4.12), never both."""
    name = "delete-or-replace.bin"
    uri = server.uri(name)
    client = Client()

    async def rounds() -> list[tuple[list[aiocoap.numbers.Code], bytes | None]]:
        other = await aiocoap.Context.create_client_context()
        results = []
        try:
            for i in range(30):
                (root / name).write_bytes(b"round %d" % i)
                get = aiocoap.Message(code=aiocoap.GET, uri=uri)
                etag = (await client.context.request(get).response).opt.etag
                delete = aiocoap.Message(code=aiocoap.DELETE, uri=uri, if_match=[etag])
                put = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=b"new", if_match=[etag])
                responses = await asyncio.gather(
                    client.context.request(delete).response, other.request(put).response
                )
                path = root / name
                results.append(
                    ([r.code for r in responses], path.read_bytes() if path.exists() else None)
                )
        finally:
            await other.shutdown()
        return results

    try:
        results = client.run(rounds(), timeout=300)
    finally:
        client.close()
    for i, (got, content) in enumerate(results):
        assert got in (
            [codes.DELETED, codes.PRECONDITION_FAILED],
            [codes.PRECONDITION_FAILED, codes.CHANGED],
        ), (i, got)
        assert content == (None if got[0] == codes.DELETED else b"new"), (i, got, content)


def test_a_delete_waiting_for_another_writers_lock_holds_up_nothing_else(
    server: Server, root: Path
) -> None:
    """Another process holds the lock writers take on a file (flock): a DELETE of it waits for
    the lock, and meanwhile the server answers everything else."""
    (root / "locked.bin").write_bytes(b"held")
    (root / "free.txt").write_bytes(b"free")
    client = Client()
    holder = os.open(root / "locked.bin", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        message = aiocoap.Message(code=aiocoap.DELETE, uri=server.uri("locked.bin"))

        async def send() -> aiocoap.Message:
            return await client.context.request(message).response

        delete = asyncio.run_coroutine_threadsafe(send(), client.loop)
        assert client.get(server.uri("free.txt"), timeout=10).payload == b"free"
        assert not delete.done() and (root / "locked.bin").exists()
    finally:
        os.close(holder)  # the lock goes with it
    try:
        assert delete.result(30).code == codes.DELETED
        assert not (root / "locked.bin").exists()
    finally:
        client.close()


# --- kill -9 in the middle of an upload -------------------------------------------------------


def spool_wrapper(kind: str) -> list[str]:
    """For "named": a mount namespace of the server's own in which /proc is an empty tmpfs:
    an unnamed (O_TMPFILE) spool cannot be linked into place there, so uploads are spooled to
    hidden names, as on a file system without unnamed files."""
    if kind == "unnamed":
        return []
    return with_own_mount("/proc")


@pytest.mark.parametrize("kind", ["unnamed", "named"], ids=["unnamed spool", "named spool"])
def test_kill_9_in_the_middle_of_an_upload_leaves_nothing_visible(
    tmp_path: Path, kind: str
) -> None:
    """Two uploads half done, one replacing a file and one making a new one, when the server is
    killed: the directory holds what it held before (named spools go once the restarted server
    has swept them), and the file being replaced is unchanged."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "kept.bin").write_bytes(b"the original\n")
    before = snapshot(root)
    conf = tmp_path / "server.toml"
    conf.write_text("[upload]\nidle_timeout = 1.0\n")
    args = ("--write", "--config", str(conf))
    server = RawServer(root, tmp_path / "server.log", *args, wrapper=spool_wrapper(kind))
    try:
        for name in ("kept.bin", "new.bin"):
            for num in range(3):
                assert put_block(server, name, num, b"x" * 1024, more=True).code == "2.31"
        held = held_spools(server.proc.pid, root)
        assert len(held) == 2, held
        assert len(spool_files(root)) == (2 if kind == "named" else 0)
        server.proc.kill()
        server.proc.wait(10)
    finally:
        server.close()
    if kind == "unnamed":
        assert snapshot(root) == before
    restarted = RawServer(root, tmp_path / "restarted.log", *args, wrapper=spool_wrapper(kind))
    try:
        wait_until(lambda: snapshot(root) == before, 10, what="only what was there before")
        assert ask(restarted, GET, path("new.bin")).code == "4.04"
        assert ask(restarted, GET, path("kept.bin")).payload == b"the original\n"
        restarted.assert_clean()
    finally:
        restarted.close()


def test_an_upload_whose_directory_moves_meanwhile_is_refused(tmp_path: Path) -> None:
    """Between block 0 and the last block the upload's directory is renamed: within the root
    (the file would land at a path the client never named) and out of it (the file would land
    outside the served tree). Both are 4.09, and no file appears anywhere."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    server = RawServer(root_with(root, "inner/", "leaving/"), tmp_path / "server.log", "--write")
    try:
        for name, move_to in (("inner", root / "renamed"), ("leaving", outside / "leaving")):
            assert put_block(server, f"{name}/f.bin", 0, b"x" * 1024, more=True).code == "2.31"
            (root / name).rename(move_to)
            last = put_block(server, f"{name}/f.bin", 1, b"end", more=False)
            assert last.code == "4.09", last
            assert b"moved" in last.payload, last
            assert not (move_to / "f.bin").exists(), move_to
            assert not (root / name).exists()
        assert sorted(p.name for p in root.rglob("*")) == ["renamed"]
        assert list(outside.rglob("*")) == [outside / "leaving"]
        assert put_block(server, "renamed/f.bin", 0, b"here", more=False).code == "2.01"
        server.assert_clean()
    finally:
        server.close()


def root_with(root: Path, *names: str) -> Path:
    """`root` made, with the directories (ending in "/") and files named in it."""
    root.mkdir()
    for name in names:
        if name.endswith("/"):
            (root / name).mkdir()
        else:
            (root / name).write_bytes(b"")
    return root


# --- no space left ----------------------------------------------------------------------------


def test_no_space_left_is_4_13_and_leaves_nothing(tmp_path: Path) -> None:
    """The root is a 256 KiB tmpfs in a user and mount namespace of the server's own (so that
    no privilege is needed): a larger upload
    (no Size1, so the space runs out as blocks arrive) is 4.13 with Size1, or 5.03; the space
    is all given back, nothing is left in the directory (as the server sees it), a file it was
    to replace is unchanged, and the server goes on serving and writing."""
    root = tmp_path / "small"
    root.mkdir()
    wrapper = with_own_mount(root, options="size=256k")
    server = RawServer(root, tmp_path / "server.log", "--write", wrapper=wrapper)
    try:
        inside = seen_by(server.proc.pid, root)
        assert put_block(server, "kept.txt", 0, b"kept\n", more=False).code == "2.01"
        before = snapshot(inside), os.statvfs(inside).f_bfree
        for name in ("kept.txt", "new.bin"):
            code = "2.31"
            for num in range(400):
                response = put_block(server, name, num, b"a" * 1024, more=True)
                code = response.code
                if code != "2.31":
                    break
            assert code in ("4.13", "5.03"), response
            assert response.payload, response
            assert (snapshot(inside), os.statvfs(inside).f_bfree) == before, name
            if code == "4.13":  # what would fit: more than nothing, no more than is free
                free = os.statvfs(inside)
                assert 0 < (size1(response) or 0) <= free.f_bavail * free.f_frsize, response
        assert ask(server, GET, path("kept.txt")).payload == b"kept\n"
        assert put_block(server, "after.txt", 0, b"fits\n", more=False).code == "2.01"
        server.assert_clean()
    finally:
        server.close()


# --- [upload] limits --------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[RawServer, Path]]:
    """A server whose uploads are at most 4 KiB, two at a time, dropped after 2 s idle."""
    root = tmp_path / "root"
    root.mkdir()
    conf = tmp_path / "server.toml"
    conf.write_text("[upload]\nmax_size = 4096\nmax_concurrent = 2\nidle_timeout = 2.0\n")
    server = RawServer(root, tmp_path / "server.log", "--write", "--config", str(conf))
    try:
        yield server, root
        server.assert_clean()
        assert not spool_files(root)
    finally:
        server.close()


def test_max_size_by_size1_at_block_0_and_as_bytes_arrive(limited) -> None:
    server, root = limited
    announced = put_block(
        server, "big.bin", 0, b"a" * 1024, more=True, options=[(SIZE1, uint(5000))]
    )
    assert (announced.code, size1(announced)) == ("4.13", 4096), announced
    assert announced.payload
    assert put_block(server, "big.bin", 1, b"a" * 1024, more=True).code == "4.08"
    for num in range(4):
        assert put_block(server, "big.bin", num, b"a" * 1024, more=True).code == "2.31"
    beyond = put_block(server, "big.bin", 4, b"a" * 1024, more=False)
    assert (beyond.code, size1(beyond)) == ("4.13", 4096), beyond
    assert put_block(server, "big.bin", 5, b"a" * 1024, more=False).code == "4.08"
    assert os.listdir(root) == []
    assert held_spools(server.proc.pid, root) == []
    fits = put_block(server, "fits.bin", 3, b"a", more=False)
    assert fits.code == "4.08"  # a last block alone, without its upload
    for num in range(4):
        assert put_block(server, "fits.bin", num, b"b" * 1024, more=num < 3).code in (
            "2.31",
            "2.01",
        )
    assert (root / "fits.bin").read_bytes() == b"b" * 4096


def test_a_busy_answer_never_has_a_max_age_beyond_4_bytes(tmp_path: Path) -> None:
    """An upload may idle for longer than Max-Age can say (idle_timeout = 1e300 s): the 5.03 of
    a second upload says the longest Max-Age there is, 2**32 - 1."""
    conf = tmp_path / "server.toml"
    conf.write_text("[upload]\nmax_concurrent = 1\nidle_timeout = 1e300\n")
    server = RawServer(
        root_with(tmp_path / "root"), tmp_path / "server.log", "--write", "--config", str(conf)
    )
    try:
        assert put_block(server, "a.bin", 0, b"x" * 1024, more=True).code == "2.31"
        busy = put_block(server, "b.bin", 0, b"x" * 1024, more=True)
        assert (busy.code, busy.opt(MAX_AGE)) == ("5.03", b"\xff" * 4), busy
        server.assert_clean()
    finally:
        server.close()


def test_max_concurrent_uploads_then_idle_ones_are_dropped(limited) -> None:
    """A third upload at once is 5.03 with Max-Age; the two in progress, once abandoned, are
    dropped after the idle timeout (their spools go), their next block is 4.08, and new
    uploads are taken again."""
    server, root = limited
    for name in ("a.bin", "b.bin"):
        assert put_block(server, name, 0, b"x" * 1024, more=True).code == "2.31"
    busy = put_block(server, "c.bin", 0, b"x" * 1024, more=True)
    assert busy.code == "5.03" and busy.payload, busy
    max_age = int.from_bytes(busy.opt(MAX_AGE) or b"", "big")
    assert 1 <= max_age <= 2, busy
    assert len(held_spools(server.proc.pid, root)) == 2
    wait_until(
        lambda: held_spools(server.proc.pid, root) == [],
        10,
        what="the abandoned uploads' spools go",
    )
    assert put_block(server, "a.bin", 1, b"x" * 1024, more=True).code == "4.08"
    assert put_block(server, "b.bin", 1, b"x", more=False).code == "4.08"
    assert os.listdir(root) == []
    for name in ("c.bin", "d.bin"):
        assert put_block(server, name, 0, b"y" * 1024, more=True).code == "2.31"
        assert put_block(server, name, 1, b"y", more=False).code == "2.01"
        assert (root / name).read_bytes() == b"y" * 1025


# --- modes -----------------------------------------------------------------------------------


def test_new_files_get_file_mode_under_the_umask(
    server: Server, root: Path, client: Client
) -> None:
    assert client.put(server.uri("fresh.txt"), b"new\n").code == codes.CREATED
    assert stat.S_IMODE((root / "fresh.txt").stat().st_mode) == 0o644 & ~current_umask()


def test_configured_modes_and_kept_modes_without_setuid(
    start_server: Servers, tmp_path: Path, client: Client
) -> None:
    """file_mode and directory_mode under the server's umask (027 here); a replaced file keeps
    its permission bits, but never setuid or setgid: new content must not inherit them."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "tool").write_bytes(b"#!/bin/sh\necho old\n")
    os.chmod(root / "tool", 0o6755)
    (root / "secret.txt").write_text("old\n")
    os.chmod(root / "secret.txt", 0o600)
    conf = tmp_path / "server.toml"
    conf.write_text("[upload]\nfile_mode = 0o666\ndirectory_mode = 0o777\n")
    wrapper = ["sh", "-c", 'umask 027 && exec "$@"', "sh"]
    server = start_server.start("--write", "--config", str(conf), root=root, wrapper=wrapper)
    server.wait_ready(lambda: client.answers(server.uri(".well-known/core")))

    def mode(name: str) -> int:
        return stat.S_IMODE((root / name).stat().st_mode)

    assert client.put(server.uri("new.txt"), b"new\n").code == codes.CREATED
    assert mode("new.txt") == 0o640
    assert client.put(server.uri("big.bin"), b"b" * 3000).code == codes.CREATED
    assert mode("big.bin") == 0o640
    assert client.put(server.uri("dir/"), b"").code == codes.CREATED
    assert mode("dir") == 0o750
    assert client.put(server.uri("tool"), b"#!/bin/sh\necho new\n").code == codes.CHANGED
    assert mode("tool") == 0o755
    assert client.put(server.uri("secret.txt"), b"new\n").code == codes.CHANGED
    assert mode("secret.txt") == 0o600


# --- Content-Format stored with the file ---------------------------------------------------


def require_user_xattrs(directory: Path) -> None:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.coapfs-test", b"1")
    except OSError as e:
        missing(f"{directory} has no user extended attributes: {e.strerror}")
    finally:
        probe.unlink()


def stored_format(file: Path) -> bytes | None:
    try:
        return os.getxattr(file, CONTENT_FORMAT)
    except OSError:
        return None


def test_content_format_is_stored_and_served_back(
    server: Server, root: Path, client: Client
) -> None:
    """A PUT's Content-Format is kept with the file and served instead of the guess (Accept is
    checked against it); replacing the file without one drops it, and the name decides again."""
    require_user_xattrs(root)
    json_format, text_format = 50, 0
    assert client.put(server.uri("record"), b'{"a": 1}', content_format=json_format).code == (
        codes.CREATED
    )
    assert stored_format(root / "record") == b"50"
    response = client.get(server.uri("record"))
    assert (response.code, response.opt.content_format) == (codes.CONTENT, json_format)
    assert client.get(server.uri("record"), accept=json_format).code == codes.CONTENT
    refused = client.get(server.uri("record"), accept=42)
    assert refused.code == codes.NOT_ACCEPTABLE and refused.payload

    # Over a name that has a guess of its own, and block-wise.
    body = b'{"b": "' + b"x" * 3000 + b'"}'
    assert client.put(server.uri("notes.txt"), body, content_format=json_format).code == (
        codes.CREATED
    )
    response = client.get(server.uri("notes.txt"))
    assert (response.payload, response.opt.content_format) == (body, json_format)
    assert client.get(server.uri("notes.txt"), accept=text_format).code == codes.NOT_ACCEPTABLE

    assert client.put(server.uri("record"), b"plain bytes").code == codes.CHANGED
    assert stored_format(root / "record") is None
    assert client.get(server.uri("record")).opt.content_format is None
    assert client.put(server.uri("notes.txt"), b"just text\n").code == codes.CHANGED
    assert client.get(server.uri("notes.txt")).opt.content_format == text_format
    assert client.get(server.uri("notes.txt"), accept=json_format).code == codes.NOT_ACCEPTABLE


def test_without_extended_attributes_the_format_is_guessed(
    start_server: Servers, tmp_path: Path, client: Client
) -> None:
    """On a file system without user extended attributes (ramfs, in a user and mount namespace
    of the server's own) a PUT with Content-Format still succeeds; the format is not kept, and
    the name decides it, as for any other file."""
    root = tmp_path / "ramfs"
    root.mkdir()
    wrapper = with_own_mount(root, "ramfs")
    server = start_server.start("--write", root=root, wrapper=wrapper)
    server.wait_ready(lambda: client.answers(server.uri(".well-known/core")))
    for name, guess in (("record", None), ("notes.txt", 0)):
        assert client.put(server.uri(name), b"{}", content_format=50).code == codes.CREATED
        response = client.get(server.uri(name))
        assert (response.payload, response.opt.content_format) == (b"{}", guess), name
