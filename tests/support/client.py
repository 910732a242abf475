"""The real aiocoap client, with a synchronous face for the tests."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import aiocoap

from coapfs.daemon.credentials import prepare_credentials


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
            self.context.client_credentials.load_from_dict(json.loads(credentials.read_text()))

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, message: aiocoap.Message, timeout: float = 30) -> aiocoap.Message:
        """One exchange; a request that names a Block2 gets exactly that block back."""
        blockwise = message.opt.block2 is None

        async def send() -> aiocoap.Message:
            return await self.context.request(message, handle_blockwise=blockwise).response

        return self.run(send(), timeout)

    def get(self, uri: str, *, timeout: float = 30, **options) -> aiocoap.Message:
        return self.request(aiocoap.Message(code=aiocoap.GET, uri=uri, **options), timeout)

    def put(self, uri: str, payload: bytes, *, timeout: float = 30, **options) -> aiocoap.Message:
        message = aiocoap.Message(code=aiocoap.PUT, uri=uri, payload=payload, **options)
        return self.request(message, timeout)

    def delete(self, uri: str, *, timeout: float = 30, **options) -> aiocoap.Message:
        return self.request(aiocoap.Message(code=aiocoap.DELETE, uri=uri, **options), timeout)

    def answers(self, uri: str) -> bool:
        """Whether a GET of `uri` is answered with success within 2 s."""
        try:
            return self.get(uri, timeout=2).code.is_successful()
        except Exception:
            return False

    def close(self) -> None:
        self.run(self.context.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
