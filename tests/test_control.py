"""The supervisor's channel to a worker: messages and descriptors through a real socket pair,
and a worker that stops reading (stalled) turns sends into ConnectionError, never another
exception that would end the task sending pings."""

from __future__ import annotations

import asyncio
import os

import pytest

from coapfs.daemon import control


def test_messages_and_descriptors_go_through() -> None:
    async def run() -> None:
        ours, theirs = control.pair()
        a, b = control.Channel(ours), control.Channel(theirs)
        read_end, write_end = os.pipe()
        try:
            a.send(("prepare", {"binds": [("::1", 5683)]}), [read_end])
            (message, fds) = await asyncio.wait_for(b.receive(), 5)
            assert message == ("prepare", {"binds": [("::1", 5683)]})
            assert len(fds) == 1
            os.write(write_end, b"x")
            assert os.read(fds[0], 1) == b"x"
            os.close(fds[0])
            a.close()
            assert await asyncio.wait_for(b.receive(), 5) is None
        finally:
            b.close()
            os.close(read_end)
            os.close(write_end)

    asyncio.run(run())


def test_a_peer_that_stops_reading_is_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "FULL_WAIT", 0.2)

    async def run() -> None:
        ours, theirs = control.pair()
        a = control.Channel(ours)
        try:
            with pytest.raises(ConnectionError):
                for n in range(1_000_000):  # the other end never reads: its buffer fills
                    a.send(("ping", n))
        finally:
            a.close()
            theirs.close()

    asyncio.run(run())
