"""Observers cost bounded memory and time (issue 10): caps per endpoint and in all (over them a
GET is answered without Observe: not observed, RFC 7641 3.1); observers that die are dropped
without a trace in the log; and notifying thousands of observers of one file leaves the event
loop free for everyone else's requests (p99 GET latency at most 100 ms during the fan-out)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import coapmsg

from support.child import child_environment, command
from support.client import Client
from support.flood import Flood
from support.observer import Observer
from support.polling import wait_until
from support.raw import GET, OBSERVE, Response, path
from support.rawpeer import RawPeer
from support.repo import environment
from support.server import COAPFS, Server, Servers
from support.status import current_status, figure

NON = 1
FANOUT_SOCKETS, FANOUT_PER_SOCKET = 4, 800  # 3,200 observations of one file
P99_LIMIT = 0.100  # the number


def loopback_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def observed_server(start_server: Servers, tmp_path: Path, observe: str) -> tuple[Server, Path]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "watched.txt").write_text("version 0")
    (root / "a.txt").write_text("hello\n")
    config = tmp_path / "observe.toml"
    config.write_text(f"[observe]\n{observe}\n")
    server = start_server.start("-v", "--config", str(config), root=root, notify=True)
    server.notify.wait_for("READY")
    return server, root


def register(peer: RawPeer, name: str) -> Response:
    exchange = peer.exchange(GET, [*path(name), (OBSERVE, b"")], token=os.urandom(8))
    assert exchange.response is not None and exchange.response.code == "2.05"
    return exchange.response


def test_observations_are_capped_per_endpoint_and_in_all(start_server, tmp_path) -> None:
    server, root = observed_server(start_server, tmp_path, "max_per_peer = 3\nmax_total = 5")
    with loopback_socket() as one, loopback_socket() as two, loopback_socket() as three:
        first = RawPeer(one, ("127.0.0.1", server.port))
        answers = [register(first, "watched.txt") for _ in range(4)]
        assert [a.opt(OBSERVE) is not None for a in answers] == [True, True, True, False]
        second = RawPeer(two, ("127.0.0.1", server.port))
        answers = [register(second, "watched.txt") for _ in range(3)]
        assert [a.opt(OBSERVE) is not None for a in answers] == [True, True, False]
        third = RawPeer(three, ("127.0.0.1", server.port))
        refused = register(third, "watched.txt")
        assert refused.opt(OBSERVE) is None and refused.payload == b"version 0"
        assert figure(current_status(server), "observers") == 5
        # Only the accepted observations hear of a change.
        (root / "watched.txt").write_text("version 1")
        heard = [len(first.receive(1.0)), len(second.receive(0.3)), len(third.receive(0.3))]
        assert heard == [3, 2, 0], heard


def test_dead_observers_are_dropped_and_the_living_still_notified(
    start_server, tmp_path, client: Client, coap_client: str
) -> None:
    """Two aiocoap-client --observe and two libcoap coap-client -s 30, killed with SIGKILL:
    their notifications fail (ICMP port unreachable), they are dropped, a live observer keeps
    hearing of every change, and the log holds no traceback."""
    server, root = observed_server(start_server, tmp_path, "")
    uri = server.uri("watched.txt")
    aiocoap_client = [*COAPFS[:1], "-m", "aiocoap.cli.client", "--observe", uri]
    libcoap = [coap_client, "-s", "30", "-m", "get", uri]
    doomed = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        for command, env in (
            (aiocoap_client, environment()),
            (aiocoap_client, environment()),
            (libcoap, None),
            (libcoap, None),
        )
    ]
    live = Observer(client, uri)
    try:
        wait_until(
            lambda: figure(current_status(server), "observers") == 5,
            30,
            what="five observers registered",
        )
        for process in doomed:
            process.send_signal(signal.SIGKILL)
            process.wait()
        for version in range(1, 6):
            (root / "watched.txt").write_text(f"version {version}")
            expected = f"version {version}".encode()
            assert live.wait_for(lambda m, e=expected: m.payload == e, 10), live.notifications
            if figure(current_status(server), "observers") == 1:
                break
        wait_until(
            lambda: figure(current_status(server), "observers") == 1,
            20,
            what="the four dead observers dropped",
            details=server.log,
        )
    finally:
        live.cancel()
        for process in doomed:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = server.log()
    assert "Traceback" not in log and "Task exception was never retrieved" not in log, log


def test_notifying_thousands_of_observers_leaves_gets_prompt(start_server, tmp_path) -> None:
    total = FANOUT_SOCKETS * FANOUT_PER_SOCKET
    server, root = observed_server(
        start_server, tmp_path, f"max_per_peer = {total}\nmax_total = {total}"
    )
    address = ("127.0.0.1", server.port)
    sockets = [loopback_socket() for _ in range(FANOUT_SOCKETS)]
    floods = [Flood(s, address, window=32, patience=1.0) for s in sockets]
    try:
        # Registrations are NON: one lost on a busy machine is simply sent again, by count.
        for _ in range(5):
            registered = figure(current_status(server), "observers")
            if registered == total:
                break
            missing_per_socket = -(-(total - registered) // FANOUT_SOCKETS)
            for flood in floods:
                flood.send(
                    coapmsg.Message(NON, GET, i, os.urandom(8), [*path("watched.txt"),
                                    (OBSERVE, b"")]).encode()
                    for i in range(missing_per_socket)
                )  # fmt: skip
            for flood in floods:
                flood.drain()
        assert figure(current_status(server), "observers") >= total
        total = figure(current_status(server), "observers")

        # Best of two attempts of three fan-outs each: a busy machine may spoil one, while a
        # server that stalls during fan-out (1.1 s before batching) fails both.
        results = []
        for attempt in range(2):
            results.append(measure_fanout(server, root, floods, total, attempt))
            if results[-1][0] <= P99_LIMIT:
                break
    finally:
        for flood in floods:
            flood.close()
        for s in sockets:
            s.close()
    for p99, fanout, latencies in results:
        print(f"\nfan-out to {total} observers: {fanout:.2f} s; GET latency meanwhile: "
              f"{len(latencies)} samples, median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")  # fmt: skip
        assert len(latencies) >= 30, latencies
    best = min(results)
    assert best[0] <= P99_LIMIT, [r[2][-10:] for r in results]


def measure_fanout(
    server: Server, root: Path, floods: list[Flood], total: int, attempt: int
) -> tuple[float, float, list[float]]:
    """Three changes of the observed file, with plain GETs from a process of its own
    meanwhile: (p99 latency, mean fan-out duration, the sorted latencies during fan-outs)."""
    probe = subprocess.Popen(
        command("latency", "127.0.0.1", str(server.port), "a.txt"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_environment(),
    )  # fmt: skip
    assert probe.stdout is not None and probe.stdin is not None
    assert probe.stdout.readline() == b"ready\n"
    windows = []
    for version in range(1, 4):
        before = sum(f.answered for f in floods)
        started = time.monotonic()
        (root / "watched.txt").write_text(f"version {attempt}.{version}")
        wait_until(
            lambda b=before: sum(f.answered for f in floods) >= b + total,
            60,
            what=f"{total} notifications",
            details=lambda: str([f.codes for f in floods]),
        )
        windows.append((started, time.monotonic()))
        time.sleep(0.15)  # past observe.coalesce_ms: the next change notifies at once
    probe.stdin.close()
    samples = json.loads(probe.stdout.read())
    probe.wait(10)
    latencies = sorted(t for sent, t in samples if any(a <= sent <= b for a, b in windows))
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return p99, sum(b - a for a, b in windows) / len(windows), latencies
