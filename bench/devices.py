"""Simulated constrained devices downloading one image block by block (one fleet shard).

Each device has its own UDP socket (so the server sees a distinct endpoint) and fetches the image
with CON GETs carrying Block2 (one block per round trip). After every response it "sleeps" the
simulated round-trip time before asking for the next block; a fraction --loss of the responses
is ignored as if lost, and the request is retransmitted with the same Message ID after CoAP's
ACK_TIMEOUT x random(1, ACK_RANDOM_FACTOR), doubling, at most MAX_RETRANSMIT times (RFC 7252
4.8). The ETag must stay the same on every block and the sha256 of the whole image must match.
Message IDs are never reused on a socket (a download stops before 65,536 requests).

One process runs many devices on one epoll loop with a timer heap; bench/fleet.py starts one or
more of these shards at once and merges what they print (one JSON object).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import resource
import select
import socket
import time

import coapmsg
from loadgen import self_cpu_seconds

BIN = 0.25  # seconds per bin of the block-arrival histogram
MAX_RESTARTS = 3  # 4.08 (lost Block2 state) restarts from block 0 per device


class Device:
    __slots__ = (
        "sock",
        "mid",
        "sent_mids",
        "token",
        "raw",
        "offset",
        "szx",
        "etag",
        "sha",
        "blocks",
        "retries",
        "lost",
        "restarts",
        "timeout",
        "tries",
        "gen",
        "sent_at",
        "t_start",
        "t_done",
        "error",
    )

    def __init__(self, sock: socket.socket, szx: int) -> None:
        self.sock = sock
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.sent_mids = 0
        self.token = b""
        self.raw = b""
        self.offset = 0
        self.szx = szx
        self.etag: bytes | None = None
        self.sha = hashlib.sha256()
        self.blocks = self.retries = self.lost = self.restarts = self.tries = self.gen = 0
        self.timeout = 0.0
        self.sent_at = 0.0
        self.t_start: float | None = None
        self.t_done: float | None = None
        self.error: str | None = None


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.total_blocks = -(-args.size // (16 << args.szx))
        need = args.count + 64
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        self.ep = select.epoll()
        self.devices: list[Device] = []
        self.by_fd: dict[int, int] = {}
        for i in range(args.count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((args.host, args.port))
            self.devices.append(Device(s, args.szx))
            self.by_fd[s.fileno()] = i
            self.ep.register(s.fileno(), select.EPOLLIN)
        self.timers: list[tuple[float, int, int, int]] = []  # (when, seq, device, gen)
        self.seq = 0
        self.bins: list[int] = []
        self.resp_ms: list[float] = []
        self.path = args.path

    def at(self, when: float, i: int) -> None:
        d = self.devices[i]
        d.gen += 1
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, i, d.gen))

    def send_new(self, i: int, now: float) -> None:
        """A new request (new Message ID and token) for the device's next block."""
        d = self.devices[i]
        if d.sent_mids >= 0xFFFF:
            self.fail(i, "Message IDs exhausted")
            return
        d.mid = (d.mid + 1) & 0xFFFF
        d.sent_mids += 1
        d.token = d.sent_mids.to_bytes(4, "big")
        num = d.offset // (16 << d.szx)
        d.raw = coapmsg.get(
            self.path,
            mid=d.mid,
            token=d.token,
            extra=[(coapmsg.OPT_BLOCK2, coapmsg.block2(num, False, d.szx))],
        ).encode()
        d.tries = 0
        d.timeout = self.a.ack_timeout * self.rng.uniform(1.0, self.a.ack_random)
        if d.t_start is None:
            d.t_start = now
        self.transmit(i, now)

    def transmit(self, i: int, now: float) -> None:
        d = self.devices[i]
        d.sent_at = now
        try:
            d.sock.send(d.raw)
        except BlockingIOError:
            pass
        except OSError as e:
            self.fail(i, f"send: {e}")
            return
        self.at(now + d.timeout, i)

    def retransmit(self, i: int, now: float) -> None:
        d = self.devices[i]
        if d.tries >= self.a.max_retransmit:
            self.fail(i, f"no response at byte {d.offset} after {d.tries} retransmissions")
            return
        d.tries += 1
        d.retries += 1
        d.timeout *= 2
        self.transmit(i, now)

    def fail(self, i: int, why: str) -> None:
        d = self.devices[i]
        d.error = why
        d.gen += 1  # cancels its timers
        self.close(i)

    def close(self, i: int) -> None:
        d = self.devices[i]
        fd = d.sock.fileno()
        if fd >= 0:
            self.ep.unregister(fd)
            d.sock.close()

    def received(self, i: int, data: bytes, now: float) -> None:
        d = self.devices[i]
        if d.error or d.t_done is not None:
            return
        try:
            msg = coapmsg.parse(data)
        except ValueError:
            return
        if msg.mtype == coapmsg.CON:  # a separate response: acknowledge it
            d.sock.send(coapmsg.Message(mtype=coapmsg.ACK, code=0, mid=msg.mid).encode())
        if msg.mtype == coapmsg.RST:
            self.fail(i, "reset by the server")
            return
        if msg.code == 0:  # empty ACK: the response comes separately, stop retransmitting
            if msg.mid == d.mid:
                d.tries = self.a.max_retransmit
            return
        if msg.token != d.token:
            return  # a late answer to an earlier request
        if self.rng.random() < self.a.loss:
            d.lost += 1  # "lost on the way": wait for the retransmission timer
            return
        self.resp_ms.append((now - d.sent_at) * 1e3)
        if msg.code == coapmsg.REQUEST_ENTITY_INCOMPLETE and d.offset > 0:
            self.restart(i, now, "4.08")
            return
        if msg.code != coapmsg.CONTENT:
            self.fail(i, f"{coapmsg.code_str(msg.code)} {msg.payload[:60]!r} at byte {d.offset}")
            return
        b2 = msg.block2
        if b2 is None:
            self.fail(i, "response without Block2")
            return
        num, more, szx = b2
        if num * (16 << szx) != d.offset:
            self.fail(i, f"block {num} (szx {szx}) does not continue at byte {d.offset}")
            return
        etag = msg.opt(coapmsg.OPT_ETAG)
        if d.offset == 0:
            d.etag = etag
        elif etag != d.etag:
            self.fail(i, f"ETag changed mid-download ({d.etag!r} -> {etag!r})")
            return
        d.sha.update(msg.payload)
        d.offset += len(msg.payload)
        d.blocks += 1
        d.szx = szx
        b = int((now - self.a.start) / BIN)
        if b >= len(self.bins):
            self.bins.extend([0] * (b + 1 - len(self.bins)))
        self.bins[b] += 1
        if more:
            self.at(now + self.a.rtt, i)
            d.tries = -1  # marks "sleeping": the next timer sends a new request
            return
        if d.offset != self.a.size or d.sha.hexdigest() != self.a.sha256:
            self.fail(i, f"image mismatch ({d.offset} bytes, sha256 {d.sha.hexdigest()[:12]})")
            return
        d.t_done = now
        d.gen += 1
        self.close(i)

    def restart(self, i: int, now: float, why: str) -> None:
        d = self.devices[i]
        d.restarts += 1
        if d.restarts > MAX_RESTARTS:
            self.fail(i, f"restarted {d.restarts} times ({why})")
            return
        d.offset, d.etag, d.sha = 0, None, hashlib.sha256()
        self.at(now + self.a.rtt, i)
        d.tries = -1

    def run(self) -> dict:
        a = self.a
        n = len(self.devices)
        for i in range(n):
            self.at(a.start + a.ramp * i / max(n, 1), i)
            self.devices[i].tries = -1
        cpu0 = self_cpu_seconds()
        while self.timers or self.by_fd:
            now = time.monotonic()
            if now >= a.end:
                break
            wait = min(a.end, self.timers[0][0] if self.timers else a.end) - now
            for fd, _ in self.ep.poll(max(wait, 0)):
                i = self.by_fd[fd]
                sock = self.devices[i].sock
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, OSError):
                        break
                    self.received(i, data, time.monotonic())
                    if sock.fileno() < 0:
                        break
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, i, gen = heapq.heappop(self.timers)
                d = self.devices[i]
                if gen != d.gen or d.error or d.t_done is not None:
                    continue
                if d.tries < 0:
                    self.send_new(i, now)
                else:
                    self.retransmit(i, now)
            if all(d.error or d.t_done is not None for d in self.devices):
                break
        t_end = time.monotonic()
        cpu = self_cpu_seconds() - cpu0
        for i in range(n):
            self.close(i)
        return {
            "t_end": t_end,
            "cpu": cpu,
            "bins": self.bins,
            "resp_ms": self.resp_ms,
            "total_blocks": self.total_blocks,
            "devices": [
                {
                    "start": d.t_start,
                    "done": d.t_done,
                    "blocks": d.blocks,
                    "offset": d.offset,
                    "retries": d.retries,
                    "lost": d.lost,
                    "restarts": d.restarts,
                    "error": d.error,
                }
                for d in self.devices
            ],
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--size", type=int, required=True, help="expected image size in bytes")
    p.add_argument("--sha256", required=True)
    p.add_argument("--count", type=int, required=True, help="devices in this shard")
    p.add_argument("--szx", type=int, default=2)
    p.add_argument("--rtt", type=float, default=0.05)
    p.add_argument("--loss", type=float, default=0.01)
    p.add_argument("--ack-timeout", type=float, default=2.0)
    p.add_argument("--ack-random", type=float, default=1.5)
    p.add_argument("--max-retransmit", type=int, default=4)
    p.add_argument("--start", type=float, required=True, help="CLOCK_MONOTONIC start")
    p.add_argument("--ramp", type=float, default=1.0, help="device starts spread over this")
    p.add_argument("--end", type=float, required=True, help="CLOCK_MONOTONIC deadline")
    p.add_argument("--seed", type=int, default=1)
    print(json.dumps(Fleet(p.parse_args()).run()))


if __name__ == "__main__":
    main()
