"""The channel between the supervisor and a worker process: a unix SOCK_SEQPACKET socket pair,
one message a packet (pickled: both ends are this program), with descriptors passed alongside
(SCM_RIGHTS) for the sockets of new bind addresses."""

from __future__ import annotations

import asyncio
import pickle
import socket
from typing import Any

_MAX_MESSAGE = 1 << 20
_MAX_FDS = 64
#: How long a send waits for room when the other end does not read (a stalled worker).
FULL_WAIT = 5.0


def pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the worker's end), the worker's inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


class Channel:
    """One end, driven by the asyncio loop: `send` now, `receive` awaits the next message."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._queue: asyncio.Queue[tuple[Any, list[int]] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    def _readable(self) -> None:
        try:
            data, fds, _flags, _address = socket.recv_fds(self.sock, _MAX_MESSAGE, _MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._end()
            return
        self._queue.put_nowait((pickle.loads(data), fds))

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self._queue.put_nowait(None)

    def send(self, message: Any, fds: list[int] | None = None) -> None:
        """Send one message (and descriptors); raises ConnectionError if the other end is gone."""
        data = pickle.dumps(message)
        try:
            try:
                socket.send_fds(self.sock, [data], fds or [])
            except BlockingIOError:
                # The peer does not read (a stalled worker): wait for room, briefly, blocking.
                self.sock.settimeout(FULL_WAIT)
                try:
                    socket.send_fds(self.sock, [data], fds or [])
                finally:
                    self.sock.setblocking(False)
        except OSError as e:  # gone, or still no room after that (TimeoutError)
            raise ConnectionError(str(e)) from None

    async def receive(self) -> tuple[Any, list[int]] | None:
        """The next message and its descriptors, or None once the other end has gone."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    def close(self) -> None:
        self._end()
        self.sock.close()
