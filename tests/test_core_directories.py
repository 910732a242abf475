"""Directories over CoAP, as RIOT's nanocoap fileserver does them: `PUT dir/` makes one (parents
must exist), `DELETE dir/` removes it with its contents (only if empty with RIOT's If-Match
value, only if unchanged with its listing's ETag); the root is never deleted, and nothing
outside a deleted directory is touched through links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiocoap.numbers import codes

from coapfs.protocol.writes import EMPTY_DIRECTORY_ETAG
from coapfs.tree.hidden import TRASH_PREFIX

from support.process import with_own_mount
from support.raw import DELETE, GET, RawServer, path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "full" / "deeper").mkdir(parents=True)
    (root / "full" / "a.txt").write_text("a")
    (root / "full" / "deeper" / "b.txt").write_text("b")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def server(root, start_server):
    return start_server(root, "--write")


def test_put_dir_creates_it_and_finds_it_there(client, server, root):
    r = client.put(server.uri("new/"), b"")
    assert r.code == codes.CREATED and r.opt.etag
    assert (root / "new").is_dir()
    assert (root / "new").stat().st_mode & 0o777 == 0o755 & ~current_umask()
    again = client.put(server.uri("new/"), b"")
    assert again.code == codes.CHANGED
    listing = client.get(server.uri(""))
    assert b"</new/>;ct=40" in listing.payload


def test_put_dir_needs_its_parent_and_honours_preconditions(client, server, root):
    assert client.put(server.uri("missing/child/"), b"").code == codes.NOT_FOUND
    assert not (root / "missing").exists()
    r = client.put(server.uri("empty/"), b"", if_none_match=True)
    assert r.code == codes.PRECONDITION_FAILED
    r = client.put(server.uri("fresh/"), b"", if_match=[b""])
    assert r.code == codes.PRECONDITION_FAILED and not (root / "fresh").exists()


@pytest.mark.parametrize("size", [8, 3000], ids=["single datagram", "block-wise"])
def test_put_dir_with_a_payload_is_4_00_and_makes_nothing(client, server, root, size):
    r = client.put(server.uri(f"upload-{size}/"), b"x" * size)
    assert r.code == codes.BAD_REQUEST, r
    assert b"strip the slash" in r.payload
    assert not (root / f"upload-{size}").exists()


def test_delete_dir_removes_it_with_its_contents(client, server, root):
    etag_before = client.get(server.uri("full/")).opt.etag
    assert client.delete(server.uri("full/")).code == codes.DELETED
    assert not (root / "full").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(TRASH_PREFIX)]
    assert client.get(server.uri("full/")).code == codes.NOT_FOUND
    assert client.delete(server.uri("full/")).code == codes.NOT_FOUND
    assert etag_before is not None


def test_delete_dir_only_if_empty_with_riots_etag(client, server, root):
    r = client.delete(server.uri("full/"), if_match=[EMPTY_DIRECTORY_ETAG])
    assert r.code == codes.PRECONDITION_FAILED and b"not empty" in r.payload
    assert (root / "full" / "deeper" / "b.txt").exists()
    r = client.delete(server.uri("empty/"), if_match=[EMPTY_DIRECTORY_ETAG])
    assert r.code == codes.DELETED and not (root / "empty").exists()


def test_delete_dir_only_if_unchanged_with_its_listing_etag(client, server, root):
    etag = client.get(server.uri("full/")).opt.etag
    (root / "full" / "c.txt").write_text("added meanwhile")
    r = client.delete(server.uri("full/"), if_match=[etag])
    assert r.code == codes.PRECONDITION_FAILED and (root / "full" / "c.txt").exists()
    etag = client.get(server.uri("full/")).opt.etag
    assert client.delete(server.uri("full/"), if_match=[etag]).code == codes.DELETED
    assert not (root / "full").exists()


def test_the_root_is_never_deleted(client, server, root):
    for r in (client.delete(server.uri("")), client.put(server.uri(""), b"")):
        assert r.code == codes.FORBIDDEN and r.payload
    assert (root / "full" / "a.txt").exists()


def test_deleting_touches_nothing_outside_through_links(client, server, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    os.symlink(outside, root / "full" / "link-out")
    os.symlink(outside / "precious.txt", root / "full" / "deeper" / "file-link")
    assert client.delete(server.uri("full/")).code == codes.DELETED
    assert not (root / "full").exists()
    assert (outside / "precious.txt").read_text() == "keep me"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_deleted_directory_that_cannot_all_be_removed_is_said_plainly(tmp_path):
    """Something beneath it cannot be removed (here a mount point, in a mount namespace of the
    server's own): the directory is gone for clients (2.02), and the log says in one plain
    warning what is left and what to do, without a traceback object in it."""
    root = tmp_path / "root"
    (root / "stuck" / "mounted").mkdir(parents=True)
    wrapper = with_own_mount(root / "stuck" / "mounted")
    server = RawServer(root, tmp_path / "server.log", "--write", wrapper=wrapper)
    try:
        assert server.request(DELETE, path("stuck", "")).code == "2.02"
        assert server.request(GET, path("stuck", "")).code == "4.04"
        warnings = [line for line in server.log().splitlines() if "Could not remove" in line]
        assert warnings and all("remove it by hand" in w for w in warnings), server.log()
        assert "traceback" not in server.log().lower()
        server.assert_clean()
    finally:
        server.close()
