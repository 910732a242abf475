#!/usr/bin/env python3
"""Mixed soak: N minutes of mixed load against one server, RSS sampled every 10 s.

Load, all at once until the deadline: small GETs (`coapload gets`, a few outstanding over
several source ports), block-wise downloads of a 1 MiB file (bench/rawclient.py, sha256 checked),
--observers observations of files that change every --change-every seconds (notifications
counted), and block-wise PUTs of 64 KiB (so the server needs --write; the default command has
it). Reports whether RSS is flat after the warm-up: the largest sample in the last third against
the first third of the post-warm-up samples, and the least-squares slope in MiB per minute. The
warm-up defaults to 5 minutes because aiocoap keeps every exchange for EXCHANGE_LIFETIME (247 s):
only after that can its store stop growing. Not run by any other script; nothing is left
running.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import select
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import coapmsg
import harness
from flood import RssSampler
from harness import MIB, Metric
from rawclient import CoapError, CoapTimeout, RawClient
from servers import OURS_CMD, SMALL_FILES, Server, fill_root

FLAT_TOLERANCE = 1.05  # last third's max may exceed the first third's by 5 %
FLAT_SLOPE = 1.0  # MiB per minute


class Load:
    """The background parts of the mix; each runs in a thread until `end`, errors counted."""

    def __init__(self, srv: Server, opts: argparse.Namespace, end: float, big: bytes) -> None:
        self.srv, self.o, self.end, self.big = srv, opts, end, big
        self.big_sha = hashlib.sha256(big).hexdigest()
        self.counts = {"downloads": 0, "notifications": 0, "puts": 0, "changes": 0}
        self.errors: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self.lock = threading.Lock()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def error(self, what: str, e: Exception) -> None:
        if time.monotonic() >= self.end - 0.5:
            return  # cut short by the end of the soak, not the server's fault
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1
            self.last_error[what] = str(e)[:120]
        time.sleep(0.5)

    def downloads(self) -> None:
        while time.monotonic() < self.end:
            c = RawClient(self.srv.port)
            try:
                f = c.fetch("big1.bin", timeout=min(30.0, max(self.end - time.monotonic(), 1)))
                if f.sha256 != self.big_sha:
                    raise CoapError("sha256 mismatch")
                self.count("downloads")
            except (CoapError, CoapTimeout, OSError) as e:
                self.error("downloads", e)
            finally:
                c.close()
            time.sleep(self.o.pause)

    def puts(self) -> None:
        rng = random.Random(3)
        n = 0
        while time.monotonic() < self.end:
            data = rng.randbytes(64 * 1024)
            name = f"put/p{n % 8}.bin"
            c = RawClient(self.srv.port)
            try:
                c.put(name, data, timeout=min(30.0, max(self.end - time.monotonic(), 1)))
                if hashlib.sha256((self.srv.root / name).read_bytes()).digest() != (
                    hashlib.sha256(data).digest()
                ):
                    raise CoapError(f"{name} on disk differs")
                self.count("puts")
            except (CoapError, CoapTimeout, OSError) as e:
                self.error("puts", e)
            finally:
                c.close()
            n += 1
            time.sleep(self.o.put_every)

    def observers(self) -> None:
        clients = []
        try:
            for i in range(self.o.observers):
                c = RawClient(self.srv.port)
                clients.append(c)
                try:
                    c.observe(f"soak/f{i:03d}.txt")
                except (CoapError, CoapTimeout, OSError) as e:
                    self.error("observe", e)
            by_sock = {c.sock: c for c in clients}
            next_change, k = time.monotonic(), 0
            while time.monotonic() < self.end:
                now = time.monotonic()
                if now >= next_change:
                    path = self.srv.root / "soak" / f"f{k % self.o.observers:03d}.txt"
                    path.write_text(f"change {k} at {time.time_ns()}\n")
                    self.count("changes")
                    k += 1
                    next_change = now + self.o.change_every
                ready, _, _ = select.select(list(by_sock), [], [], 0.1)
                for sock in ready:
                    msg = by_sock[sock]._recv(time.perf_counter() + 0.01)
                    if msg is None:
                        continue
                    if msg.mtype == coapmsg.CON:
                        by_sock[sock]._ack(msg)
                    if msg.code == coapmsg.CONTENT:
                        self.count("notifications")
        except OSError as e:
            self.error("observe", e)
        finally:
            for c in clients:
                c.close()


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (v - mv) for t, v in samples) / var * 60 if var else 0.0


def soak(opts: argparse.Namespace, workdir: Path) -> tuple[str, str, list[str]]:
    big = random.Random(5).randbytes(MIB)
    root = workdir / "root"
    fill_root(root, listings=0, big={"big1.bin": big})
    (root / "put").mkdir()
    (root / "soak").mkdir()
    for i in range(opts.observers):
        (root / "soak" / f"f{i:03d}.txt").write_text("initial\n")
    srv = Server("soak", opts.cmd, root, workdir)
    rows = {
        key: Metric(label, unit, True, ratio_of=(srv.name, srv.name))  # one side: no ratio
        for key, label, unit in (
            ("gets", "small GETs answered", ""),
            ("rate", "  small GET rate (mean)", "req/s"),
            ("downloads", "1 MiB downloads", ""),
            ("puts", "64 KiB uploads", ""),
            ("changes", "file changes", ""),
            ("notifications", "  notifications received", ""),
            ("errors", "errors (all kinds)", ""),
            ("start", "RSS after start-up", "MiB"),
            ("warm", "RSS at the end of the warm-up", "MiB"),
            ("first", "  max RSS, first third after warm-up", "MiB"),
            ("last", "  max RSS, last third after warm-up", "MiB"),
            ("slope", "  RSS slope after warm-up", "MiB/min"),
        )
    }
    rows["last"].target = f"<= first third x {FLAT_TOLERANCE}"
    rows["slope"].target = f"<= {FLAT_SLOPE} MiB/min"
    sampler = RssSampler(srv, opts.interval)
    notes: list[str] = []
    try:
        if not srv.start():
            for m in rows.values():
                m.errors[srv.name] = f"error ({srv.error})"
            return "soak", harness.table(rows.values(), [srv.name], None), harness.notes(rows)
        rows["start"].samples[srv.name].append((srv.tree_rss_kib() or 0) / 1024)
        t0 = time.monotonic()
        duration = opts.minutes * 60
        end = t0 + duration
        load = Load(srv, opts, end, big)
        threads = [
            threading.Thread(target=f, daemon=True)
            for f in (load.downloads, load.puts, load.observers)
        ]
        for t in threads:
            t.start()
        res = {}
        try:
            res = harness.loadgen(
                srv,
                [f"small/s{i:03d}.txt" for i in range(SMALL_FILES)],
                opts.get_window,
                0,
                seconds=duration,
                sockets=opts.get_window,
                max_time=duration + 30,
                while_running=sampler,
            )
        except RuntimeError as e:
            load.error("gets", e)
        for t in threads:
            t.join(timeout=40)
        sampler()
    finally:
        srv.stop()
    side = srv.name
    for key in ("downloads", "puts", "changes", "notifications"):
        rows[key].samples[side].append(load.counts[key])
    if res:
        rows["gets"].samples[side].append(res["ok"])
        rows["rate"].samples[side].append(res["rate"])
    rows["errors"].samples[side].append(sum(load.errors.values()))
    notes += [
        f"  {what}: {n} errors, last: {load.last_error[what]}" for what, n in load.errors.items()
    ]
    samples = [(t - t0, v) for t, v in sampler.samples]
    warm = [s for s in samples if s[0] >= opts.warmup * 60]
    if len(warm) >= 3:
        third = len(warm) // 3
        first, last = max(v for _, v in warm[:third]), max(v for _, v in warm[-third:])
        slope = slope_per_minute(warm)
        rows["warm"].samples[side].append(warm[0][1])
        rows["first"].samples[side].append(first)
        rows["last"].samples[side].append(last)
        rows["slope"].samples[side].append(slope)
        rows["last"].check = lambda v, _t, first=first: v <= first * FLAT_TOLERANCE
        rows["slope"].check = lambda v, _t: v <= FLAT_SLOPE
    else:
        rows["first"].errors[side] = "error (fewer than 3 samples after the warm-up)"
    trace = " ".join(f"{v:.0f}" for _, v in samples)
    notes.insert(0, f"  RSS MiB every {opts.interval:g} s: {trace}")
    title = (
        f"Soak: {opts.minutes:g} min of mixed load, warm-up {opts.warmup:g} min, RSS of the "
        f"process tree every {opts.interval:g} s; server: {srv.cmd}"
    )
    return title, harness.table(rows.values(), [side], None), notes + harness.notes(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="minutes before RSS must be flat (default 5; at most half the run)",
    )
    p.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--cmd", default=OURS_CMD + " --write", help="server command template")
    p.add_argument("--observers", type=int, default=36)
    p.add_argument("--change-every", type=float, default=0.5, help="seconds between changes")
    p.add_argument("--put-every", type=float, default=2.0, help="seconds between uploads")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between downloads")
    p.add_argument("--get-window", type=int, default=4, help="small GETs outstanding")
    p.add_argument("--keep", action="store_true")
    opts = p.parse_args(argv)
    opts.warmup = min(opts.warmup, opts.minutes / 2)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="coapfs-soak-"))
    try:
        harness.print_report(*soak(opts, workdir))
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
