"""Two hosts of the test's own: network namespaces joined by a veth pair, with public-looking
documentation addresses (RFC 5737 TEST-NET-2), so that a server sees a peer that is neither
loopback nor a private network. Nothing is added to the test machine's own namespace; the
namespaces (and the veth pair with them) go when the test ends.

`Host.command` runs a program inside a host (`ip netns exec`); `Host.socket` makes a socket in
the host's namespace for the test's own process (a socket stays in the namespace it was made
in, whichever thread uses it)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from support.tools import missing, require

_CLONE_NEWNET = 0x40000000
SERVER_ADDRESS, PREFIX = "198.51.100.1", 24
#: The client host's addresses: one per peer that must not share another's verified state.
CLIENT_ADDRESSES = ("198.51.100.2", "198.51.100.3", "198.51.100.4", "198.51.100.5")


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # the first of `addresses`, which the kernel picks as the source
    addresses: tuple[str, ...]

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def socket(self, address: str | None = None, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket of this host's namespace, bound to `address` (default: the first) on an
        ephemeral port."""
        made: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                s = socket.socket(socket.AF_INET, kind)
                s.bind((address or self.address, 0))
                made.append(s)
            except BaseException as e:
                made.append(e)

        # Only this short-lived thread enters the namespace; the test's own threads stay out.
        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def linked_hosts() -> Iterator[tuple[Host, Host]]:
    """(server, client): two namespaces on one veth link, 198.51.100.1 and .2 to .5."""
    require("ip", "iproute2")
    if os.geteuid() != 0:
        missing("network namespaces need root")
    tag = f"cfs{os.getpid() % 100000}{threading.get_ident() % 1000}"
    server = Host(f"{tag}s", SERVER_ADDRESS, (SERVER_ADDRESS,))
    client = Host(f"{tag}c", CLIENT_ADDRESSES[0], CLIENT_ADDRESSES)
    made: list[str] = []
    try:
        for host in (server, client):
            _ip("netns", "add", host.name)
            made.append(host.name)
        _ip("link", "add", f"{tag}a", "netns", server.name, "type", "veth",
            "peer", "name", f"{tag}b", "netns", client.name)  # fmt: skip
        for host, link in ((server, f"{tag}a"), (client, f"{tag}b")):
            for address in host.addresses:
                _ip("-n", host.name, "addr", "add", f"{address}/{PREFIX}", "dev", link)
            _ip("-n", host.name, "link", "set", link, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        yield server, client
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
