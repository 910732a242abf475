"""What an administrator meets (issue 12), checked on the real process: `--check-config` and the
service agree on relative paths, `write = true` on a root that cannot be written warns once,
and observers are told with a 5.03 when the server stops.

The journal's side (native protocol, the access log's fields) is tests/test_journal.py; the
packaged service in a booted systemd is tests/test_package.py.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code

from support.client import Client
from support.observer import Observer
from support.ports import free_udp_port
from support.repo import environment
from support.server import COAPFS, Servers
from support.tools import missing

PROG = "coap-fileserver"
UNWRITABLE = "write = true, but"


# --- item 2: relative paths mean the same to --check-config and to the service --------------


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COAPFS, *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_and_service_take_a_relative_root_against_the_file(
    tmp_path: Path, client: Client
) -> None:
    """`root = "data"` in /some/dir/server.toml is /some/dir/data, from whatever directory the
    check runs (issue 12.2: it used to check the shell's directory, and exit 78 where the
    service, running elsewhere, was fine). The service, started from yet another directory,
    serves exactly what the check named."""
    confdir = tmp_path / "etc"
    (confdir / "data").mkdir(parents=True)
    (confdir / "data" / "here.txt").write_text("beside the file\n")
    port = free_udp_port()
    conf = confdir / "server.toml"
    conf.write_text(f'root = "data"\nbind = ["127.0.0.1:{port}"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no data/ here: a check against the working directory would exit 78

    checked = run_in(elsewhere, "--check-config", "--config", str(conf))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == (f"{PROG}: configuration OK ({conf}); serving {confdir / 'data'}\n"), (
        checked.stdout
    )
    # Named relative to the shell, the file itself is found from there; the root still is not.
    relative = run_in(tmp_path, "--check-config", "--config", "etc/server.toml")
    assert relative.returncode == 0, relative.stderr
    assert relative.stdout.endswith(f"; serving {confdir / 'data'}\n"), relative.stdout

    # A drop-in's relative path is taken against the drop-in's own directory.
    (confdir / "server.d" / "data2").mkdir(parents=True)
    (confdir / "server.d" / "10-root.toml").write_text('root = "data2"\n')
    dropped = run_in(elsewhere, "--check-config", "--config", str(conf))
    assert dropped.stdout.endswith(f"; serving {confdir / 'server.d' / 'data2'}\n"), dropped
    (confdir / "server.d" / "10-root.toml").unlink()

    # The service, started from that other directory, serves what the check named.
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*COAPFS, "--config", str(conf)],
            cwd=elsewhere,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        got = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                got = client.get(f"coap://127.0.0.1:{port}/here.txt", timeout=2)
                break
            except Exception:
                time.sleep(0.1)
        assert got is not None, log.read_text()
        assert (got.code, got.payload) == (Code.CONTENT, b"beside the file\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()

    # On the command line a relative root is the shell's: the same rule as any program's
    # arguments, and what --check-config then reports.
    (elsewhere / "cli").mkdir()
    by_option = run_in(elsewhere, "--check-config", "--config", str(conf), "cli")
    assert by_option.stdout.endswith(f"; serving {elsewhere / 'cli'}\n"), by_option


# --- item 6: write = true meets a root that cannot be written ---------------------------------


def unwritable_wrappers(root: Path) -> dict[str, list[str]]:
    """Ways to start the server so that it cannot write `root` (made r-x for all), by reason."""
    root.chmod(0o555)
    if os.geteuid() != 0:
        # As any user but root, a directory without write permission is the plain case.
        return {f"user {pwd.getpwuid(os.geteuid()).pw_name} lacks write permission": []}
    return {
        # Root bypasses permission bits through CAP_DAC_OVERRIDE; without it (and its
        # sibling) root obeys them like anyone: the "missing permission" case of a service user.
        "user root lacks write permission": [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-all",
        ],
        # The way ProtectSystem=strict makes it: a read-only bind mount of the root, in a mount
        # namespace of the server's own.
        "it is on a read-only mount": [
            "unshare",
            "--mount",
            "--propagation=private",
            "sh",
            "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
            str(root),
        ],
    }


def test_write_true_on_an_unwritable_root_warns_once(
    tmp_path: Path, start_server: Servers, client: Client
) -> None:
    """One warning at start naming the reason, the example drop-in and the chown to run; PUT is
    then refused, and a reload that changes nothing about write or root does not repeat it."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    for reason, wrapper in unwritable_wrappers(root).items():
        server = start_server.start("--write", root=root, wrapper=wrapper, notify=True)
        server.notify.wait_for("READY")
        got = client.put(server.uri("new.txt"), b"x", timeout=20)
        assert got.code == Code.FORBIDDEN, (got, got.payload)
        assert not (root / "new.txt").exists()
        server.send(signal.SIGHUP)
        server.notify.wait_for("RELOADING")
        server.notify.wait_for("READY")
        assert server.stop() == 0
        warnings = [line for line in server.log().splitlines() if UNWRITABLE in line]
        assert len(warnings) == 1, server.log()
        (line,) = warnings
        assert " WARNING " in line, line
        assert f"{UNWRITABLE} {root} cannot be written: {reason}" in line, line
        assert "/usr/share/doc/coap-fileserver/examples/write.conf" in line, line
        assert f"chown coap-fileserver:coap-fileserver {root}" in line, line

    # Where it can write, nothing is said.
    root.chmod(0o755)
    server = start_server(root, "--write")
    assert client.put(server.uri("new.txt"), b"x", timeout=20).code == Code.CREATED
    assert server.stop() == 0
    assert UNWRITABLE not in server.log()


