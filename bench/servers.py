"""Start, probe, measure and stop the two servers under test, and build their equal roots.

Only processes started here are ever signalled, by their recorded PID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import coapmsg
import proctree

# The repository this bench/ lives in: ours is started from it (cwd and PYTHONPATH), so a
# worktree benchmarks its own coapfs, not whichever one is installed.
REPO = Path(__file__).resolve().parent.parent


def theirs_executable() -> str:
    """aiocoap-fileserver from PATH, else the one beside this interpreter (a virtualenv's bin/)."""
    return shutil.which("aiocoap-fileserver") or str(
        Path(sys.executable).parent / "aiocoap-fileserver"
    )


OURS_CMD = f"{shlex.quote(sys.executable)} -m coapfs --bind 127.0.0.1:{{port}} {{root}}"
THEIRS_CMD = f"{shlex.quote(theirs_executable())} --bind 127.0.0.1:{{port}} {{root}}"

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


class Server:
    """One server process on a free loopback port.

    The command template may use {port} and {root}, and any further field passed as a keyword
    (e.g. {workers}); "{cmd} --write" style extensions are the caller's business.
    """

    def __init__(
        self, name: str, cmd_template: str, root: Path, logdir: Path, **fields: object
    ) -> None:
        self.name = name
        self.root = root
        self.port = free_udp_port()
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        try:
            self.cmd = cmd_template.format(port=self.port, root=shlex.quote(str(root)), **fields)
        except (KeyError, IndexError, ValueError) as e:
            self.cmd = cmd_template
            self.error = f"bad command template {cmd_template!r}: {e!r}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> bool:
        """Start and wait until it answers a CoAP ping; False (with .error) if it never does."""
        if self.error:
            return False
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    shlex.split(self.cmd),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
        except (OSError, ValueError) as e:
            self.error = f"cannot run {self.cmd!r}: {e}"
            return False
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
        return proctree.status_kib(self.pid, "VmHWM") if self.alive() else None

    def rss_kib(self) -> int | None:
        return proctree.status_kib(self.pid, "VmRSS") if self.alive() else None

    def tree_rss_kib(self) -> int | None:
        """VmRSS summed over the server and its workers."""
        return proctree.tree_rss_kib(self.pid) if self.alive() else None

    def tree_hwm_kib(self) -> dict[int, int]:
        """VmHWM of each process of the tree, by PID."""
        return proctree.tree_kib(self.pid, "VmHWM") if self.alive() else {}

    def tree_cpu_seconds(self) -> float:
        return proctree.tree_cpu_seconds(self.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, by PID: this process, then any of its own
        descendants (workers) still alive after it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        descendants = proctree.tree_pids(self.pid)[1:]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in descendants:
            _reap_orphan(pid, self.pid)


def _reap_orphan(pid: int, parent: int, timeout: float = 5.0) -> None:
    """Stop a worker that outlived its server: only if it is still that server's child (or an
    orphan now owned by init), never a recycled PID of some other process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return
    if ppid not in (parent, 1):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
