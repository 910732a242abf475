"""Path safety: nothing outside the root is ever read or written, whatever Uri-Path a client sends,
and odd file types or OS errors are a prompt 4.xx, never a 5.00 or a hang."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from coapfs.tree.root import Root

from support.tools import IN_CI

SECRET = b"outside-the-root-secret-7f3a"


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A served root full of traps, and an outside directory holding a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file.txt").write_text("inside")
    (root / "plain.txt").write_text("plain")
    (root / "link-out-file").symlink_to(outside / "secret.txt")
    (root / "link-out-dir").symlink_to(outside)
    (root / "link-out-relative").symlink_to("../outside/secret.txt")
    (root / "link-in-file").symlink_to("dir/file.txt")
    (root / "link-in-dir").symlink_to("dir")
    (root / "link-in-absolute").symlink_to(root / "plain.txt")
    (root / "dangling").symlink_to("nowhere")
    (root / ".hidden").write_text("hidden")
    (root / ".hiddendir").mkdir()
    (root / ".hiddendir" / "x").write_text("x")
    os.mkfifo(root / "fifo")
    return root, outside


def request(client, server, method, path: tuple[str, ...], payload: bytes = b""):
    message = aiocoap.Message(code=method, uri=server.base, payload=payload)
    message.opt.uri_path = path
    return client.request(message)


def assert_clean(response: aiocoap.Message) -> None:
    """A 4.xx with a diagnostic, and no byte from outside the root."""
    assert response.code.class_ == 4, response
    assert response.payload, "a 4.xx carries a short diagnostic"
    assert SECRET not in response.payload


MALFORMED = [
    ("", "etc", "hostname"),
    ("", "", "etc", "hostname"),
    ("..", "outside", "secret.txt"),
    ("dir", "..", "..", "outside", "secret.txt"),
    (".", "plain.txt"),
    ("dir", "", "file.txt"),
    ("a/b",),
    ("dir/file.txt",),
    ("plain\0.txt",),
]


@pytest.mark.parametrize("path", MALFORMED, ids=repr)
def test_malformed_paths_are_4_00_for_every_method(client, start_server, layout, path):
    root, outside = layout
    server = start_server(root, "--write")
    for method in (aiocoap.GET, aiocoap.PUT, aiocoap.DELETE):
        r = request(client, server, method, path, payload=b"overwritten")
        assert r.code == codes.BAD_REQUEST, (method, r)
        assert_clean(r)
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert client.get(server.uri("plain.txt")).payload == b"plain"


def test_double_slash_cannot_write_outside(client, start_server, layout, tmp_path):
    root, _ = layout
    server = start_server(root, "--write")
    target = tmp_path / "written-outside"
    r = request(client, server, aiocoap.PUT, ("", *target.parts[1:]), payload=b"x")
    assert_clean(r)
    assert not target.exists()


@pytest.mark.parametrize(
    "path",
    [
        ("link-out-file",),
        ("link-out-relative",),
        ("link-out-dir", "secret.txt"),
        ("link-out-dir", ""),
        ("link-in-absolute",),
    ],
    ids=repr,
)
def test_symlinks_leading_out_are_refused(client, start_server, layout, path):
    root, _ = layout
    server = start_server(root, "--write")
    assert_clean(request(client, server, aiocoap.GET, path))


def test_symlinks_cannot_be_written_through(client, start_server, layout):
    root, outside = layout
    server = start_server(root, "--write")
    for path in (("link-out-dir", "new.txt"), ("link-out-dir", "secret.txt")):
        assert_clean(request(client, server, aiocoap.PUT, path, payload=b"evil"))
        assert_clean(request(client, server, aiocoap.DELETE, path))
    # A write to the link's own name does not follow it either.
    assert_clean(request(client, server, aiocoap.PUT, ("link-out-file",), payload=b"evil"))
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (root / "link-out-file").is_symlink()


def test_symlinks_inside_the_root_are_followed(client, start_server, layout):
    root, _ = layout
    server = start_server(root)
    assert client.get(server.uri("link-in-file")).payload == b"inside"
    assert client.get(server.uri("link-in-dir/file.txt")).payload == b"inside"
    listing = client.get(server.uri("")).payload.decode()
    assert "</link-in-file>" in listing and "</link-in-dir/>;ct=40" in listing
    for hidden in ("link-out", "dangling", "fifo", "hidden"):
        assert hidden not in listing


def test_hidden_names_are_neither_listed_nor_served(client, start_server, layout):
    root, _ = layout
    server = start_server(root)
    for path in (".hidden", ".hiddendir/", ".hiddendir/x", "dir/.missing"):
        r = client.get(server.uri(path))
        assert r.code == codes.NOT_FOUND, path


def test_fifo_socket_and_device_are_4_04_promptly(client, start_server, layout, tmp_path):
    root, _ = layout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(root / "socket"))
    names = ["fifo", "socket"]
    if os.geteuid() == 0:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        names.append("null")
    elif IN_CI:
        pytest.fail("CI runs as root; the device node case needs it")
    server = start_server(root)
    try:
        for name in names:
            started = time.monotonic()
            r = client.get(server.uri(name))
            assert r.code == codes.NOT_FOUND, name
            assert time.monotonic() - started < 10
        assert client.get(server.uri("plain.txt")).payload == b"plain"
    finally:
        sock.close()


def test_os_errors_are_4_xx(client, start_server, layout):
    root, _ = layout
    server = start_server(root, "--write")
    cases = {
        "plain.txt/x": codes.NOT_FOUND,
        "missing": codes.NOT_FOUND,
        "missing/": codes.NOT_FOUND,
        "dangling": codes.NOT_FOUND,
        "x" * 300: codes.BAD_REQUEST,
    }
    for path, code in cases.items():
        r = client.get(server.uri(path))
        assert r.code == code, (path, r, r.payload)
        assert_clean(r)
    assert_clean(request(client, server, aiocoap.PUT, ("plain.txt", "x"), payload=b"x"))
    assert_clean(request(client, server, aiocoap.DELETE, ("plain.txt", "x")))
    assert_clean(request(client, server, aiocoap.PUT, ("x" * 300,), payload=b"x"))


@pytest.mark.parametrize("use_openat2", [True, False], ids=["openat2", "walk"])
def test_resolution_stays_beneath_the_root(layout, use_openat2):
    """Both resolution mechanisms, on the real file system: the fallback walk follows no link."""
    root, _ = layout
    r = Root(root, use_openat2=use_openat2)
    try:
        fd, st = r.open_for_reading(("dir", "file.txt"))
        assert os.pread(fd, 100, 0) == b"inside" and stat.S_ISREG(st.st_mode)
        os.close(fd)
        for path in (("link-out-file",), ("link-out-dir", "secret.txt"), ("fifo",)):
            with pytest.raises(OSError):
                fd, _ = r.open_for_reading(path)
                os.close(fd)
        if use_openat2:
            fd, _ = r.open_for_reading(("link-in-dir", "file.txt"))
            os.close(fd)
        else:
            with pytest.raises(OSError):
                r.open_for_reading(("link-in-dir", "file.txt"))
    finally:
        r.close()
