"""Shared test fixtures: the real server in its own process on loopback, a real aiocoap client,
and libcoap's coap-client as an independent peer."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiocoap
import pytest

from coapfs.daemon.credentials import prepare_credentials

IN_CI = os.environ.get("CI") == "true"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A synchronous face on aiocoap's client, running its own event loop in a thread."""

    def __init__(self, credentials: Path | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        if credentials is None:
            self.context = self.run(aiocoap.Context.create_client_context())
        else:
            # On Debian 13 aiocoap leaves OSCORE out of a client's default transports (ge25519
            # and lakers are not packaged): name it, with the lakers placeholder in place.
            prepare_credentials(None)
            self.context = self.run(
                aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
            )
            self.context.client_credentials.load_from_dict(_load_json(credentials))

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, message: aiocoap.Message, timeout: float = 30) -> aiocoap.Message:
        """One exchange; a request that names a Block2 gets exactly that block back."""
        blockwise = message.opt.block2 is None

        async def send() -> aiocoap.Message:
            return await self.context.request(message, handle_blockwise=blockwise).response

        return self.run(send(), timeout)

    def close(self) -> None:
        self.run(self.context.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _load_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


class Server:
    """`python -m coapfs` serving `root` on a free loopback port."""

    def __init__(self, root: Path, *args: str, log: Path, wrapper: Sequence[str] = ()) -> None:
        self.root = root
        self.port = free_udp_port()
        self.base = f"coap://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        command = [sys.executable, "-m", "coapfs", "--bind", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            [*wrapper, *command, *args, str(root)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )

    def uri(self, path: str) -> str:
        return f"{self.base}/{path}"

    def wait_ready(self, client: Client, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                msg = aiocoap.Message(code=aiocoap.GET, uri=self.uri(".well-known/core"))
                if client.request(msg, timeout=2).code.is_successful():
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"server did not answer: {self.log_path.read_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    c = Client()
    yield c
    c.close()


class Servers:
    """Starts servers; `stop_all` stops them and checks no log holds a traceback."""

    def __init__(self, logdir: Path, client: Client) -> None:
        self.logdir, self.client, self.started = logdir, client, []

    def __call__(self, root: Path, *args: str) -> Server:
        server = Server(root, *args, log=self.logdir / f"server{len(self.started)}.log")
        self.started.append(server)
        server.wait_ready(self.client)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
        for server in self.started:
            assert "Traceback" not in server.log_text(), server.log_text()


@pytest.fixture
def start_server(tmp_path: Path, client: Client) -> Iterator[Servers]:
    servers = Servers(tmp_path, client)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory, client: Client) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("logs"), client)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def coap_client() -> str:
    """libcoap's command line client (Debian libcoap3-bin)."""
    for name in ("coap-client", "coap-client-notls", "coap-client-gnutls", "coap-client-openssl"):
        path = shutil.which(name)
        if path:
            return path
    if IN_CI:
        pytest.fail("libcoap's coap-client is not installed (apt-get install libcoap3-bin)")
    pytest.skip("libcoap's coap-client is not installed")


def get(client: Client, uri: str, **options) -> aiocoap.Message:
    return client.request(aiocoap.Message(code=aiocoap.GET, uri=uri, **options))
