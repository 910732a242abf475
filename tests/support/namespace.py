"""A network and mount namespace of the test's own, held by a keeper process.

The keeper (this file run as a script, under `unshare --net --mount`) runs the commands it is
given inside the namespaces, one at a time, and is the child subreaper of everything they start,
so daemons that detach (glusterd, FUSE clients) stay its children. When told to stop — or when
its stdin closes because the test process is gone — it SIGKILLs its children (nothing but what
it started can be among them), reaps them and exits; mounts made in its mount namespace vanish
with the namespace. Nothing made inside is visible outside but through `outside(path)`
(/proc/KEEPER/root), and no address bound inside is reachable from the host's network.

Processes that must see the namespace's mounts but speak on the host's network (the servers under
test) run under `enter_mounts()` (`nsenter --mount`, which execs: the PID is the process's).
The keeper needs nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Ran:
    """A command run inside: its exit status (None: killed at its timeout) and its output."""

    argv: list[str]
    returncode: int | None
    output: str

    def __str__(self) -> str:
        status = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return f"{' '.join(self.argv)}: {status}\n{self.output.rstrip()}"


class NamespaceError(RuntimeError):
    """A step inside the namespace failed; the message says which and what it printed."""


class Namespace:
    """A network namespace (only loopback, up) and mount namespace, for as long as it is open."""

    def __init__(self, log: Path, *, unshare: str = "unshare", nsenter: str = "nsenter") -> None:
        self._nsenter = nsenter
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [unshare, "--net", "--mount", "--propagation", "private", sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._buffer = b""
        try:
            ready = self._reply(10)
            if ready.get("ready") != self.proc.pid:
                raise NamespaceError(f"the namespace keeper did not start: {ready}")
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The keeper's PID: /proc/PID/ns/{net,mnt} are the namespaces."""
        return self.proc.pid

    def outside(self, path: Path) -> Path:
        """`path` inside the mount namespace, as this process (outside it) reaches it."""
        return Path(f"/proc/{self.pid}/root{path}")

    def enter_mounts(self, cwd: Path) -> list[str]:
        """A command prefix: run in the mount namespace (working directory `cwd`), on the host's
        network."""
        return [self._nsenter, f"--target={self.pid}", "--mount", f"--wd={cwd}", "--"]

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> Ran:
        """Run `argv` inside both namespaces, stdout and stderr together; NamespaceError if it
        fails (with `check`) or outlives `timeout` seconds."""
        self._send({"run": list(argv), "timeout": timeout})
        reply = self._reply(timeout + 10)
        ran = Ran(list(argv), reply["returncode"], reply["output"])
        if check and ran.returncode != 0:
            raise NamespaceError(str(ran))
        return ran

    def close(self) -> list[int]:
        """Kill everything started inside and end the keeper; the PIDs killed."""
        killed: list[int] = []
        if self.proc.poll() is None:
            try:
                self._send({"stop": True})
                killed = self._reply(20).get("killed", [])
            except (NamespaceError, OSError):
                pass
            finally:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the keeper's own PID, which we started
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return killed

    def _send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise NamespaceError(f"the namespace keeper did not answer in {timeout:g} s")
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise NamespaceError(f"the namespace keeper exited ({self.proc.wait()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


# --- the keeper ------------------------------------------------------------------------------


def _children() -> list[int]:
    me = os.getpid()
    text = Path(f"/proc/{me}/task/{me}/children").read_text()
    return [int(pid) for pid in text.split()]


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run(argv: list[str], timeout: float) -> dict:
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        except OSError as e:
            return {"returncode": 127, "output": str(e)}
        try:
            returncode: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        output.seek(0)
        text = output.read().decode(errors="replace")
    return {"returncode": returncode, "output": text}


def _kill_all() -> list[int]:
    """SIGKILL every child (daemons included: we are their subreaper) until none is left."""
    killed: set[int] = set()
    deadline = time.monotonic() + 15
    while (children := _children()) and time.monotonic() < deadline:
        for pid in children:
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
        _reap()
    return sorted(killed)


def _keep() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    out = sys.stdout.buffer

    def reply(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    reply({"ready": os.getpid()})
    for line in sys.stdin.buffer:
        command = json.loads(line)
        _reap()
        if "run" in command:
            reply(_run(command["run"], command["timeout"]))
        elif "stop" in command:
            reply({"killed": _kill_all()})
            return
    _kill_all()  # stdin closed: the test process is gone


if __name__ == "__main__":
    _keep()