# --- item 8: observers are told when the service stops ---------------------------------------


STOP_GRACE = 2.0  # coapfs.daemon.supervisor.STOP_GRACE


@pytest.mark.parametrize("what", ["a.txt", ""])
def test_observers_get_a_final_503_when_the_server_stops(
    tmp_path: Path, start_server: Servers, client: Client, what: str
) -> None:
    """RFC 7641 §4.2: an observation may end with an error. On SIGTERM every observer of a file
    or directory gets a 5.03 notification within the stop grace period, then the server exits
    0, rather than leaving the observers waiting for Max-Age."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("hello\n")
    server = start_server(root)
    observers = [Observer(client, server.uri(what)) for _ in range(2)]
    for observer in observers:
        assert observer.first.code == Code.CONTENT and observer.first.opt.observe is not None
    sent = time.monotonic()
    server.send(signal.SIGTERM)
    for observer in observers:
        final = observer.wait_for(lambda m: m.code == Code.SERVICE_UNAVAILABLE, STOP_GRACE + 1)
        arrived = time.monotonic() - sent
        assert final is not None, (observer.notifications, observer.ended, server.log())
        assert arrived <= STOP_GRACE + 0.5, arrived
        assert final.payload == b"Shutting down", final.payload
        # An error ends the observation (RFC 7641 §3.2): the client's iterator says so.
        assert observer.wait_ended(5), observer.notifications
    assert server.proc.wait(20) == 0, server.log()


# --- item 5: who holds the port, when the holder cannot be seen ---------------------------------


@pytest.mark.needs_root
def test_port_holder_that_cannot_be_seen_is_named_by_its_user(tmp_path: Path) -> None:
    """The unit's sandbox (ProtectProc=invisible, ProcSubset=pid) hides other users' processes
    and /proc/net: the socket table is still read (through /proc/self/net) and its owner named.
    Here the server runs in a PID namespace of its own, so the holder (this test) is invisible."""
    if os.geteuid() != 0:
        missing("needs root: a PID namespace with its own /proc")
    root = tmp_path / "root"
    root.mkdir()
    port = free_udp_port()
    hidden = ["unshare", "--pid", "--fork", "--mount-proc"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        result = subprocess.run(
            [*hidden, *COAPFS, "--bind", f"127.0.0.1:{port}", str(root)],
            env=environment(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr == (
        f"{PROG}: cannot bind 127.0.0.1:{port}: Address already in use (held by a process of"
        " user root, not visible here; ss -ulpn names it)\n"
    )
