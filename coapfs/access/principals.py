"""The principals an access rule can name, and whether a peer is one of them.

"anyone"            every peer
"authenticated"     any peer aiocoap authenticated (OSCORE, EDHOC, DTLS-PSK)
":client-alice"     the peer authenticated by that label of the --credentials file
"fd00::/8", "::1"   a source network or address (IPv4 and IPv6)
"""

from __future__ import annotations

from dataclasses import dataclass

from .peer import BadNetwork, IPNetwork, Peer, parse_network

ANYONE = "anyone"
AUTHENTICATED = "authenticated"

EXPECTED = (
    '"anyone", "authenticated", a credential label like ":client-alice", '
    'or a network like "192.0.2.0/24" or "fd00::/8"'
)


class BadPrincipal(ValueError):
    """The string names no principal; the message says what was expected."""


@dataclass(frozen=True)
class Principal:
    text: str
    kind: str  # "anyone", "authenticated", "label", "network"
    network: IPNetwork | None = None

    @property
    def needs_authentication(self) -> bool:
        """Whether only an authenticated peer can be this principal."""
        return self.kind in ("authenticated", "label")

    def matches(self, peer: Peer) -> bool:
        if self.kind == "anyone":
            return True
        if self.kind == "authenticated":
            return peer.authenticated
        if self.kind == "label":
            return self.text in peer.claims
        assert self.network is not None
        return peer.address is not None and peer.address in self.network

    def __str__(self) -> str:
        return self.text


def parse_principal(text: str) -> Principal:
    if text == ANYONE:
        return Principal(text, "anyone")
    if text == AUTHENTICATED:
        return Principal(text, "authenticated")
    if text.startswith(":") and not text.startswith("::") and len(text) > 1:
        return Principal(text, "label")  # "::1", "::/0": IPv6, not a label
    try:
        network = parse_network(text)
    except BadNetwork as e:
        raise BadPrincipal(e.hint or EXPECTED) from None
    return Principal(text, "network", network)
