"""Reading over CoAP: files, block-wise transfers, listings, ETags — with aiocoap's client and with
libcoap's coap-client."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from urllib.parse import unquote

import aiocoap
import pytest
from aiocoap.numbers import ContentFormat, codes
from aiocoap.optiontypes import BlockOption
from aiocoap.util.linkformat import parse

ODD_NAMES = ["a, b>c.txt", "semi;colon", 'quote"d', "spa ce", "ümlaut-€.txt", "pct%41", "q?x#y"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    (root / "hello.txt").write_text("Hello, CoAP!\n")
    (root / "data.json").write_text('{"a": 1}')
    (root / "noext").write_bytes(b"\x00\x01")
    (root / "big.bin").write_bytes(os.urandom(100_000))
    (root / "empty").write_bytes(b"")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_text("inner")
    for name in ODD_NAMES:
        (root / "sub" / name).write_text(f"content of {name}")
    many = root / "many"
    many.mkdir()
    for i in range(300):
        (many / f"file-{i:04d}.txt").write_text(str(i))
    return root


@pytest.fixture(scope="module")
def server(tree, start_module_server):
    return start_module_server(tree)


def test_small_file_with_content_format_and_etag(client, server):
    r = client.get(server.uri("hello.txt"))
    assert r.code == codes.CONTENT
    assert r.payload == b"Hello, CoAP!\n"
    assert r.opt.content_format == ContentFormat.TEXT
    assert r.opt.etag is not None and len(r.opt.etag) == 8
    assert r.opt.block2 is None


def test_content_formats(client, server):
    assert client.get(server.uri("data.json")).opt.content_format == ContentFormat.JSON
    assert client.get(server.uri("noext")).opt.content_format is None


def test_empty_file(client, server):
    r = client.get(server.uri("empty"))
    assert r.code == codes.CONTENT and r.payload == b""


def test_multi_block_file_assembled_by_aiocoap(client, server, tree):
    r = client.get(server.uri("big.bin"))
    assert r.code == codes.CONTENT
    assert (
        hashlib.sha256(r.payload).digest()
        == hashlib.sha256((tree / "big.bin").read_bytes()).digest()
    )


@pytest.mark.parametrize("szx", range(7))
def test_any_block_size_and_any_block_cold(client, server, tree, szx):
    data = (tree / "big.bin").read_bytes()
    size = 2 ** (szx + 4)
    for num in (0, 1, 7, (len(data) - 1) // size):
        r = client.get(
            server.uri("big.bin"),
            block2=BlockOption.BlockwiseTuple(num, False, szx),
        )
        assert r.code == codes.CONTENT
        assert r.payload == data[num * size : (num + 1) * size]
        assert r.opt.block2.block_number == num
        assert r.opt.block2.size_exponent == szx
        assert r.opt.block2.more == ((num + 1) * size < len(data))
        assert r.opt.size2 == len(data)
        assert r.opt.etag is not None


def test_block_beyond_end_is_bad_option(client, server):
    r = client.get(server.uri("hello.txt"), block2=BlockOption.BlockwiseTuple(5, False, 0))
    assert r.code == codes.BAD_OPTION
    assert r.payload


def test_listing_parses_back_and_odd_names_round_trip(client, server, tree):
    r = client.get(server.uri("sub/"))
    assert r.code == codes.CONTENT
    assert r.opt.content_format == ContentFormat.LINKFORMAT
    assert r.opt.etag is not None
    links = parse(r.payload.decode("ascii")).links
    hrefs = {link.href: link for link in links}
    assert "/sub/deeper/" in hrefs and hrefs["/sub/deeper/"].ct == ["40"]
    files = {unquote(h.rsplit("/", 1)[1]): h for h in hrefs if not h.endswith("/")}
    assert set(files) == {"inner.txt", *ODD_NAMES}
    for name, href in files.items():
        # The href, resolved against the server, fetches that very file.
        fetched = client.get(server.base + href)
        assert fetched.code == codes.CONTENT, (name, fetched)
        assert fetched.payload == (tree / "sub" / name).read_bytes()


def test_root_listing(client, server):
    r = client.get(server.base + "/")
    hrefs = {link.href for link in parse(r.payload.decode()).links}
    assert {"/hello.txt", "/sub/", "/many/", "/big.bin"} <= hrefs


def test_large_listing_any_block_cold(client, server):
    whole = client.get(server.uri("many/"))
    assert len(parse(whole.payload.decode()).links) == 300
    assert len(whole.payload) > 1024
    for num in (2, 1, 0):
        r = client.get(server.uri("many/"), block2=BlockOption.BlockwiseTuple(num, False, 6))
        assert r.code == codes.CONTENT
        assert r.payload == whole.payload[num * 1024 : (num + 1) * 1024]
        assert r.opt.etag == whole.opt.etag


def test_etag_revalidation(client, server, tree):
    first = client.get(server.uri("hello.txt"))
    again = client.get(server.uri("hello.txt"), etag=first.opt.etag)
    assert again.code == codes.VALID and again.payload == b"" and again.opt.etag == first.opt.etag
    other = client.get(server.uri("hello.txt"), etag=b"\x00" * 8)
    assert other.code == codes.CONTENT
    listing = client.get(server.uri("sub/"))
    assert client.get(server.uri("sub/"), etag=listing.opt.etag).code == codes.VALID


def test_etag_changes_when_file_changes(client, start_server, tmp_path):
    (tmp_path / "f").write_text("one")
    server = start_server(tmp_path)
    first = client.get(server.uri("f"))
    (tmp_path / "f").write_text("two")
    second = client.get(server.uri("f"), etag=first.opt.etag)
    assert second.code == codes.CONTENT and second.payload == b"two"
    assert second.opt.etag != first.opt.etag


@pytest.mark.parametrize("length", [0, 1, 4, 8])
def test_etag_length(client, start_server, tmp_path, length):
    (tmp_path / "f").write_text("x")
    server = start_server(tmp_path, "--etag-length", str(length))
    r = client.get(server.uri("f"))
    if length == 0:
        assert r.opt.etag is None
        assert client.get(server.uri(""), etag=b"\x01").code == codes.CONTENT
        refused = client.get(server.uri("f"), if_match=[b"\x01"])
        assert refused.code == codes.PRECONDITION_FAILED
        assert b"ETags are disabled" in refused.payload
    else:
        assert len(r.opt.etag) == length
        assert client.get(server.uri("f"), etag=r.opt.etag).code == codes.VALID


def test_well_known_core_links_the_file_service(client, server):
    r = client.get(server.uri(".well-known/core"))
    assert r.code == codes.CONTENT and r.opt.content_format == ContentFormat.LINKFORMAT
    (link,) = parse(r.payload.decode()).links
    assert link.href == "/" and link.ct == ["40"]
    assert link.rt == ["tag:chrysn@fsfe.org,2022:fileserver"]


@pytest.mark.parametrize(
    ("path", "hint"),
    [("sub", "trailing slash"), ("hello.txt/", "strip the trailing slash")],
)
def test_trailing_slash_mismatch_is_4_00_with_hint(client, server, path, hint):
    r = client.get(server.uri(path))
    assert r.code == codes.BAD_REQUEST
    assert hint in r.payload.decode()


def test_methods_outside_the_service_are_4_05(client, server):
    r = client.request(aiocoap.Message(code=aiocoap.POST, uri=server.uri("hello.txt")))
    assert r.code == codes.METHOD_NOT_ALLOWED


def libcoap_get(binary: str, out: Path, *args: str) -> bytes:
    """The body libcoap's coap-client received (written to a file, byte for byte)."""
    subprocess.run([binary, "-B", "20", "-o", str(out), *args], check=True, timeout=60)
    return out.read_bytes()


def test_libcoap_client_small_file(coap_client, server, tmp_path):
    assert libcoap_get(coap_client, tmp_path / "o", server.uri("hello.txt")) == b"Hello, CoAP!\n"


@pytest.mark.parametrize("block_size", ["16", "64", "1024"])
def test_libcoap_client_block_wise_file(coap_client, server, tree, tmp_path, block_size):
    out = libcoap_get(coap_client, tmp_path / "o", "-b", block_size, server.uri("big.bin"))
    assert hashlib.sha256(out).digest() == hashlib.sha256((tree / "big.bin").read_bytes()).digest()


def test_libcoap_client_listing(coap_client, server, tmp_path):
    out = libcoap_get(coap_client, tmp_path / "o", server.uri("many/")).decode()
    assert len(parse(out).links) == 300


def test_libcoap_client_well_known_core(coap_client, server, tmp_path):
    out = libcoap_get(coap_client, tmp_path / "o", server.uri(".well-known/core")).decode()
    assert "tag:chrysn@fsfe.org,2022:fileserver" in out
