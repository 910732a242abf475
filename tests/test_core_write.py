"""Writing over CoAP (--write): PUT and DELETE with every precondition case, atomic replacement,
and 4.05 on a read-only server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from coapfs.tree.hidden import SPOOL_PREFIX

from support.files import spool_files


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "existing.txt").write_text("old")
    return root


@pytest.fixture
def server(root, start_server):
    return start_server(root, "--write")


def test_put_creates_with_2_01_and_etag(client, server, root):
    r = client.put(server.uri("new.txt"), b"fresh")
    assert r.code == codes.CREATED
    assert (root / "new.txt").read_bytes() == b"fresh"
    assert r.opt.etag == client.get(server.uri("new.txt")).opt.etag
    assert not spool_files(root)


def test_put_replaces_with_2_04_and_new_etag(client, server, root):
    before = client.get(server.uri("existing.txt")).opt.etag
    r = client.put(server.uri("existing.txt"), b"new content")
    assert r.code == codes.CHANGED
    assert r.opt.etag != before and r.opt.etag == client.get(server.uri("existing.txt")).opt.etag
    assert (root / "existing.txt").read_bytes() == b"new content"


def test_put_keeps_permissions_of_replaced_file(client, server, root):
    os.chmod(root / "existing.txt", 0o640)
    assert client.put(server.uri("existing.txt"), b"x").code == codes.CHANGED
    assert (root / "existing.txt").stat().st_mode & 0o777 == 0o640


def test_put_large_payload_block_wise(client, server, root):
    data = os.urandom(50_000)
    assert client.put(server.uri("dir/large.bin"), data).code == codes.CREATED
    assert (root / "dir" / "large.bin").read_bytes() == data
    assert client.get(server.uri("dir/large.bin")).payload == data
    assert not spool_files(root)


def test_if_none_match(client, server, root):
    r = client.put(server.uri("existing.txt"), b"x", if_none_match=True)
    assert r.code == codes.PRECONDITION_FAILED and r.payload
    assert (root / "existing.txt").read_text() == "old"
    assert client.put(server.uri("brand-new"), b"y", if_none_match=True).code == codes.CREATED
    assert not spool_files(root)


def test_if_match(client, server, root):
    etag = client.get(server.uri("existing.txt")).opt.etag
    bad = client.put(server.uri("existing.txt"), b"x", if_match=[b"\x00" * 8])
    assert bad.code == codes.PRECONDITION_FAILED
    assert (root / "existing.txt").read_text() == "old"
    assert client.put(server.uri("existing.txt"), b"x", if_match=[etag]).code == codes.CHANGED
    # The old ETag no longer matches.
    assert client.put(server.uri("existing.txt"), b"y", if_match=[etag]).code == (
        codes.PRECONDITION_FAILED
    )
    # An empty If-Match means "exists".
    assert client.put(server.uri("existing.txt"), b"z", if_match=[b""]).code == codes.CHANGED
    assert (root / "existing.txt").read_text() == "z"


def test_if_match_on_missing_file_fails_for_put_and_delete(client, server, root):
    for message in (
        aiocoap.Message(code=aiocoap.PUT, uri=server.uri("missing"), payload=b"x", if_match=[b""]),
        aiocoap.Message(code=aiocoap.PUT, uri=server.uri("missing"), payload=b"x", if_match=[b"1"]),
        aiocoap.Message(code=aiocoap.DELETE, uri=server.uri("missing"), if_match=[b"1"]),
        aiocoap.Message(code=aiocoap.DELETE, uri=server.uri("missing"), if_match=[b""]),
    ):
        assert client.request(message).code == codes.PRECONDITION_FAILED
    assert not (root / "missing").exists()


def test_delete(client, server, root):
    etag = client.get(server.uri("existing.txt")).opt.etag
    assert client.delete(server.uri("existing.txt"), if_match=[b"nope"]).code == (
        codes.PRECONDITION_FAILED
    )
    assert (root / "existing.txt").exists()
    assert client.delete(server.uri("existing.txt"), if_match=[etag]).code == codes.DELETED
    assert not (root / "existing.txt").exists()
    r = client.delete(server.uri("existing.txt"))
    assert r.code == codes.NOT_FOUND and r.payload


def test_a_directory_named_as_a_file_is_4_00_and_kept(client, server, root):
    """Without its trailing slash a directory is not written or deleted as if it were a file
    (`PUT dir/` and `DELETE dir/` are tests/test_core_directories.py's)."""
    for r in (client.delete(server.uri("dir")), client.put(server.uri("dir"), b"x")):
        assert r.code == codes.BAD_REQUEST and b"trailing slash" in r.payload
    assert (root / "dir").is_dir()
    r = client.put(server.uri("existing.txt/"), b"x")  # a file named as a directory
    assert r.code == codes.CONFLICT and r.payload
    assert (root / "existing.txt").read_text() == "old"


def test_put_into_missing_directory_is_4_04(client, server, root):
    r = client.put(server.uri("nodir/file"), b"x")
    assert r.code == codes.NOT_FOUND and r.payload
    assert not (root / "nodir").exists()
    r = client.put(server.uri("existing.txt/file"), b"x")
    assert r.code == codes.NOT_FOUND


def test_read_only_server_answers_4_05(client, start_server, root):
    server = start_server(root)
    assert client.put(server.uri("new"), b"x").code == codes.METHOD_NOT_ALLOWED
    assert client.delete(server.uri("existing.txt")).code == codes.METHOD_NOT_ALLOWED
    assert not (root / "new").exists() and (root / "existing.txt").exists()


def test_put_to_a_hidden_name_is_refused(client, server, root):
    assert client.put(server.uri(".hidden"), b"x").code == codes.NOT_FOUND
    assert client.put(server.uri(SPOOL_PREFIX + "x"), b"x").code == codes.NOT_FOUND
    assert not (root / ".hidden").exists()


def test_libcoap_client_put_and_delete(coap_client, server, root, tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(3000))
    subprocess.run(
        [coap_client, "-B", "20", "-m", "put", "-f", str(src), server.uri("dir/from-libcoap")],
        check=True,
        timeout=60,
    )
    assert (root / "dir" / "from-libcoap").read_bytes() == src.read_bytes()
    subprocess.run(
        [coap_client, "-B", "20", "-m", "delete", server.uri("dir/from-libcoap")],
        check=True,
        timeout=60,
    )
    assert not (root / "dir" / "from-libcoap").exists()
