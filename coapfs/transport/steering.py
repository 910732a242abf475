"""Which worker gets a datagram: a classic-BPF program attached to the SO_REUSEPORT group of
every bind address (SO_ATTACH_REUSEPORT_CBPF; unprivileged), returning the index of a socket in
the group, i.e. of a worker. It runs on the datagram with offset 0 at the CoAP header; the IP
header is reachable at SKF_NET_OFF.

Per datagram:
  1. ACK or RST: the worker named by the top bits of its Message ID. Each worker takes the
     Message IDs it sends from its own slice (`partition_message_ids`), so the ACK to a
     notification reaches the worker that sent it.
  2. A request with an OSCORE option (9), or whose first Uri-Path segment is ".well-known"
     (EDHOC is /.well-known/edhoc): worker 0, the only one holding security contexts, so no
     OSCORE sequence number or replay window is ever used by two processes.
  3. A response: worker 0, the only one making requests (resource-directory registration).
  4. Anything else: a hash of the source address and port, so that one client stays with one
     worker (block-wise transfers, deduplication, observations).
  What the bounded parser cannot decide (more than MAX_OPTIONS options before 9, a 2-byte
  option length, a datagram cut short) goes to worker 0, which can serve everything.

Outer options that may precede OSCORE in a protected request are Uri-Host (3), Observe (6) and
Uri-Port (7) (RFC 8613 4.1), so MAX_OPTIONS option steps decide every OSCORE request. `decide`
is the same decision in Python; the tests hold the kernel's answers to it.
"""

from __future__ import annotations

import ctypes
import math
import socket

from aiocoap import messagemanager

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)

# cBPF opcodes
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (
    0x00,
    0x10,
    0x20,
    0x30,
    0x40,
    0x50,
    0x60,
    0x70,
    0x80,
    0x90,
    0xA0,
)
K, X = 0x00, 0x08
JA, JEQ, JGT, JGE = 0x00, 0x10, 0x20, 0x30
RA = 0x10  # RET|A
TAX, TXA = 0x00, 0x80
NET = (-0x100000) & 0xFFFFFFFF  # SKF_NET_OFF

MAX_OPTIONS = 6
OSCORE = 9
URI_PATH = 11
HASH_MUL1 = 0x9E3779B1
HASH_MUL2 = 0x85EBCA6B


def mid_shift(n: int) -> int:
    """Message IDs of worker k are k << shift | counter (shift = 16 - ceil(log2 n))."""
    bits = max(1, math.ceil(math.log2(n)))
    return 16 - bits


