"""Raw-UDP CoAP GET load generator: keeps W requests outstanding, for a fixed request count or
a fixed time.

Runs in its own process (bench/run.py starts it) so that its CPU use is measured apart from the
orchestrator and it never competes with it for the interpreter. Prints one JSON object.
Requests go round-robin over --sockets fresh sockets (so fresh source ports); a socket is
replaced by a new one before its Message IDs could wrap, because servers deduplicate on
(remote, Message ID) for EXCHANGE_LIFETIME. Tokens are unique over the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import socket
import time

import coapmsg
import proctree

MAX_REQUESTS = 60000  # per socket, below 2**16 Message IDs: no request may look like a duplicate
LOSS_TIMEOUT = 1.0  # a request unanswered this long is counted lost and replaced


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sockets:
    """Round-robin over `count` connected sockets, each replaced after MAX_REQUESTS sends.

    A replaced socket stays open (and read) until the end, so late answers are still counted.
    """

    def __init__(self, host: str, port: int, count: int) -> None:
        self.addr = (host, port)
        self.all: list[socket.socket] = []
        self.active = [self._new() for _ in range(count)]
        self.turn = 0

    def _new(self) -> list:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(self.addr)
        sock.setblocking(False)
        self.all.append(sock)
        return [sock, int.from_bytes(os.urandom(2), "big"), 0]  # socket, next MID, sent

    def next(self) -> tuple[socket.socket, int]:
        """The socket for the next request and the Message ID to use on it."""
        self.turn = (self.turn + 1) % len(self.active)
        entry = self.active[self.turn]
        if entry[2] >= MAX_REQUESTS:
            entry = self.active[self.turn] = self._new()
        entry[1] = (entry[1] + 1) & 0xFFFF
        entry[2] += 1
        return entry[0], entry[1]

    def close(self) -> None:
        for s in self.all:
            s.close()


def run(args: argparse.Namespace) -> dict:
    socks = Sockets(args.host, args.port, args.sockets)
    mtype = coapmsg.CON if args.type == "con" else coapmsg.NON
    extra = [(coapmsg.OPT_ETAG, bytes.fromhex(args.etag))] if args.etag else []
    # Pre-encode one template per path; per request only MID and token bytes change.
    templates = []
    for p in args.paths:
        raw = bytearray(coapmsg.get(p, mid=0, token=b"\0\0\0\0", mtype=mtype, extra=extra).encode())
        templates.append(raw)
    ok_codes = {coapmsg.CONTENT} if not args.etag else {coapmsg.VALID}

    outstanding: dict[bytes, float] = {}
    counter = 0
    stats = {"other": 0, "lost": 0}
    # Count-based by default, so both servers get exactly the same number of requests (their
    # duplicate caches then cost the same memory); the rate is the measured count over its
    # elapsed time. With --seconds, sending stops that long after the warm-up instead.
    timed = args.seconds > 0
    send_limit = args.warmup + args.requests + args.window
    done = 0  # answered or lost since start
    measuring = False
    measured_ok = 0
    lat: list[float] = []
    cpu0 = srv0 = t0 = 0.0
    hard_end = time.perf_counter() + args.max_time
    send_end = float("inf")

    def send_one() -> None:
        nonlocal counter
        if (not timed and counter >= send_limit) or time.perf_counter() >= send_end:
            return
        counter += 1
        raw = templates[counter % len(templates)]
        sock, mid = socks.next()
        raw[2], raw[3] = mid >> 8, mid & 0xFF
        token = (counter & 0xFFFFFFFF).to_bytes(4, "big")
        raw[4:8] = token
        outstanding[token] = time.perf_counter()
        with contextlib.suppress(BlockingIOError):
            sock.send(raw)

    def finished_one() -> None:
        nonlocal done, measuring, cpu0, srv0, t0, send_end
        done += 1
        if not measuring and done >= args.warmup:
            measuring = True
            cpu0, srv0 = self_cpu_seconds(), proctree.tree_cpu_seconds(args.server_pid)
            t0 = time.perf_counter()
            if timed:
                send_end = t0 + args.seconds
        send_one()

    for _ in range(args.window):
        send_one()
    timed_out = False
    while timed or not measuring or done < args.warmup + args.requests:
        if time.perf_counter() >= hard_end:
            timed_out = True
            break
        readable, _, _ = select.select(socks.all, [], [], 0.05)
        for sock in readable:
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    stats["other"] += 1
                    break
                if len(data) < 8:
                    continue
                sent = outstanding.pop(data[4:8], None)
                if sent is None:
                    continue
                if data[1] in ok_codes:
                    if measuring:
                        measured_ok += 1
                        lat.append(time.perf_counter() - sent)
                else:
                    stats["other"] += 1
                finished_one()
        now = time.perf_counter()
        for token in [tok for tok, sent in outstanding.items() if now - sent > LOSS_TIMEOUT]:
            del outstanding[token]
            stats["lost"] += 1
            finished_one()
        if not outstanding and ((not timed and counter >= send_limit) or now >= send_end):
            break
    t1 = time.perf_counter()
    socks.close()
    if not measuring:
        return {"error": f"warm-up not finished in {args.max_time:g} s"}
    cpu1, srv1 = self_cpu_seconds(), proctree.tree_cpu_seconds(args.server_pid)
    elapsed = t1 - t0
    lat.sort()
    return {
        "rate": measured_ok / elapsed,
        "ok": measured_ok,
        "other": stats["other"],
        "lost": stats["lost"],
        "elapsed": elapsed,
        "t0": t0,  # CLOCK_MONOTONIC: comparable between shards on one machine
        "t1": t1,
        "server_cpu": [srv0, srv1],
        "client_cpu": cpu1 - cpu0,
        "sockets_used": len(socks.all),
        "timed_out": timed_out,
        "client_cpu_per_req_us": (cpu1 - cpu0) / measured_ok * 1e6 if measured_ok else None,
        "server_cpu_per_req_us": (srv1 - srv0) / measured_ok * 1e6 if measured_ok else None,
        "latency_median_ms": lat[len(lat) // 2] * 1e3 if lat else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--server-pid", type=int, required=True, help="CPU is summed over its process tree"
    )
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--requests", type=int, default=3000, help="measured requests")
    p.add_argument("--seconds", type=float, default=0, help="measure for a time instead")
    p.add_argument("--sockets", type=int, default=1, help="source ports, round-robin")
    p.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    p.add_argument("--max-time", type=float, default=20.0, help="give up after this many s")
    p.add_argument("--type", choices=("con", "non"), default="con")
    p.add_argument("--etag", help="hex ETag to send; then 2.03 counts as success")
    p.add_argument("paths", nargs="+")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
