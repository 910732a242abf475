"""The supervisor as systemd sees it: a real NOTIFY_SOCKET, the real process, real CoAP.

Each test starts `python -m coapfs` on free loopback ports with NOTIFY_SOCKET pointing at a
unix datagram socket bound here, and checks the sd_notify conversation against what the
server actually does on the wire.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from support.client import Client
from support.polling import wait_until
from support.ports import free_udp_port, port_is_bound
from support.server import Server, Servers, run_coapfs

EX_CONFIG = 78


@pytest.fixture
def process(start_server: Servers):
    """Starts `python -m coapfs ARGS` with NOTIFY_SOCKET set (and `env`), not awaited."""

    def start(args: list[str], env: dict[str, str] | None = None) -> Server:
        return start_server.start(*args, notify=True, env=env)

    return start


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "a.txt").write_text("hello\n")
    return r


def uri(port: int, path: str) -> str:
    return f"coap://127.0.0.1:{port}/{path}"


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_only_when_serving_then_status_watchdog_and_clean_stop(
    process, root: Path, client: Client
) -> None:
    port = free_udp_port()
    p = process(
        ["--bind", f"127.0.0.1:{port}", str(root)],
        env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "", "JOURNAL_STREAM": ""},
    )
    ready = p.notify.wait_for("READY")
    # The moment READY=1 arrives the socket is bound and requests are answered.
    assert port_is_bound(port)
    response = client.get(uri(port, "a.txt"), timeout=20)
    assert response.code == Code.CONTENT and response.payload == b"hello\n"
    status = ready["STATUS"]
    assert str(root) in status and f"127.0.0.1:{port}" in status and "read-only" in status
    # Pings come from the event loop at half the interval: at least two per interval.
    start = time.monotonic()
    p.notify.collect(3.0)
    pings = [t for t, _ in p.notify.all("WATCHDOG") if t >= start]
    gaps = [b - a for a, b in zip([start, *pings], pings, strict=False)]
    assert len(pings) >= 5, pings
    assert max(gaps) < 1.0, gaps
    # STATUS= is refreshed with the traffic seen (the GET above).
    p.notify.collect(5.5)
    statuses = [m["STATUS"] for _, m in p.notify.all("STATUS")]
    served = [int(re.search(r"(\d+) requests", s).group(1)) for s in statuses]
    assert served[0] == 0 and max(served) >= 1, statuses
    assert p.stop(signal.SIGTERM) == 0
    assert not port_is_bound(port)


def test_repeated_signals_during_stop_still_exit_0(process, root: Path, client: Client) -> None:
    """A second SIGTERM (impatient operator) and a SIGHUP during the grace period change
    nothing: the stop completes and the exit status is 0, not death by signal."""
    port = free_udp_port()
    p = process(["--bind", f"127.0.0.1:{port}", str(root)])
    p.notify.wait_for("READY")
    assert client.get(uri(port, "a.txt"), timeout=20).code == Code.CONTENT
    p.send(signal.SIGTERM)
    p.notify.wait_for("STOPPING")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if p.proc.poll() is None:
            p.proc.send_signal(sig)
    assert p.proc.wait(20) == 0, p.log()


CONFIG = """\
root = "{root}"
bind = ["127.0.0.1:{port}"]
etag_length = {etag_length}
write = {write}
"""


def test_reload_applies_good_and_keeps_running_on_bad(
    process, start_server: Servers, root: Path, tmp_path: Path, client: Client
) -> None:
    conf = tmp_path / "server.toml"
    port, port2 = free_udp_port(), free_udp_port()
    conf.write_text(CONFIG.format(root=root, port=port, etag_length=8, write="false"))

    # stderr is "the journal" for this run: JOURNAL_STREAM names the log file.
    log = start_server.next_log()
    log.touch()
    log_stat = os.stat(log)
    p = process(
        ["--config", str(conf), "-v"],
        env={
            "JOURNAL_STREAM": f"{log_stat.st_dev}:{log_stat.st_ino}",
            "WATCHDOG_USEC": "1000000",
            "WATCHDOG_PID": "1",  # meant for another process: no pings from us
        },
    )
    p.notify.wait_for("READY")
    assert len(client.get(uri(port, "a.txt"), timeout=20).opt.etag) == 8
    assert client.put(uri(port, "b.txt"), b"one", timeout=20).code == Code.METHOD_NOT_ALLOWED

    def reload() -> dict[str, str]:
        before = monotonic_usec()
        p.send(signal.SIGHUP)
        reloading = p.notify.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        ready = p.notify.wait_for("READY")
        assert ready["READY"] == "1"
        return ready

    # A good edit takes effect without a restart.
    conf.write_text(CONFIG.format(root=root, port=port, etag_length=2, write="true"))
    status = reload()["STATUS"]
    assert "read-write" in status and "FAILED" not in status
    assert len(client.get(uri(port, "a.txt"), timeout=20).opt.etag) == 2
    assert client.put(uri(port, "b.txt"), b"one", timeout=20).code == Code.CREATED
    assert (root / "b.txt").read_bytes() == b"one"

    # A bad edit: the old configuration stays in force, and STATUS= says why.
    conf.write_text(CONFIG.format(root=root, port=port, etag_length=99, write="false"))
    status = reload()["STATUS"]
    assert f"{conf}: etag_length = 99: expected an integer from 0 to 8" in status
    assert p.proc.poll() is None
    assert len(client.get(uri(port, "a.txt"), timeout=20).opt.etag) == 2
    assert client.put(uri(port, "b.txt"), b"two", timeout=20).code == Code.CHANGED

    # So does a root that cannot be opened.
    conf.write_text(CONFIG.format(root=tmp_path / "gone", port=port, etag_length=2, write="true"))
    status = reload()["STATUS"]
    assert f'{conf}: root = "{tmp_path / "gone"}": No such file or directory' in status
    assert client.get(uri(port, "a.txt"), timeout=20).payload == b"hello\n"

    # Re-bind only what changed; a drop-in beside the file is read too.
    conf.write_text(CONFIG.format(root=root, port=port2, etag_length=2, write="true"))
    (tmp_path / "server.d").mkdir()
    (tmp_path / "server.d" / "50-readonly.toml").write_text("write = false\n")
    status = reload()["STATUS"]
    assert f"127.0.0.1:{port2}" in status and "read-only" in status and "FAILED" not in status
    assert not port_is_bound(port)
    assert client.get(uri(port2, "b.txt"), timeout=20).payload == b"two"
    assert client.put(uri(port2, "b.txt"), b"three", timeout=20).code == Code.METHOD_NOT_ALLOWED

    assert not p.notify.all("WATCHDOG")  # WATCHDOG_PID named someone else
    assert p.stop(signal.SIGINT) == 0

    # Journal format: priority prefixes instead of timestamps; the failures at <3> (error).
    lines = p.log().splitlines()
    assert lines and all(line.startswith(("<", " ")) for line in lines), lines
    errors = [line for line in lines if line.startswith("<3>")]
    assert len(errors) == 2 and all("Reload failed" in line for line in errors), lines
    assert any(line.startswith("<6>coapfs.daemon.supervisor: Ready") for line in lines), lines


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_coapfs(args, capture_output=True, text=True, timeout=timeout)


def test_check_config_good_and_bad(tmp_path: Path, root: Path) -> None:
    conf = tmp_path / "server.toml"
    port = free_udp_port()
    conf.write_text(CONFIG.format(root=root, port=port, etag_length=8, write="false"))
    # It binds nothing: the configured port may well be in use.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        result = run(["--check-config", "--config", str(conf)])
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout and result.stderr == ""

    (tmp_path / "server.d").mkdir()
    bad = tmp_path / "server.d" / "10-bad.toml"
    bad.write_text("[cache]\nmode = 'fast'\n")
    for args in (["--check-config", "--config", str(conf)], ["--config", str(conf)]):
        result = run(args)
        assert result.returncode == EX_CONFIG
        assert result.stderr.count("\n") == 1, result.stderr
        assert f'{bad}: cache.mode = "fast": expected' in result.stderr

    bad.unlink()
    conf.write_text(CONFIG.format(root=tmp_path / "nope", port=port, etag_length=8, write="true"))
    result = run(["--check-config", "--config", str(conf)])
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        f'coap-fileserver: {conf}: root = "{tmp_path / "nope"}": No such file or directory'
        "; expected a readable directory\n"
    )
    result = run(["--check-config", "--config", str(tmp_path / "missing.toml")])
    assert result.returncode == EX_CONFIG
    assert f"{tmp_path / 'missing.toml'}: cannot read" in result.stderr

    # The command line is checked by the same schema, and a bad root is configuration too.
    result = run(["--etag-length", "9", str(root)])
    assert (result.returncode, result.stderr.count("\n")) == (EX_CONFIG, 1)
    assert "command line: etag_length = 9" in result.stderr
    result = run(["--bind", f"127.0.0.1:{port}", str(root / "a.txt")])
    assert (result.returncode, result.stderr.count("\n")) == (EX_CONFIG, 1)
    assert "Not a directory" in result.stderr


def test_port_in_use_is_one_line_and_failure(tmp_path: Path, root: Path) -> None:
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        result = run(["--bind", f"127.0.0.1:{port}", str(root)])
    assert result.returncode == 1
    # The holder is found and named: this test's own process.
    assert result.stderr == (
        f"coap-fileserver: cannot bind 127.0.0.1:{port}: Address already in use "
        f"(held by {this_process()})\n"
    )


def this_process() -> str:
    comm = Path("/proc/self/comm").read_text().strip()
    return f"process {os.getpid()} ({comm})"


def process_gone(pid: int) -> bool:
    """Gone, or a zombie waiting for whichever init adopted it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_daemon_detaches_writes_pidfile_and_stops(
    tmp_path: Path, root: Path, client: Client
) -> None:
    port = free_udp_port()
    pidfile = tmp_path / "run" / "coapfs.pid"
    pidfile.parent.mkdir()
    log = tmp_path / "daemon.log"
    args = ["--daemon", "--pidfile", str(pidfile), "-v"]
    with log.open("wb") as stderr:
        # The starter returns once the daemon serves (stderr is a file: the daemon keeps it).
        started = run_coapfs(
            [*args, "--bind", f"127.0.0.1:{port}", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=30,
        )
    pid = int(pidfile.read_text())
    try:
        assert started.returncode == 0, log.read_text()
        assert not process_gone(pid)
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(status.split("PPid:")[1].split()[0])
        assert ppid != os.getpid()
        # A session of its own (double fork: not its leader, so it never gets a terminal).
        assert os.getsid(pid) not in (os.getsid(0), pid)
        assert client.get(uri(port, "a.txt"), timeout=20).payload == b"hello\n"
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")

        # A second one with the same pid file refuses, in the foreground, with one line.
        second = run([*args, "--bind", f"127.0.0.1:{free_udp_port()}", str(root)])
        assert second.returncode == 1
        assert second.stderr == f"coap-fileserver: {pidfile}: already running as process {pid}\n"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: process_gone(pid), 20, what=f"the daemon ({pid}) is gone")
    assert not pidfile.exists()
    text = log.read_text()
    assert "Ready" in text and "Stopping" in text and "Traceback" not in text, text

    # A daemon that cannot start says why, and the starter's exit status says so too.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        failed = run([*args, "--bind", f"127.0.0.1:{port}", str(root)])
    assert failed.returncode == 1
    assert failed.stderr == (
        f"coap-fileserver: cannot bind 127.0.0.1:{port}: Address already in use "
        f"(held by {this_process()})\n"
    )
    assert not pidfile.exists()


