"""`python -m coapfs` in a process of its own: the one way the tests start the real server."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from support.client import Client
from support.notify import NotifySocket
from support.polling import wait_until
from support.ports import free_udp_port
from support.repo import REPO, environment

COAPFS = (sys.executable, "-m", "coapfs")


def run_coapfs(args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m coapfs ARGS` to completion (subprocess.run's keywords), as Server starts it."""
    return subprocess.run([*COAPFS, *args], cwd=REPO, env=environment(), **kwargs)


class Server:
    """`python -m coapfs ARGS` from the repository root; stdout and stderr go to `log`.

    With `root` it serves root on a free loopback port (`--bind` before ARGS, root after them);
    without, ARGS say everything. `notify` binds a NotifySocket there and names it in
    NOTIFY_SOCKET; `env` adds to the environment (which never inherits systemd's service
    variables); `wrapper` is a command the server runs under (unshare, setpriv)."""

    def __init__(
        self,
        *args: str,
        log: Path,
        root: Path | None = None,
        wrapper: Sequence[str] = (),
        notify: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.port: int | None = None
        if root is not None:
            self.port = free_udp_port()
            self.base = f"coap://127.0.0.1:{self.port}"
            args = ("--bind", f"127.0.0.1:{self.port}", *args, str(root))
        self.notify = NotifySocket(notify) if notify is not None else None
        extra = {"NOTIFY_SOCKET": str(notify)} if notify is not None else {}
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [*wrapper, *COAPFS, *args],
            cwd=REPO,
            env=environment({**extra, **(env or {})}),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def uri(self, path: str) -> str:
        return f"{self.base}/{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, answers: Callable[[], bool], timeout: float = 20) -> None:
        """Until `answers()` (fails at once if the server exits meanwhile)."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}): {self.log()}")
            return answers()

        wait_until(ready, timeout, what="the server answers", interval=0.1, details=self.log)

    def send(self, sig: int) -> None:
        assert self.proc.poll() is None, self.log()
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the running server (and, with a notify socket, expect STOPPING=1); its exit
        status."""
        self.send(sig)
        if self.notify is not None:
            self.notify.wait_for("STOPPING")
        return self.proc.wait(20)

    def close(self) -> None:
        """At teardown: SIGTERM if it still runs (SIGKILL after 10 s), then release the log and
        the notify socket."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.notify is not None:
            self.notify.close()


class Servers:
    """Starts servers for a fixture, logging into `logdir`; `close_all` stops them and checks
    that no log holds a traceback."""

    def __init__(self, logdir: Path, client: Client) -> None:
        self.logdir, self.client = logdir, client
        self.started: list[Server] = []

    def next_log(self) -> Path:
        """The log file of the next server started."""
        return self.logdir / f"server{len(self.started)}.log"

    def start(self, *args: str, notify: bool = False, **kwargs) -> Server:
        """A Server (keywords as there; `notify` binds a socket beside the log), not awaited."""
        socket = self.logdir / f"notify{len(self.started)}.sock" if notify else None
        server = Server(*args, log=self.next_log(), notify=socket, **kwargs)
        self.started.append(server)
        return server

    def __call__(self, root: Path, *args: str) -> Server:
        """A server of `root`, once it answers."""
        server = self.start(*args, root=root)
        server.wait_ready(lambda: self.client.answers(server.uri(".well-known/core")))
        return server

    def close_all(self) -> None:
        for server in self.started:
            server.close()
        for server in self.started:
            assert "Traceback" not in server.log(), server.log()
