"""The door in front of the file service: a stop closes it (new requests get 5.03) and waits for
the exchanges in flight."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code


class Gate:
    """Site wrapper that lets a stop refuse new requests and wait for those in flight.

    Observations are long-lived by design and not waited for; every other exchange is
    counted until its rendering is done. Everything else is the wrapped site's.
    """

    def __init__(self, site: Any) -> None:
        self._site = site
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._site, name)

    async def render_to_pipe(self, pipe: Any) -> None:
        if not self._open:
            pipe.add_response(
                aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=b"Shutting down"),
                is_last=True,
            )
            return
        if pipe.request.opt.observe == 0:
            await self._site.render_to_pipe(pipe)
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._site.render_to_pipe(pipe)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def close(self, grace: float) -> int:
        """Refuse new requests; wait up to `grace` seconds; return how many were cut off."""
        self._open = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        return self._in_flight
