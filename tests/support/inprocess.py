"""The file service in the test's own process (real UDP, real inotify), so that a test can read
its figures (`FileService.stats()`) and drive it on its own event loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiocoap

from coapfs.config import CacheConfig, Config
from coapfs.protocol.resource import FileService

from support.client import Client
from support.ports import free_udp_port


class InProcess:
    """A FileService of `root` on a free loopback port, run on the client's event loop."""

    def __init__(self, client: Client, root: Path, **cache) -> None:
        self.client = client
        self.config = Config(root=root, cache=CacheConfig(**{"poll_interval": 0.2, **cache}))
        self.site = FileService(self.config.service)
        port = free_udp_port()
        self.base = f"coap://127.0.0.1:{port}"
        self.context = client.run(
            aiocoap.Context.create_server_context(self.site, bind=("127.0.0.1", port))
        )

    def uri(self, path: str) -> str:
        return f"{self.base}/{path}"

    def inspect(self, fn):
        """Run `fn` on the server's loop thread, where its state lives."""

        async def call():
            return fn()

        return self.client.run(call())

    def stats(self) -> dict:
        return self.inspect(self.site.stats)

    def watched(self) -> dict[Path, bool]:
        return self.stats()["watched"]

    def reconfigure(self, **cache) -> None:
        config = dataclasses.replace(self.config, cache=CacheConfig(**cache))
        self.inspect(lambda: self.site.apply(self.site.prepare(config.service)))

    def close(self) -> None:
        self.client.run(self.context.shutdown())
        self.inspect(self.site.close)