def test_registers_with_a_resource_directory_and_deregisters_on_stop(
    process, root: Path, tmp_path: Path, client: Client
) -> None:
    rd_port, port = free_udp_port(), free_udp_port()
    with (tmp_path / "rd.log").open("wb") as rd_log:
        rd = subprocess.Popen(
            [sys.executable, "-m", "aiocoap.cli.rd", "--bind", f"127.0.0.1:{rd_port}"],
            stdout=rd_log,
            stderr=subprocess.STDOUT,
        )
    try:
        lookup = f"coap://127.0.0.1:{rd_port}/endpoint-lookup/"

        def registered() -> str:
            msg = aiocoap.Message(code=aiocoap.GET, uri=lookup)
            return client.request(msg, timeout=20).payload.decode()

        # The RD takes a moment to start.
        wait_until(lambda: client.answers(lookup), 20, what="the RD answers", interval=0.2)
        p = process(
            ["--bind", f"127.0.0.1:{port}", "--register", f"coap://127.0.0.1:{rd_port}", str(root)]
        )
        p.notify.wait_for("READY")
        base = f'base="coap://127.0.0.1:{port}"'
        wait_until(lambda: base in registered(), 20, what="registered", interval=0.2)
        assert p.stop() == 0
        assert base not in registered()
    finally:
        rd.terminate()
        rd.wait(10)
