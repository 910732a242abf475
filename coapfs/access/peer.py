"""Who sent a request: the source address it came from, and the identities aiocoap
authenticated for it (`authenticated_claims`: the credential labels of the --credentials file
for OSCORE, EDHOC and DTLS-PSK peers). Access rules, the access log and the log of changes all
speak of peers this way."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from aiocoap.util import hostportsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class BadNetwork(ValueError):
    """Not a usable network; `hint` says what to write instead (None: not a network at all)."""

    def __init__(self, hint: str | None = None) -> None:
        super().__init__(hint or "not a network")
        self.hint = hint


def parse_network(text: str) -> IPNetwork:
    """A network (or a single address) as configured, matched against `Peer.address`. An
    IPv4-mapped IPv6 one is refused: `parse_ip` gives such peers their IPv4 address, which it
    would never match."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "/" in text and "host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise BadNetwork(f"a network without host bits (e.g. {loose})") from None
        raise BadNetwork() from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        v4 = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        form = v4.network_address if v4.prefixlen == 32 else v4
        raise BadNetwork(f'its IPv4 form "{form}" (IPv4-mapped peers are matched as IPv4)')
    return network


@dataclass(frozen=True, slots=True)
class Peer:
    address: IPAddress | None  # None: a transport without an IP source address
    port: int | None
    claims: tuple[str, ...]

    @property
    def authenticated(self) -> bool:
        return bool(self.claims)

    def __str__(self) -> str:
        where = _hostport(self.address, self.port)
        return f"{' '.join(self.claims)}@{where}" if self.claims else where


def _hostport(address: IPAddress | None, port: int | None) -> str:
    if address is None:
        return "unknown"
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}" if port is not None else host


@functools.lru_cache(maxsize=4096)
def parse_ip(host: str) -> IPAddress | None:
    """An address as the socket reports it (IPv4-mapped IPv6 becomes IPv4, a scope is dropped)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _source(remote: Any) -> tuple[IPAddress | None, int | None]:
    """The IP source of `remote`, through any security layer (OSCORE's underlying address)."""
    for _ in range(4):
        sockaddr = getattr(remote, "sockaddr", None)
        if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
            return parse_ip(str(sockaddr[0])), int(sockaddr[1])
        underlying = getattr(remote, "underlying_address", None)
        if underlying is None:
            break
        remote = underlying
    try:
        host, port = hostportsplit(remote.hostinfo)
    except Exception:
        return None, None
    return parse_ip(host), port


def peer_of(remote: Any) -> Peer:
    """The peer a request came from."""
    address, port = _source(remote)
    try:
        claims = tuple(str(c) for c in remote.authenticated_claims)
    except Exception:
        claims = ()
    return Peer(address, port, claims)
