"""Raw-UDP CoAP GET load generator: keeps W requests outstanding for a fixed request count.

Runs in its own process (bench/run.py starts it) so that its CPU use is measured apart from the
orchestrator and it never competes with it for the interpreter. Prints one JSON object.
Each run uses a fresh socket (so a fresh source port) and stops before Message IDs could wrap,
because servers deduplicate on (remote, Message ID) for EXCHANGE_LIFETIME.
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

MAX_REQUESTS = 60000  # below 2**16 Message IDs: no request may look like a duplicate
LOSS_TIMEOUT = 1.0  # a request unanswered this long is counted lost and replaced


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.host, args.port))
    sock.setblocking(False)
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
    # Count-based, so both servers get exactly the same number of requests (their duplicate
    # caches then cost the same memory); the rate is the measured count over its elapsed time.
    send_limit = min(args.warmup + args.requests + args.window, MAX_REQUESTS)
    done = 0  # answered or lost since start
    measuring = False
    measured_ok = 0
    lat: list[float] = []
    cpu0 = srv0 = t0 = 0.0
    hard_end = time.perf_counter() + args.max_time

    def send_one() -> None:
        nonlocal counter
        if counter >= send_limit:
            return
        counter += 1
        raw = templates[counter % len(templates)]
        mid = counter & 0xFFFF
        raw[2], raw[3] = mid >> 8, mid & 0xFF
        token = counter.to_bytes(4, "big")
        raw[4:8] = token
        outstanding[token] = time.perf_counter()
        with contextlib.suppress(BlockingIOError):
            sock.send(raw)

    def finished_one() -> None:
        nonlocal done, measuring, cpu0, srv0, t0
        done += 1
        if not measuring and done >= args.warmup:
            measuring = True
            cpu0, srv0 = self_cpu_seconds(), proc_cpu_seconds(args.server_pid)
            t0 = time.perf_counter()
        send_one()

    for _ in range(args.window):
        send_one()
    timed_out = False
    while not measuring or done < args.warmup + args.requests:
        if time.perf_counter() >= hard_end:
            timed_out = True
            break
        r, _, _ = select.select([sock], [], [], 0.05)
        if r:
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
        if not outstanding and counter >= send_limit:
            break
    t1 = time.perf_counter()
    if not measuring:
        return {"error": f"warm-up not finished in {args.max_time:g} s"}
    cpu1, srv1 = self_cpu_seconds(), proc_cpu_seconds(args.server_pid)
    elapsed = t1 - t0
    lat.sort()
    return {
        "rate": measured_ok / elapsed,
        "ok": measured_ok,
        "other": stats["other"],
        "lost": stats["lost"],
        "elapsed": elapsed,
        "timed_out": timed_out,
        "client_cpu_per_req_us": (cpu1 - cpu0) / measured_ok * 1e6 if measured_ok else None,
        "server_cpu_per_req_us": (srv1 - srv0) / measured_ok * 1e6 if measured_ok else None,
        "latency_median_ms": lat[len(lat) // 2] * 1e3 if lat else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--requests", type=int, default=3000, help="measured requests")
    p.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    p.add_argument("--max-time", type=float, default=20.0, help="give up after this many s")
    p.add_argument("--type", choices=("con", "non"), default="con")
    p.add_argument("--etag", help="hex ETag to send; then 2.03 counts as success")
    p.add_argument("paths", nargs="+")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
