"""No amplification from spoofed source addresses (RFC 9175 2.4): a response to a request from
an address not yet verified is at most `factor` times the request's size on the wire, counted
for every response (errors and notifications included).

Exempt: what does not come over plain UDP (DTLS, TCP and TLS prove the peer), OSCORE-protected
responses (aiocoap unprotects OSCORE inside the site, so the outer request reaches the check
as plain UDP; a protected response exists only once the request was decrypted with a known key
and passed the replay window), and the trusted networks (by default loopback, the private IPv4
ranges, IPv6 unique-local and link-local addresses: a LAN). An address is verified once a
request from it carries an Echo value this server gave it (an HMAC of the address and the time:
nothing stored per client), and stays verified for `verified_for` seconds (at most
`max_verified` addresses remembered).

What an unverified peer gets instead of an answer that would be too large:

* a GET's 2.05 ("small-blocks", the default): the same content in a block small enough to fit
  (down to 16 bytes, RFC 7959 lets a server pick a smaller block), with the Echo value
  attached (RFC 9175 "preemptive" Echo): every client keeps working; one that sends the value
  back (libcoap's coap-client does) is verified from then on;
* otherwise, and for everything with `unverified = "echo"`: 4.01 with an Echo option, which
  libcoap's coap-client repeats by itself, while aiocoap's client reports it (aiocoap #273);
* an error whose diagnostic does not fit: the same code without the diagnostic.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.transports.udp6 import UDP6EndpointAddress

from ..access.peer import IPNetwork, peer_of

_ECHO_TIME_BYTES = 2  # minutes, wrapping: ample for `_ECHO_LIFETIME`
_ECHO_MAC_BYTES = 6
_ECHO_LIFETIME = 10 * 60  # seconds an Echo value is accepted
_MIN_SZX = 0


@dataclass(frozen=True)
class Settings:
    """[amplification] in the configuration."""

    factor: float
    trusted: tuple[IPNetwork, ...]
    unverified: str  # "small-blocks" or "echo"
    verified_for: float
    max_verified: int


def wire_size(message: aiocoap.Message, token: bytes | None = None) -> int:
    """Bytes of `message` as a CoAP-over-UDP datagram (4-byte header, token, options, payload
    marker and payload); `token` for a response that has none yet (the request's)."""
    token = message.token if token is None else token
    payload = message.payload
    return 4 + len(token) + _options_size(message) + (1 + len(payload) if payload else 0)


def _options_size(message: aiocoap.Message) -> int:
    try:
        return len(message.opt.encode())
    except ValueError:
        # aiocoap decodes an option delta of 65804 but encodes at most 65803: count what the
        # options took at least, a header byte each (the limit errs on the small side).
        return sum(1 + len(option.encode()) for option in message.opt.option_list())


class AddressCheck:
    """Shared by every context of the program (and every worker, through `key`)."""

    def __init__(self, settings: Settings, key: bytes | None = None) -> None:
        self.settings = settings
        self._key = key or os.urandom(32)
        self._verified: OrderedDict[Any, float] = OrderedDict()  # address -> until when
        self.limited = 0

    def stats(self) -> dict[str, int]:
        return {"verified": len(self._verified), "limited": self.limited}

    def gate(self, pipe: Any) -> Any:
        """The pipe a request's responses go through: `pipe` itself where no limit applies."""
        limited = self._limit_for(pipe.request)
        return pipe if limited is None else _LimitedPipe(pipe, self, *limited)

    def fitted(self, request: aiocoap.Message, response: aiocoap.Message) -> aiocoap.Message:
        """`response` as it may go out directly, without the request's pipe (a refusal sent
        by the message layer)."""
        limited = self._limit_for(request)
        return response if limited is None else self.fit(request, response, *limited)

    def _limit_for(self, request: aiocoap.Message) -> tuple[Any, float] | None:
        """(address, bytes) a response to `request` must fit in; None where no limit applies
        (a valid Echo value verifies the address here)."""
        if self.settings.factor <= 0:
            return None
        remote = request.remote
        if not isinstance(remote, UDP6EndpointAddress):
            return None  # OSCORE, DTLS, TCP, TLS, WebSockets: the peer is proven
        address = peer_of(remote).address
        if address is None or any(address in net for net in self.settings.trusted):
            return None
        if self._is_verified(address):
            return None
        echo = request.opt.echo
        if echo is not None and self._echo_valid(address, echo):
            self._verify(address)
            return None
        return address, self.settings.factor * wire_size(request)

    # --- verified addresses -----------------------------------------------------------------

    def _is_verified(self, address: Any) -> bool:
        until = self._verified.get(address)
        if until is None:
            return False
        if until < time.monotonic():
            del self._verified[address]
            return False
        self._verified.move_to_end(address)
        return True

    def _verify(self, address: Any) -> None:
        self._verified[address] = time.monotonic() + self.settings.verified_for
        self._verified.move_to_end(address)
        while len(self._verified) > self.settings.max_verified:
            self._verified.popitem(last=False)

    # --- Echo values ------------------------------------------------------------------------

    def echo_for(self, address: Any) -> bytes:
        minute = (int(time.time()) // 60) & 0xFFFF
        stamp = minute.to_bytes(_ECHO_TIME_BYTES, "big")
        return stamp + self._mac(stamp, address)

    def _echo_valid(self, address: Any, echo: bytes) -> bool:
        if len(echo) != _ECHO_TIME_BYTES + _ECHO_MAC_BYTES:
            return False
        stamp = echo[:_ECHO_TIME_BYTES]
        age = ((int(time.time()) // 60) - int.from_bytes(stamp, "big")) & 0xFFFF
        if age * 60 > _ECHO_LIFETIME:
            return False
        return hmac.compare_digest(echo[_ECHO_TIME_BYTES:], self._mac(stamp, address))

    def _mac(self, stamp: bytes, address: Any) -> bytes:
        digest = hmac.new(self._key, stamp + address.packed, hashlib.sha256).digest()
        return digest[:_ECHO_MAC_BYTES]

    # --- fitting a response -----------------------------------------------------------------

    def fit(
        self, request: aiocoap.Message, response: aiocoap.Message, address: Any, limit: float
    ) -> aiocoap.Message:
        """`response`, or what is sent instead so that at most `limit` bytes go out."""
        token = request.token
        if response.opt.oscore is not None or wire_size(response, token) <= limit:
            return response
        self.limited += 1
        echo = self.echo_for(address)
        if (
            self.settings.unverified == "small-blocks"
            and request.code == Code.GET
            and response.code == Code.CONTENT
            and response.payload
        ):
            smaller = _smaller_block(response, echo, token, limit)
            if smaller is not None:
                return smaller
        if response.payload and not response.code.is_successful():
            bare = response.copy(payload=b"")
            if wire_size(bare, token) <= limit:
                return bare
        challenge = aiocoap.Message(code=Code.UNAUTHORIZED, echo=echo)
        challenge.opt.max_age = 0
        if wire_size(challenge, token) <= limit:
            return challenge
        return aiocoap.Message(code=Code.UNAUTHORIZED)


def _smaller_block(
    response: aiocoap.Message, echo: bytes, token: bytes, limit: float
) -> aiocoap.Message | None:
    """The response's first bytes as a smaller Block2 at the same offset, with Echo attached;
    None if not even 16-byte blocks fit."""
    payload = response.payload
    block = response.opt.block2
    if block is not None:
        number, more, szx = block.block_number, block.more, block.size_exponent
        total = response.opt.size2
        largest = szx - 1
    else:
        number, more, szx = 0, False, 6
        total = len(payload)
        largest = min(6, (len(payload) - 1).bit_length() - 5)  # blocks shorter than the body
    for k in range(largest, _MIN_SZX - 1, -1):
        size = 16 << k
        candidate = response.copy(payload=payload[:size], echo=echo)
        candidate.opt.block2 = BlockOption.BlockwiseTuple(
            number << (szx - k), more or len(payload) > size, k
        )
        if total is not None:
            candidate.opt.size2 = total
        if wire_size(candidate, token) <= limit:
            return candidate
    return None


class _LimitedPipe:
    """Stands in for a request's pipe: each response is fitted before it goes out."""

    def __init__(self, pipe: Any, check: AddressCheck, address: Any, limit: float) -> None:
        self._pipe = pipe
        self._check = check
        self._address = address
        self._limit = limit
        self._request = pipe.request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    @property
    def request(self) -> Any:
        return self._pipe.request

    @request.setter
    def request(self, value: Any) -> None:
        self._pipe.request = value

    def add_response(self, response: aiocoap.Message, is_last: bool = False) -> None:
        fitted = self._check.fit(self._request, response, self._address, self._limit)
        self._pipe.add_response(
            fitted, is_last=is_last or fitted is not response and (not fitted.code.is_successful())
        )
