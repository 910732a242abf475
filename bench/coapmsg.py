"""Minimal CoAP (RFC 7252) message encoder and parser for the benchmark's raw clients.

Hand-rolled on purpose: the load generator must cost the client as little CPU as possible, so
it cannot go through aiocoap's full message layer. Only what the benchmark sends and reads is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CON, NON, ACK, RST = 0, 1, 2, 3

GET, PUT = 0x01, 0x03
CREATED, DELETED, VALID, CHANGED, CONTENT, CONTINUE = 0x41, 0x42, 0x43, 0x44, 0x45, 0x5F
REQUEST_ENTITY_INCOMPLETE = 0x88

OPT_ETAG = 4
OPT_OBSERVE = 6
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
OPT_BLOCK2 = 23
OPT_BLOCK1 = 27
OPT_SIZE2 = 28
OPT_SIZE1 = 60


def code_str(code: int) -> str:
    """Render a code as CoAP's dotted class.detail, e.g. 2.05."""
    return f"{code >> 5}.{code & 0x1F:02d}"


def uint(value: int) -> bytes:
    """Encode an option uint in the fewest bytes (0 is the empty string)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def block2(num: int, more: bool, szx: int) -> bytes:
    """Encode a Block1/Block2 option value."""
    return uint((num << 4) | (int(more) << 3) | szx)


def parse_block(value: bytes) -> tuple[int, bool, int]:
    """Decode a Block1/Block2 value into (number, more, szx)."""
    v = int.from_bytes(value, "big")
    return v >> 4, bool(v & 0x08), v & 0x07


def _ext(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


@dataclass
class Message:
    """One CoAP message; options are (number, raw value) pairs in any order."""

    mtype: int = CON
    code: int = GET
    mid: int = 0
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def encode(self) -> bytes:
        """Serialise to a datagram (options sorted, delta-encoded)."""
        out = bytearray(
            (0x40 | (self.mtype << 4) | len(self.token), self.code, self.mid >> 8, self.mid & 0xFF)
        )
        out += self.token
        last = 0
        for number, value in sorted(self.options, key=lambda o: o[0]):
            dnib, dext = _ext(number - last)
            lnib, lext = _ext(len(value))
            out.append((dnib << 4) | lnib)
            out += dext + lext + value
            last = number
        if self.payload:
            out += b"\xff" + self.payload
        return bytes(out)

    def opt(self, number: int) -> bytes | None:
        """First value of an option, or None if absent."""
        for n, v in self.options:
            if n == number:
                return v
        return None

    @property
    def block2(self) -> tuple[int, bool, int] | None:
        v = self.opt(OPT_BLOCK2)
        return None if v is None else parse_block(v)


def parse(data: bytes) -> Message:
    """Parse a datagram; raises ValueError on anything malformed."""
    if len(data) < 4 or data[0] >> 6 != 1:
        raise ValueError("not a CoAP/1 message")
    tkl = data[0] & 0x0F
    if tkl > 8 or len(data) < 4 + tkl:
        raise ValueError("bad token length")
    msg = Message(
        mtype=(data[0] >> 4) & 0x03,
        code=data[1],
        mid=(data[2] << 8) | data[3],
        token=bytes(data[4 : 4 + tkl]),
    )
    i, number, n = 4 + tkl, 0, len(data)
    while i < n:
        if data[i] == 0xFF:
            msg.payload = bytes(data[i + 1 :])
            break
        delta, length = data[i] >> 4, data[i] & 0x0F
        i += 1
        if delta == 13:
            delta, i = data[i] + 13, i + 1
        elif delta == 14:
            delta, i = int.from_bytes(data[i : i + 2], "big") + 269, i + 2
        elif delta == 15:
            raise ValueError("reserved option delta")
        if length == 13:
            length, i = data[i] + 13, i + 1
        elif length == 14:
            length, i = int.from_bytes(data[i : i + 2], "big") + 269, i + 2
        elif length == 15:
            raise ValueError("reserved option length")
        number += delta
        msg.options.append((number, bytes(data[i : i + length])))
        i += length
    return msg


def request(
    code: int, path: str, *, mid: int, token: bytes, mtype: int = CON, extra=(), payload=b""
) -> Message:
    """A request for a slash-separated path ('dir/' ends in an empty segment, as directories
    need)."""
    segments = path.split("/") if path else []
    opts = [(OPT_URI_PATH, s.encode()) for s in segments]
    opts.extend(extra)
    return Message(mtype=mtype, code=code, mid=mid, token=token, options=opts, payload=payload)


def get(path: str, *, mid: int, token: bytes, mtype: int = CON, extra=()) -> Message:
    """A GET for a slash-separated path."""
    return request(GET, path, mid=mid, token=token, mtype=mtype, extra=extra)