class _Assembler:
    """Labels resolved to the relative jumps cBPF takes."""

    def __init__(self) -> None:
        # (code, true label, false label, k); an unconditional jump's k is its label
        self.ins: list[tuple[int, str | None, str | None, int | str]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def op(self, code: int, k: int = 0) -> None:
        self.ins.append((code, None, None, k))

    def jmp(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        self.ins.append((code, jt, jf, k))

    def ja(self, target: str) -> None:
        self.ins.append((JMP | JA, None, None, target))

    def assemble(self) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        for i, (code, jt, jf, k) in enumerate(self.ins):
            if isinstance(k, str):
                out.append((code, 0, 0, self.labels[k] - i - 1))
                continue
            if jt is not None or jf is not None:
                t = 0 if jt is None else self.labels[jt] - i - 1
                f = 0 if jf is None else self.labels[jf] - i - 1
                assert 0 <= t <= 255 and 0 <= f <= 255, (i, jt, jf, t, f)
                out.append((code, t, f, k))
            else:
                out.append((code, 0, 0, k))
        return out


def program(n: int) -> list[tuple[int, int, int, int]]:
    """The steering program for a group of `n` workers."""
    a = _Assembler()
    shift = mid_shift(n)
    a.op(LD | W | LEN)
    a.op(ST, 1)  # M1 = message length
    a.jmp(JMP | JGE | K, 4, "ok", "hash")
    a.label("ok")
    a.op(LD | B | ABS, 0)
    a.op(ALU | AND | K, 0x30)  # type bits
    a.jmp(JMP | JGE | K, 0x20, "mid", None)  # ACK (0x20) / RST (0x30)
    a.op(LD | B | ABS, 1)  # code
    a.jmp(JMP | JEQ | K, 0, "hash", None)  # empty CON/NON: ping
    a.jmp(JMP | JGE | K, 0x40, "owner", None)  # a response: to worker 0
    a.op(LD | B | ABS, 0)
    a.op(ALU | AND | K, 0x0F)
    a.op(ALU | ADD | K, 4)
    a.op(MISC | TAX)  # X = 4 + TKL: first option
    a.op(LD | IMM, 0)
    a.op(ST, 0)  # M0 = option number
    for i in range(MAX_OPTIONS):
        a.op(LD | MEM, 1)
        a.jmp(JMP | JGT | X, 0, f"c{i}", "hash")  # len > X, else no options: not OSCORE
        a.label(f"c{i}")
        a.op(LD | B | IND, 0)  # option header byte
        a.jmp(JMP | JEQ | K, 0xFF, "hash", None)  # payload marker
        a.op(ST, 2)
        a.op(ALU | RSH | K, 4)  # delta nibble
        a.jmp(JMP | JGE | K, 13, "hash", None)  # delta >= 13: number > 9
        a.op(ST, 4)
        a.op(MISC | TXA)
        a.op(ST, 3)  # M3 = position
        a.op(LDX | W | MEM, 4)
        a.op(LD | MEM, 0)
        a.op(ALU | ADD | X)
        a.op(ST, 0)  # M0 = number
        a.op(LDX | W | MEM, 3)  # X = position
        a.jmp(JMP | JEQ | K, OSCORE, "owner", None)
        a.jmp(JMP | JEQ | K, URI_PATH, "wk", None)
        a.jmp(JMP | JGT | K, OSCORE, "hash", None)
        a.op(LD | MEM, 2)
        a.op(ALU | AND | K, 0x0F)  # length nibble
        a.jmp(JMP | JEQ | K, 13, f"l13_{i}", None)
        a.jmp(JMP | JGE | K, 14, "owner", None)  # 2-byte length or reserved: undecided
        a.op(ALU | ADD | K, 1)
        a.op(ALU | ADD | X)
        a.op(MISC | TAX)
        a.ja(f"n{i}")
        a.label(f"l13_{i}")
        a.op(LD | B | IND, 1)
        a.op(ALU | ADD | K, 14)
        a.op(ALU | ADD | X)
        a.op(MISC | TAX)
        a.label(f"n{i}")
    a.ja("owner")  # undecided after MAX_OPTIONS: worker 0
    a.label("wk")  # first Uri-Path segment ".well-known"?
    a.op(LD | MEM, 2)
    a.op(ALU | AND | K, 0x0F)
    a.jmp(JMP | JEQ | K, 11, "wk1", "hash")
    a.label("wk1")
    a.op(LD | W | IND, 1)
    a.jmp(JMP | JEQ | K, 0x2E77656C, "wk2", "hash")  # ".wel"
    a.label("wk2")
    a.op(LD | W | IND, 5)
    a.jmp(JMP | JEQ | K, 0x6C2D6B6E, "wk3", "hash")  # "l-kn"
    a.label("wk3")
    a.op(LD | H | IND, 9)
    a.jmp(JMP | JEQ | K, 0x6F77, "wk4", "hash")  # "ow"
    a.label("wk4")
    a.op(LD | B | IND, 11)
    a.jmp(JMP | JEQ | K, 0x6E, "owner", "hash")  # "n"
    a.label("mid")
    a.op(LD | H | ABS, 2)
    a.op(ALU | RSH | K, shift)
    a.jmp(JMP | JGE | K, n, "hash", None)
    a.op(RET | RA)
    a.label("owner")
    a.op(RET | K, 0)
    a.label("hash")
    a.op(LD | B | ABS, NET)
    a.op(ALU | RSH | K, 4)
    a.jmp(JMP | JEQ | K, 6, "h6", None)
    a.op(LD | W | ABS, (NET + 12) & 0xFFFFFFFF)  # IPv4 source address
    a.op(ST, 5)
    a.op(LDX | B | MSH, NET)  # X = IPv4 header length
    a.op(LD | H | IND, NET)  # UDP source port
    a.ja("mix")
    a.label("h6")
    a.op(LD | W | ABS, (NET + 8) & 0xFFFFFFFF)
    a.op(ST, 5)
    for off in (12, 16, 20):
        a.op(LD | W | ABS, (NET + off) & 0xFFFFFFFF)
        a.op(MISC | TAX)
        a.op(LD | MEM, 5)
        a.op(ALU | XOR | X)
        a.op(ST, 5)
    a.op(LD | H | ABS, (NET + 40) & 0xFFFFFFFF)  # UDP source port (no extension headers)
    a.label("mix")
    a.op(ALU | MUL | K, HASH_MUL1)
    a.op(MISC | TAX)
    a.op(LD | MEM, 5)
    a.op(ALU | XOR | X)
    a.op(ALU | MUL | K, HASH_MUL2)
    a.op(ALU | RSH | K, 16)
    a.op(ALU | MOD | K, n)
    a.op(RET | RA)
    return a.assemble()


# --- the same decision in Python --------------------------------------------------------


def _hash(src_ip_words: list[int], sport: int, n: int) -> int:
    m5 = 0
    for w in src_ip_words:
        m5 ^= w
    a = (sport * HASH_MUL1) & 0xFFFFFFFF
    a ^= m5
    a = (a * HASH_MUL2) & 0xFFFFFFFF
    return (a >> 16) % n


def decide(data: bytes, src_ip_words: list[int], sport: int, n: int) -> int:
    """What `program(n)` returns for `data` from that source (address as 32-bit words)."""
    h = _hash(src_ip_words, sport, n)
    if len(data) < 4:
        return h
    if data[0] & 0x30 >= 0x20:
        w = ((data[2] << 8) | data[3]) >> mid_shift(n)
        return w if w < n else h
    if data[1] == 0:
        return h
    if data[1] >= 0x40:
        return 0
    x, number = 4 + (data[0] & 0x0F), 0
    for _ in range(MAX_OPTIONS):
        if not len(data) > x:
            return h
        hdr = data[x]
        if hdr == 0xFF:
            return h
        delta = hdr >> 4
        if delta >= 13:
            return h
        number += delta
        if number == OSCORE:
            return 0
        if number == URI_PATH:
            if hdr & 0x0F != 11:
                return h
            if x + 12 > len(data):
                return 0  # out-of-bounds load: cBPF returns 0
            return 0 if data[x + 1 : x + 12] == b".well-known" else h
        if number > OSCORE:
            return h
        length = hdr & 0x0F
        if length == 13:
            if x + 1 >= len(data):
                return 0  # out-of-bounds load: cBPF returns 0
            x = x + (data[x + 1] + 14)
        elif length >= 14:
            return 0
        else:
            x = x + length + 1
    return 0


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, workers: int) -> None:
    """Steer the group `sock` belongs to. It must not be the group's first socket (the kernel
    refuses that one with EINVAL); attached to any other member it applies to the whole group."""
    instructions = program(workers)
    array = (_SockFilter * len(instructions))(*[_SockFilter(*i) for i in instructions])
    fprog = _SockFprog(len(instructions), array)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def partition_message_ids(index: int, workers: int) -> None:
    """Every Message ID this process sends carries `index` in its top bits (process-wide: a
    worker's every message manager)."""
    shift = mid_shift(workers)
    low = (1 << shift) - 1
    high = index << shift

    def _next_message_id(self: messagemanager.MessageManager) -> int:
        message_id: int = self.message_id
        self.message_id = 0xFFFF & (1 + message_id)
        return high | (message_id & low)

    messagemanager.MessageManager._next_message_id = _next_message_id  # type: ignore[method-assign]
