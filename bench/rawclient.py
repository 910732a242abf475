"""Synchronous raw-UDP CoAP client: one request at a time, block-wise fetch, Observe.

Used by bench/run.py for the sequential measurements (downloads, listings, notification
latency). Plain blocking sockets with deadlines: every wait is bounded.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
from dataclasses import dataclass

import coapmsg
from coapmsg import Message


class CoapTimeout(Exception):
    """No answer within the deadline."""


class CoapError(Exception):
    """An unexpected response code; the message carries the code and payload."""


@dataclass
class Fetch:
    """Result of a block-wise fetch."""

    body: bytes
    seconds: float
    blocks: int
    restarts: int
    etag: bytes | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class RawClient:
    """One UDP socket to one server; MIDs and tokens are unique per client."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self._ids = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def close(self) -> None:
        self.sock.close()

    def _next(self) -> tuple[int, bytes]:
        n = next(self._ids)
        return n & 0xFFFF, n.to_bytes(8, "big")

    def _recv(self, deadline: float) -> Message | None:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionRefusedError as e:
            raise CoapError("connection refused (server not running?)") from e
        try:
            return coapmsg.parse(data)
        except ValueError:
            return None

    def _ack(self, msg: Message) -> None:
        self.sock.send(Message(mtype=coapmsg.ACK, code=0, mid=msg.mid).encode())

    def request(
        self,
        path: str,
        *,
        extra=(),
        timeout: float = 5.0,
        retransmit=0.5,
        code: int = coapmsg.GET,
        payload: bytes = b"",
    ) -> Message:
        """CON request (GET unless told) with retransmission; returns the (piggybacked or
        separate) response."""
        mid, token = self._next()
        raw = coapmsg.request(code, path, mid=mid, token=token, extra=extra, payload=payload)
        raw = raw.encode()
        deadline = time.perf_counter() + timeout
        next_tx = 0.0
        while True:
            now = time.perf_counter()
            if now >= deadline:
                raise CoapTimeout(f"{coapmsg.code_str(code)} {path}: no response in {timeout:g} s")
            if now >= next_tx:
                self.sock.send(raw)
                next_tx = now + retransmit
            msg = self._recv(min(deadline, next_tx))
            if msg is None or msg.token != token:
                if msg is not None and msg.mtype == coapmsg.CON:
                    self._ack(msg)
                continue
            if msg.mtype == coapmsg.CON:
                self._ack(msg)
            if msg.code == 0:  # empty ACK: the response comes separately
                next_tx = deadline
                continue
            return msg

    def fetch(self, path: str, *, szx: int = 6, timeout: float = 120.0) -> Fetch:
        """Fetch every block sequentially from block 0.

        A 4.08 (a server that lost its assembled response, as aiocoap's Block2 cache does)
        or an ETag change mid-transfer restarts from block 0, at most 3 times.
        """
        start = time.perf_counter()
        deadline = start + timeout
        restarts = blocks = 0
        while True:
            body = bytearray()
            etag = None
            num = 0
            restart = False
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise CoapTimeout(f"GET {path}: not complete in {timeout:g} s")
                try:
                    msg = self.request(
                        path,
                        extra=[(coapmsg.OPT_BLOCK2, coapmsg.block2(num, False, szx))],
                        timeout=min(left, 5.0),
                    )
                except CoapTimeout:
                    if time.perf_counter() < deadline:
                        raise
                    raise CoapTimeout(
                        f"GET {path}: not complete in {timeout:g} s (at block {num})"
                    ) from None
                blocks += 1
                if msg.code != coapmsg.CONTENT:
                    if msg.code == coapmsg.REQUEST_ENTITY_INCOMPLETE and num > 0:
                        restart = True
                        break
                    raise CoapError(
                        f"GET {path} block {num}: {coapmsg.code_str(msg.code)} {msg.payload[:80]!r}"
                    )
                this_etag = msg.opt(coapmsg.OPT_ETAG)
                if num == 0:
                    etag = this_etag
                elif this_etag is not None and this_etag != etag:
                    restart = True
                    break
                body += msg.payload
                b2 = msg.block2
                if b2 is None or not b2[1]:
                    return Fetch(bytes(body), time.perf_counter() - start, blocks, restarts, etag)
                num = b2[0] + 1
                if b2[2] < szx:  # server chose smaller blocks: continue at its size
                    num, szx = (b2[0] + 1), b2[2]
            if restart:
                restarts += 1
                if restarts > 3:
                    raise CoapError(f"GET {path}: restarted {restarts} times")

    def put(self, path: str, data: bytes, *, szx: int = 6, timeout: float = 120.0) -> float:
        """Block-wise PUT (Block1, one block outstanding); returns the seconds it took.

        Follows a smaller block size if the server asks for one in its 2.31 Continue.
        """
        start = time.perf_counter()
        deadline = start + timeout
        offset = 0
        while True:
            size = 16 << szx
            num, chunk = offset // size, data[offset : offset + size]
            more = offset + size < len(data)
            extra = [(coapmsg.OPT_BLOCK1, coapmsg.block2(num, more, szx))]
            if num == 0:
                extra.append((coapmsg.OPT_SIZE1, coapmsg.uint(len(data))))
            left = deadline - time.perf_counter()
            try:
                if left <= 0:
                    raise CoapTimeout("deadline")
                msg = self.request(
                    path, extra=extra, timeout=min(left, 5.0), code=coapmsg.PUT, payload=chunk
                )
            except CoapTimeout:
                if time.perf_counter() < deadline:
                    raise
                raise CoapTimeout(
                    f"PUT {path}: not complete in {timeout:g} s (at byte {offset:,})"
                ) from None
            if not more:
                if msg.code not in (coapmsg.CREATED, coapmsg.CHANGED):
                    raise CoapError(f"PUT {path}: final {coapmsg.code_str(msg.code)}")
                return time.perf_counter() - start
            if msg.code != coapmsg.CONTINUE:
                raise CoapError(
                    f"PUT {path} block {num}: {coapmsg.code_str(msg.code)} {msg.payload[:80]!r}"
                )
            offset += size
            b1 = msg.opt(coapmsg.OPT_BLOCK1)
            if b1 is not None and coapmsg.parse_block(b1)[2] < szx:
                szx = coapmsg.parse_block(b1)[2]

    def etag_of(self, path: str) -> bytes | None:
        """Learn a resource's ETag.

        Sends a made-up ETag: aiocoap-fileserver only includes the ETag in a single-block
        response when the request carried one.
        """
        msg = self.request(path, extra=[(coapmsg.OPT_ETAG, b"\xde\xad")])
        return msg.opt(coapmsg.OPT_ETAG)

    def observe(self, path: str, timeout: float = 5.0) -> tuple[bytes, Message]:
        """Register an observation; returns (token, first response)."""
        mid, token = self._next()
        raw = coapmsg.get(path, mid=mid, token=token, extra=[(coapmsg.OPT_OBSERVE, b"")]).encode()
        self.sock.send(raw)
        deadline = time.perf_counter() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise CoapTimeout(f"observe {path}: no response in {timeout:g} s")
            if msg.mtype == coapmsg.CON:
                self._ack(msg)
            if msg.token == token and msg.code != 0:
                return token, msg

    def wait_notification(self, token: bytes, deadline: float) -> tuple[float, Message] | None:
        """Wait for the next message with this token; returns (arrival time, message)."""
        while True:
            msg = self._recv(deadline)
            if msg is None:
                return None
            t = time.perf_counter()
            if msg.mtype == coapmsg.CON:
                self._ack(msg)
            if msg.token == token and msg.code != 0:
                return t, msg

    def cancel_observation(self, path: str, token: bytes) -> None:
        """Deregister (GET with Observe=1 and the same token), best effort."""
        mid, _ = self._next()
        raw = coapmsg.get(
            path, mid=mid, token=token, extra=[(coapmsg.OPT_OBSERVE, coapmsg.uint(1))]
        ).encode()
        self.sock.send(raw)
        self.wait_notification(token, time.perf_counter() + 1.0)
