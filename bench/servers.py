"""Start, probe, measure and stop the two servers under test, and build their equal roots.

Only processes started here are ever signalled, by their recorded PID.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import coapmsg

REPO = Path(__file__).resolve().parent.parent

OURS_CMD = f"{shlex.quote(sys.executable)} -m coapfs --bind 127.0.0.1:{{port}} {{root}}"
THEIRS_CMD = "aiocoap-fileserver --bind 127.0.0.1:{port} {root}"

SMALL_FILES = 64
SMALL_SIZE = 256
LISTING_ENTRIES = 10_000


def free_udp_port() -> int:
    """A currently free loopback UDP port (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_root(root: Path, *, listings: int, big: dict[str, bytes]) -> None:
    """Create the benchmark tree. Called once per server so both get equal, separate trees."""
    (root / "small").mkdir(parents=True)
    for i in range(SMALL_FILES):
        (root / "small" / f"s{i:03d}.txt").write_bytes(bytes([65 + i % 26]) * SMALL_SIZE)
    for name, data in big.items():
        (root / name).write_bytes(data)
    for r in range(listings):
        d = root / f"list{r}"
        d.mkdir()
        for i in range(LISTING_ENTRIES):
            os.close(os.open(d / f"entry-{i:05d}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    (root / "obs" / "dir").mkdir(parents=True)
    (root / "obs" / "watched.txt").write_text("initial\n")


def proc_status_kib(pid: int, key: str) -> int | None:
    """A kB value (VmHWM, VmRSS) from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Server:
    """One server process on a free loopback port."""

    def __init__(self, name: str, cmd_template: str, root: Path, logdir: Path) -> None:
        self.name = name
        self.root = root
        self.port = free_udp_port()
        self.cmd = cmd_template.format(port=self.port, root=shlex.quote(str(root)))
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> bool:
        """Start and wait until it answers a CoAP ping; False (with .error) if it never does."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                shlex.split(self.cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("127.0.0.1", self.port))
            mid = 1
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.error = f"exited with {self.proc.returncode}: {self.last_log_line()}"
                    return False
                try:
                    s.send(coapmsg.Message(mtype=coapmsg.CON, code=0, mid=mid).encode())
                    s.settimeout(0.2)
                    data = s.recv(64)
                    if data and coapmsg.parse(data).mtype == coapmsg.RST:
                        return True
                except (OSError, ValueError):
                    time.sleep(0.1)
                mid += 1
        self.error = f"no answer to CoAP ping in {timeout:g} s: {self.last_log_line()}"
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:160] if lines else ""

    def peak_rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmHWM") if self.alive() else None

    def rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmRSS") if self.alive() else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s: only this process, by its PID."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
