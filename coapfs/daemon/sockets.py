"""The UDP sockets of every bind address, made once by the supervisor: one SO_REUSEPORT group of
`workers` sockets per address, so that the workers of one server share the port and nobody else
can.

The group's first socket is bound with no options: that bind fails (EADDRINUSE) if anything
holds the same or an overlapping address on the port — another coap-fileserver, any program,
any user — without a window between a check and the bind. Only then does it get SO_REUSEPORT
and the others join it. The supervisor keeps every socket for its lifetime, so the group and
the order of its members (a worker's index) stay the same across worker restarts. Measured on
Linux 6.18: SO_REUSEADDR must never be set on a UDP socket (a later socket with it takes all
traffic, even from another user), and a program of the same user that sets SO_REUSEPORT itself
can still join a group — the steering program then gives it nothing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from aiocoap.numbers import COAP_PORT
from aiocoap.util.asyncio.getaddrinfo_addrconfig import getaddrinfo_routechecked

from ..transport import steering

log = logging.getLogger(__name__)

Bind = tuple[str | None, int | None] | None  # what aiocoap is given as `bind`


class AddressInUse(OSError):
    """The address is held by someone else (another server, program or user)."""


@dataclass
class Group:
    """The sockets of one bind address, in worker order."""

    bind: Bind
    sockaddr: tuple[Any, ...]
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


async def resolve(bind: Bind) -> tuple[Any, ...]:
    """The socket address aiocoap's udp6 transport would bind for `bind` (AF_INET6, IPv4 as
    v4-mapped; the first of getaddrinfo's answers)."""
    host, port = bind if bind is not None else (None, None)
    loop = asyncio.get_running_loop()
    addresses = getaddrinfo_routechecked(
        loop, log, host or "::", COAP_PORT if port is None else port
    )
    try:
        return tuple(await addresses.__anext__())
    except (StopAsyncIteration, socket.gaierror):
        raise OSError(errno.EADDRNOTAVAIL, f"no local address for {host}") from None


def _udp6() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


async def claim(bind: Bind, workers: int) -> Group:
    """`workers` sockets on `bind`'s address, the first one bound exclusively; steered when
    there is more than one. Raises AddressInUse (or another OSError)."""
    sockaddr = await resolve(bind)
    first = _udp6()
    try:
        first.bind(sockaddr)
    except OSError as e:
        first.close()
        if e.errno == errno.EADDRINUSE:
            raise AddressInUse(e.errno, e.strerror) from None
        raise
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    group = Group(bind, first.getsockname(), [first])
    try:
        for _ in range(workers - 1):
            member = _udp6()
            group.sockets.append(member)
            member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            member.bind(group.sockaddr)
        if workers > 1:
            steering.attach(group.sockets[1], workers)
    except BaseException:
        group.close()
        raise
    return group


class Claims:
    """The groups of every bind address being served, claimed by the supervisor."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._groups: dict[Bind, Group] = {}

    def __contains__(self, bind: Bind) -> bool:
        return bind in self._groups

    def socket(self, bind: Bind, index: int) -> socket.socket:
        return self._groups[bind].sockets[index]

    async def claim(self, binds: list[Bind]) -> list[Bind]:
        """Claim the binds not claimed yet (all or none); which were new. AddressInUse or
        another OSError names the first that failed (`.bind`)."""
        new: list[Bind] = []
        try:
            for bind in binds:
                if bind in self._groups or bind in new:
                    continue
                try:
                    self._groups[bind] = await claim(bind, self.workers)
                except OSError as e:
                    e.bind = bind  # type: ignore[attr-defined]
                    raise
                new.append(bind)
        except BaseException:
            self.release(new)
            raise
        return new

    def release(self, binds: list[Bind]) -> None:
        for bind in binds:
            group = self._groups.pop(bind, None)
            if group is not None:
                group.close()

    def keep_only(self, binds: list[Bind]) -> None:
        self.release([b for b in self._groups if b not in binds])

    def close(self) -> None:
        self.release(list(self._groups))
