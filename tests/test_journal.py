"""Logging for an administrator (issue 12.4, 12.9): the journal's native protocol as journald
reads it, fatal start-up lines at err, and the access log (one line per request, with journal
fields).

A unix datagram socket bound by the test stands in for /run/systemd/journal/socket, and every
datagram is decoded as journald does (sd_journal_send(3): `KEY=value\\n`, or for a value with
a newline `KEY\\n`, a 64-bit little-endian length, the value, `\\n`). The real journald is met
in tests/test_package.py.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code

from coapfs.daemon.journal import JournalHandler
from coapfs.protocol.accesslog import FIELDS

from support.client import Client
from support.repo import environment
from support.server import COAPFS, Servers
from support.tools import missing


def decode(datagram: bytes) -> dict[str, str]:
    """One journal entry from a native-protocol datagram (each key once, as we send them)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, newline, after = rest.partition(b"\n")
        assert newline, f"field without its newline: {rest!r}"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            rest = after
        else:
            key = line
            (size,) = struct.unpack("<Q", after[:8])
            value, end = after[8 : 8 + size], after[8 + size : 9 + size]
            assert end == b"\n", f"binary field {key!r} not closed by a newline"
            rest = after[9 + size :]
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", key), key
        assert key.decode() not in fields, f"{key!r} twice"
        fields[key.decode()] = value.decode()
    return fields


