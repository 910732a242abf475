"""An observation (RFC 7641) from the real aiocoap client, recording every notification."""

from __future__ import annotations

import asyncio
import threading

import aiocoap

from support.client import Client


class Observer:
    """An observation from the real aiocoap client, recording every notification."""

    def __init__(self, client: Client, uri: str, *, blockwise: bool = True) -> None:
        self.client = client
        self.notifications: list[aiocoap.Message] = []
        self.ended: Exception | None = None
        self._changed = threading.Condition()

        async def start() -> aiocoap.Message:
            self.request = client.context.request(
                aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0), handle_blockwise=blockwise
            )
            first = await self.request.response
            self.task = asyncio.ensure_future(self._consume())
            return first

        self.first = client.run(start())

    async def _consume(self) -> None:
        try:
            async for message in self.request.observation:
                self._notified(message)
        except Exception as e:
            self._ended(e)
        else:
            self._ended(StopAsyncIteration())

    def _notified(self, message: aiocoap.Message) -> None:
        with self._changed:
            self.notifications.append(message)
            self._changed.notify_all()

    def _ended(self, exception: Exception) -> None:
        with self._changed:
            self.ended = exception
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 10) -> aiocoap.Message | None:
        """The first notification satisfying `predicate` (any, when it is None), or None if none
        arrives within `timeout` seconds."""

        def found() -> aiocoap.Message | None:
            return next((m for m in self.notifications if predicate is None or predicate(m)), None)

        with self._changed:
            return self._changed.wait_for(found, timeout)

    def wait_ended(self, timeout: float = 10) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.ended is not None, timeout)

    def cancel(self) -> None:
        async def cancel() -> None:
            self.request.observation.cancel()
            self.task.cancel()

        self.client.run(cancel())
