"""File churn against the real server (issue 10: GETs must keep >= 50 % of their undisturbed
rate while a local process creates files at a high rate, or renames, in the served tree):

    python tests/measure/churn.py [--seconds 5] [--profile FILE]

Serves a fresh root with an observed (and so watched and cached) directory `hot/`, and measures
the rate of plain GETs, one after the other from this process, undisturbed, then while a child
process creates files in `hot/` as fast as it can, then while it renames one there as fast as
it can. Prints the rates and the ratios. With --profile, py-spy (PyPI) samples the server
during the churn phases and writes the sampled stacks to FILE (collapsed, one stack a line with
its count: what flamegraph.pl and speedscope read)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS), str(TESTS.parent / "bench")]

from support.client import Client  # noqa: E402
from support.observer import Observer  # noqa: E402
from support.raw import GET, path  # noqa: E402
from support.rawpeer import RawPeer  # noqa: E402
from support.server import Server  # noqa: E402

NON = 1


def create(directory: Path, stop) -> None:
    i = 0
    while not stop.is_set():
        for _ in range(200):
            os.close(os.open(directory / f"n{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            i += 1
    print(f"  created {i} files", flush=True)


def rename(directory: Path, stop) -> None:
    a, b = directory / "r.a", directory / "r.b"
    a.touch()
    i = 0
    while not stop.is_set():
        for _ in range(500):
            os.rename(a, b)
            os.rename(b, a)
            i += 2
    print(f"  renamed {i} times", flush=True)


def get_rate(peer: RawPeer, seconds: float) -> tuple[float, int]:
    """GETs per second, one after the other, and how many went unanswered (1 s each)."""
    answered = lost = 0
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        exchange = peer.exchange(GET, path("a.txt"), mtype=NON, token=os.urandom(4), timeout=1.0)
        if exchange.response is not None:
            answered += 1
        else:
            lost += 1
    return answered / (time.monotonic() - started), lost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="coapfs-churn-"))
    root = top / "root"
    (root / "hot").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    server = Server(root=root, log=top / "server.log")
    client = Client()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    peer = RawPeer(sock, ("127.0.0.1", server.port))
    try:
        server.wait_ready(lambda: client.answers(f"{server.base}/a.txt"))
        observer = Observer(client, f"{server.base}/hot/", blockwise=False)
        get_rate(peer, 1.0)  # warm-up: a.txt cached
        undisturbed, _ = get_rate(peer, args.seconds)
        print(f"undisturbed: {undisturbed:.0f} GET/s", flush=True)
        spy = None
        if args.profile is not None:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                 "--format", "raw", "-o", str(args.profile), "-p", str(server.proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for name, work in (("creating files", create), ("renaming", rename)):
            stop = multiprocessing.Event()
            child = multiprocessing.Process(target=work, args=(root / "hot", stop))
            child.start()
            time.sleep(0.5)
            rate, lost = get_rate(peer, args.seconds)
            stop.set()
            child.join()
            ratio = rate / undisturbed
            print(f"{name}: {rate:.0f} GET/s ({ratio:.0%} of undisturbed), {lost} unanswered, "
                  f"{len(observer.notifications)} notifications so far", flush=True)  # fmt: skip
            time.sleep(2)  # let the server catch up before the next phase
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if observer.ended is None:
            observer.cancel()
    finally:
        sock.close()
        client.close()
        server.close()
        print(f"server log: {top / 'server.log'}")


if __name__ == "__main__":
    main()
