"""`python -m support.latency HOST PORT PATH`: plain NON GETs of PATH one after the other, from a
process of its own (so that the test's own threads cannot delay it), until its standard input
closes; then one JSON list on stdout of [when sent (time.monotonic(), the same clock in every
process), latency] pairs in seconds (a lost answer counts as 2 s). It prints "ready" once its
first answer arrived."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time

from support.raw import GET, path
from support.rawpeer import RawPeer

LOST = 2.0
NON = 1


def main(host: str, port: str, name: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    peer = RawPeer(sock, (host, int(port)))
    segments = path(*name.split("/"))
    latencies: list[tuple[float, float]] = []
    while True:
        started = time.monotonic()
        exchange = peer.exchange(GET, segments, mtype=NON, token=os.urandom(4), timeout=LOST)
        latency = time.monotonic() - started if exchange.response else LOST
        latencies.append((started, latency))
        if len(latencies) == 1:
            print("ready", flush=True)
        if select.select([sys.stdin], [], [], 0.0005)[0] and not sys.stdin.read(1):
            break
    print(json.dumps(latencies[1:]), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
