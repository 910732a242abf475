"""The real server spoken to with hand-made datagrams, encoded by the benchmark's CoAP codec
(bench/coapmsg.py), so that malformed and unusual requests reach it exactly as written."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import coapmsg

from support.server import Server

GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
CON, ACK = 0, 2
IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT = 1, 3, 4, 5, 6, 7
OSCORE, URI_PATH, CONTENT_FORMAT, URI_QUERY, ACCEPT = 9, 11, 12, 15, 17
BLOCK2, BLOCK1, SIZE2, PROXY_URI, PROXY_SCHEME, SIZE1 = 23, 27, 28, 35, 39, 60

Options = Sequence[tuple[int, bytes]]

uint, block = coapmsg.uint, coapmsg.block2  # a Block1 value is encoded as a Block2 one


def path(*segments: str | bytes) -> list[tuple[int, bytes]]:
    return [(URI_PATH, s.encode() if isinstance(s, str) else s) for s in segments]


class Response:
    """A parsed response: code (as "4.04"), options as (number, value) pairs, payload."""

    def __init__(self, data: bytes) -> None:
        m = coapmsg.parse(data)
        self.mtype, self.raw_code, self.mid, self.token = m.mtype, m.code, m.mid, m.token
        self.options, self.payload = m.options, m.payload
        self.code = coapmsg.code_str(m.code)

    def opt(self, number: int) -> bytes | None:
        return next((v for n, v in self.options if n == number), None)

    def __repr__(self) -> str:
        return f"<{self.code} {self.options} {self.payload[:80]!r}>"


class RawServer(Server):
    """`python -m coapfs -vv` serving `root` (optionally under a wrapper command), spoken to
    with hand-made datagrams."""

    def __init__(self, root: Path, log: Path, *args: str, wrapper: Sequence[str] = ()) -> None:
        super().__init__("-vv", *args, root=root, log=log, wrapper=wrapper)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.mid = 0
        wkc = path(".well-known", "core")
        self.wait_ready(lambda: self.request(GET, wkc, timeout=0.5) is not None)

    def request(
        self, code: int, options: Options = (), payload: bytes = b"", *, timeout: float = 5.0
    ) -> Response | None:
        """One confirmable request; its response (piggybacked or separate), None on timeout."""
        self.mid = (self.mid + 1) % 65536
        token = os.urandom(4)
        message = coapmsg.Message(CON, code, self.mid, token, list(options), payload)
        self.sock.sendto(message.encode(), ("127.0.0.1", self.port))
        return self.receive(token, timeout)

    def receive(self, token: bytes, timeout: float) -> Response | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                response = Response(self.sock.recv(65536))
            except TimeoutError:
                return None
            if response.mtype == CON:  # a separate response or notification: acknowledge it
                ack = bytes((0x40 | (ACK << 4), 0, response.mid >> 8, response.mid & 0xFF))
                self.sock.sendto(ack, ("127.0.0.1", self.port))
            if response.token == token and response.raw_code != 0:
                return response
        return None

    def assert_clean(self) -> None:
        log = self.log()
        assert "Traceback" not in log and " ERROR " not in log, log
        assert self.proc.poll() is None, log

    def close(self) -> None:
        self.sock.close()
        super().close()
