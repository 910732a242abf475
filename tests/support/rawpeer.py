"""Hand-made datagrams from any socket to any server address, with every byte counted both
ways: what an amplification or flood test needs that `raw.RawServer` (a loopback server it
starts itself) does not give."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import coapmsg

from support.raw import ACK, CON, Options, Response


@dataclass
class Exchange:
    """One request: its size on the wire (CoAP, without UDP/IP) and every datagram that came
    back for it, the response (matching token, non-empty code) last."""

    sent: int
    received: list[bytes] = field(default_factory=list)
    response: Response | None = None

    @property
    def largest(self) -> int:
        return max(map(len, self.received), default=0)

    @property
    def ratio(self) -> float:
        return self.largest / self.sent


class RawPeer:
    """Requests over `sock` to `server` (address, port)."""

    def __init__(self, sock: socket.socket, server: tuple[str, int]) -> None:
        self.sock, self.server = sock, server
        self.mid = int.from_bytes(os.urandom(2), "big")

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.server)

    def exchange(
        self,
        code: int,
        options: Options = (),
        payload: bytes = b"",
        *,
        token: bytes = b"\x01\x02",
        mtype: int = CON,
        timeout: float = 3.0,
    ) -> Exchange:
        self.mid = (self.mid + 1) % 65536
        datagram = coapmsg.Message(mtype, code, self.mid, token, list(options), payload).encode()
        self.send(datagram)
        exchange = Exchange(len(datagram))
        deadline = time.monotonic() + timeout
        while (data := self._next(deadline)) is not None:
            exchange.received.append(data)
            response = self._acknowledged(data)
            if response.token == token and response.raw_code != 0:
                exchange.response = response
                break
        return exchange

    def receive(self, timeout: float) -> list[bytes]:
        """Whatever arrives within `timeout` (notifications), acknowledged as needed."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (data := self._next(deadline)) is not None:
            got.append(data)
            self._acknowledged(data)
        return got

    def _next(self, deadline: float) -> bytes | None:
        """The next datagram, or None once `deadline` (time.monotonic()) has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def _acknowledged(self, data: bytes) -> Response:
        """`data` parsed; a separate response or notification (CON) is acknowledged."""
        response = Response(data)
        if response.mtype == CON:
            self.send(bytes((0x40 | (ACK << 4), 0, response.mid >> 8, response.mid & 0xFF)))
        return response