class FakeJournal:
    """A bound unix datagram socket, read as journald reads its native socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)

    def entries(self, timeout: float = 5.0, until=None) -> list[dict[str, str]]:
        """Entries received until `until(entries)` holds (or, without it, one arrives)."""
        got: list[dict[str, str]] = []
        self.sock.settimeout(timeout)
        while not (until(got) if until else got):
            try:
                got.append(decode(self.sock.recv(1 << 20)))
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    j = FakeJournal(tmp_path / "journal.socket")
    yield j
    j.close()


def test_handler_speaks_the_native_protocol(journal: FakeJournal) -> None:
    handler = JournalHandler(path=str(journal.path))
    log = logging.getLogger("coapfs.test.journal")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.error("cannot bind %s: %s", "[::]:5683", "Address already in use")
        (entry,) = journal.entries()
        assert entry["MESSAGE"] == (
            "coapfs.test.journal: cannot bind [::]:5683: Address already in use"
        )
        assert entry["PRIORITY"] == "3"
        assert entry["SYSLOG_IDENTIFIER"] == "coap-fileserver"
        assert entry["LOGGER"] == "coapfs.test.journal"
        assert entry["CODE_FILE"] == __file__ and entry["CODE_FUNC"] == (
            "test_handler_speaks_the_native_protocol"
        )
        assert int(entry["CODE_LINE"]) > 0

        for level, priority in [
            (logging.CRITICAL, "2"),
            (logging.WARNING, "4"),
            (logging.INFO, "6"),
            (logging.DEBUG, "7"),
        ]:
            log.log(level, "at %s", level)
            (entry,) = journal.entries()
            assert entry["PRIORITY"] == priority, (level, entry)

        # A message with newlines (a traceback) stays one entry: the binary length form.
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            log.exception("failed")
        (entry,) = journal.entries()
        lines = entry["MESSAGE"].splitlines()
        assert (
            lines[0] == "coapfs.test.journal: failed"
            and lines[1] == "Traceback (most recent call last):"
        )
        assert lines[-2:] == ["ValueError: line one", "line two"], lines
        assert entry["PRIORITY"] == "3"

        # A record's own fields become journal fields, named as journald wants them.
        access = {
            "REMOTE": "::1",
            "REMOTE_PORT": 40000,
            "IDENTITY": ":alice",
            "METHOD": "GET",
            "PATH": "/dir/a b.txt",
            "CODE": "2.05",
            "BYTES": 1024,
            "DURATION_MS": "0.412",
            "note.with-dots": "multi\nline",
        }
        log.info("access", extra={FIELDS: access})
        (entry,) = journal.entries()
        assert entry["NOTE_WITH_DOTS"] == "multi\nline"
        del access["note.with-dots"]
        assert {k: entry[k] for k in access} == {k: str(v) for k, v in access.items()}
    finally:
        log.removeHandler(handler)
        handler.close()


def test_handler_refuses_a_missing_socket(tmp_path: Path) -> None:
    """No journal there: OSError, so that setup falls back to stderr with <N> prefixes."""
    with pytest.raises(OSError):
        JournalHandler(path=str(tmp_path / "none"))


def test_access_log_one_line_per_request(
    tmp_path: Path, start_server: Servers, client: Client
) -> None:
    """Off by default; with --access-log one line per request: peer, method, path, code,
    payload bytes, duration -- block-wise transfers one line per block."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "big.bin").write_bytes(bytes(2500))
    quiet = start_server(root)
    assert client.get(quiet.uri("a.txt")).code == Code.CONTENT
    server = start_server(root, "--access-log")
    requests = [
        ("GET", "a.txt", client.get(server.uri("a.txt"))),
        ("GET", "sub/", client.get(server.uri("sub/"))),
        ("GET", "nope", client.get(server.uri("nope"))),
        ("PUT", "a.txt", client.put(server.uri("a.txt"), b"x")),
        ("DELETE", "a.txt", client.delete(server.uri("a.txt"))),
    ]
    big = client.get(server.uri("big.bin"))
    assert len(big.payload) == 2500
    assert server.stop() == 0
    assert quiet.stop() == 0
    assert "coapfs.access" not in quiet.log()

    line = re.compile(
        r"\S+ \S+ INFO coapfs\.access: 127\.0\.0\.1:(\d+) ([A-Z]+) (\S+) (\d\.\d\d) (\d+) B "
        r"(\d+\.\d) ms"
    )
    logged = [m.groups() for m in map(line.fullmatch, server.log().splitlines()) if m]
    # The readiness probe of `start_server` (.well-known/core) comes first.
    assert logged[0][1:4] == ("GET", "/.well-known/core", "2.05"), logged
    port = logged[1][0]
    for (method, path, response), entry in zip(requests, logged[1:], strict=False):
        assert entry[0] == port
        assert entry[1:5] == (method, "/" + path, response.code.dotted, str(len(response.payload)))
    assert [e[3] for e in logged[1:6]] == ["2.05", "2.05", "4.04", "4.05", "4.05"]
    blocks = logged[6:]
    assert [e[1:4] for e in blocks] == [("GET", "/big.bin", "2.05")] * len(blocks)
    assert len(blocks) == -(-2500 // 1024), blocks  # aiocoap asks for 1024-byte blocks
    assert sum(int(e[4]) for e in blocks) == 2500
    assert len(logged) == 6 + len(blocks)


# --- the real process with a journal: its socket is the test's --------------------------------


def journal_wrapper(sock: Path) -> list[str]:
    """Run the server in a mount namespace of its own whose /run/systemd/journal/socket is `sock`
    (a tmpfs over /run there; nothing changes for anyone else)."""
    script = " && ".join(
        [
            "mount -t tmpfs tmpfs /run",
            "mkdir -p /run/systemd/journal",
            "touch /run/systemd/journal/socket",
            'mount --bind "$0" /run/systemd/journal/socket',
            'exec "$@"',
        ]
    )
    return ["unshare", "--mount", "--propagation=private", "sh", "-c", script, str(sock)]


def as_journal(log: Path) -> dict[str, str]:
    """JOURNAL_STREAM naming `log`: stderr is "the journal" for the server started on it."""
    log.touch()
    st = os.stat(log)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.mark.needs_root
def test_server_logs_to_the_journal_with_fields(
    tmp_path: Path, journal: FakeJournal, start_server: Servers, client: Client
) -> None:
    """With stderr the journal, the server's records (the access log's fields among them) go to
    the native socket, not to stderr; a fatal start-up line goes to stderr at <3>."""
    if os.geteuid() != 0:
        missing("needs root: a mount namespace with the test's journal socket")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    log = start_server.next_log()
    server = start_server.start(
        "--access-log",
        "-v",
        root=root,
        wrapper=journal_wrapper(journal.path),
        env=as_journal(log),
    )
    server.wait_ready(lambda: client.answers(server.uri(".well-known/core")))
    assert client.get(server.uri("a.txt")).payload == b"hello\n"
    assert client.get(server.uri("nope")).code == Code.NOT_FOUND
    assert server.stop() == 0

    entries = journal.entries(until=lambda got: any("Stopping" in e["MESSAGE"] for e in got))
    ready = [e for e in entries if "Ready" in e["MESSAGE"]]
    assert ready and ready[0]["PRIORITY"] == "6", entries
    access = [e for e in entries if e.get("LOGGER") == "coapfs.access"]
    by_path = {e["PATH"]: e for e in access}
    assert by_path["/a.txt"]["CODE"] == "2.05" and by_path["/a.txt"]["BYTES"] == "6"
    assert by_path["/nope"]["CODE"] == "4.04"
    for e in access:
        assert e["METHOD"] == "GET" and e["REMOTE"] == "127.0.0.1" and e["PRIORITY"] == "6"
        assert int(e["REMOTE_PORT"]) > 0 and float(e["DURATION_MS"]) >= 0
        assert "IDENTITY" not in e  # no credentials, no identity
    # Nothing went to stderr: the journal had it all.
    assert server.log() == "", server.log()

    # A start that fails: the reason is one line at <3> on stderr (what systemd's stream reader
    # files at err), whether or not the native socket is there.
    port = server.port
    assert port is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        failed_log = tmp_path / "failed.log"
        with failed_log.open("wb") as out:
            status = subprocess.run(
                [*journal_wrapper(journal.path), *COAPFS, "--bind", f"127.0.0.1:{port}", str(root)],
                env=environment(as_journal(failed_log)),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=30,
            ).returncode
    assert status == 1
    text = failed_log.read_text()
    assert re.fullmatch(
        rf"<3>coap-fileserver: cannot bind 127\.0\.0\.1:{port}: Address already in use"
        rf" \(held by process {os.getpid()} \(\S+\)\)\n",
        text,
    ), text


def test_fatal_configuration_line_is_at_err_on_the_journal_stream(tmp_path: Path) -> None:
    """A bad bind is a configuration error: exit 78, one line, <3> where stderr is the journal
    and plain elsewhere."""
    log = tmp_path / "stderr"
    for env, prefix in [(as_journal(log), "<3>"), ({"JOURNAL_STREAM": ""}, "")]:
        with log.open("wb") as out:
            status = subprocess.run(
                [*COAPFS, "--bind", "no:such:address", str(tmp_path)],
                env=environment(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=30,
            ).returncode
        assert status == 78
        text = log.read_text()
        assert text.startswith(f"{prefix}coap-fileserver: command line: bind = ["), text
        assert text.count("\n") == 1, text
