#!/usr/bin/env python3
"""Memory under a flood: each server's RSS while it answers unique CON GETs as fast as it can.

For each server (a fresh one on a fresh root): idle RSS, then a --seconds flood from
`coapload gets` (closed loop, --window outstanding, spread over --sockets source ports,
every request with its own token and Message ID, over the 64 small files), RSS of the process tree
sampled every --interval seconds during the flood and for --after seconds after it. Reports idle
RSS, the largest sample during the flood, the last sample after it and the increase over idle,
against the target of <= +32 MiB (aiocoap keeps every response for EXCHANGE_LIFETIME, 247 s, so
both servers are expected to miss it for now). Runnable alone or from bench/run.py --flood.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import Metric, record
from servers import OURS_CMD, SMALL_FILES, THEIRS_CMD, Server, fill_root

TARGET_MIB = 32


class RssSampler:
    """Samples a server tree's RSS every `interval` seconds when called (as while_running)."""

    def __init__(self, srv: Server, interval: float) -> None:
        self.srv, self.interval = srv, interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MiB)
        self.next = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            kib = self.srv.tree_rss_kib()
            if kib is not None:
                self.samples.append((now, kib / 1024))
            self.next += self.interval
        time.sleep(max(0.0, min(0.1, self.next - time.monotonic())))

    def until(self, end: float) -> None:
        while time.monotonic() < end:
            self()


def flood_side(srv: Server, opts: argparse.Namespace) -> tuple[dict[str, float], list[str]]:
    """Flood one started server; returns its values by row key, and note lines."""
    time.sleep(opts.settle)
    idle_kib = srv.tree_rss_kib()
    if idle_kib is None:
        raise RuntimeError(f"server not running: {srv.error or srv.last_log_line()}")
    idle = idle_kib / 1024
    during = RssSampler(srv, opts.interval)
    res = harness.loadgen(
        srv,
        [f"small/s{i:03d}.txt" for i in range(SMALL_FILES)],
        opts.window,
        0,
        seconds=opts.seconds,
        sockets=opts.sockets,
        max_time=opts.seconds + 30,
        while_running=during,
    )
    during.next = 0.0
    during()  # one sample right at the end of the flood
    after = RssSampler(srv, opts.interval)
    after.next += opts.interval
    after.until(time.monotonic() + opts.after + 0.05)
    if not during.samples or not after.samples:
        raise RuntimeError("no RSS samples: the server exited?")
    peak, last = max(v for _, v in during.samples), after.samples[-1][1]
    trace = " ".join(f"{v:.0f}" for _, v in during.samples + after.samples)
    lines = [f"  {srv.name}: RSS MiB every {opts.interval:g} s, flood then idle: {trace}"]
    if res["lost"] or res["other"]:
        lines.append(f"  {srv.name}: {res['lost']} lost, {res['other']} non-2.05 responses")
    values = {
        "rate": res["rate"],
        "answered": res["ok"],
        "idle": idle,
        "max": peak,
        "after": last,
        "increase": peak - idle,
        "held": last - idle,
    }
    return values, lines


def make_rows(opts: argparse.Namespace) -> dict:
    def m(label: str, unit: str, **kw) -> Metric:
        return Metric(label, unit, False, **kw)

    return {
        "rate": Metric(f"flood rate, {opts.window} outstanding", "req/s", True),
        "answered": Metric("  requests answered (unique)", "", True),
        "idle": m("idle RSS", "MiB"),
        "max": m(f"max RSS during the {opts.seconds:g} s flood", "MiB"),
        "after": m(f"RSS {opts.after:g} s after the flood", "MiB"),
        "increase": m(
            "increase over idle (max - idle)",
            "MiB",
            target=f"ours <= +{TARGET_MIB} MiB",
            check=lambda o, _t: o <= TARGET_MIB,
        ),
        "held": m("  still held after (after - idle)", "MiB"),
    }


def run(opts: argparse.Namespace) -> tuple[str, str, list[str], dict]:
    """Flood each server in turn; returns (title, table, notes, JSON)."""
    progress = harness.Progress(opts.quiet)
    workdir = Path(tempfile.mkdtemp(prefix="coapfs-flood-"))
    rows = make_rows(opts)
    traces: list[str] = []
    try:
        for side, template in (("ours", opts.ours_cmd), ("theirs", opts.theirs_cmd)):
            fill_root(workdir / side, listings=0, big={})
            srv = Server(side, template, workdir / side, workdir)
            progress(f"flood against {side}: {opts.seconds:g} s, then {opts.after:g} s idle")

            values: dict[str, float] = {}

            def one(srv=srv, values=values) -> float:
                if not srv.start():
                    raise RuntimeError(srv.error)
                got, lines = flood_side(srv, opts)
                values.update(got)
                traces.extend(lines)
                return got["rate"]

            try:
                if record(rows["rate"], side, one, float("inf")) is None:
                    for m in rows.values():
                        m.errors.setdefault(side, rows["rate"].errors[side])
                for key, m in rows.items():
                    if key != "rate" and key in values:
                        m.samples[side].append(values[key])
            finally:
                srv.stop()
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    title = (
        f"Memory under a flood of unique CON GETs ({opts.sockets} source ports, "
        f"{opts.window} outstanding), RSS of the process tree every {opts.interval:g} s"
    )
    data = {
        "options": vars(opts),
        "metrics": {k: m.as_json(harness.SIDES) for k, m in rows.items()},
    }
    return title, harness.table(rows.values(), harness.SIDES), traces + harness.notes(rows), data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="flood duration")
    p.add_argument("--after", type=float, default=30.0, help="seconds sampled after the flood")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--window", type=int, default=64, help="requests outstanding")
    p.add_argument("--sockets", type=int, default=64, help="source ports, round-robin")
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before measuring")
    p.add_argument("--ours-cmd", default=OURS_CMD)
    p.add_argument("--theirs-cmd", default=THEIRS_CMD)
    p.add_argument("--quick", action="store_true", help="10 s flood, 5 s after")
    p.add_argument("--keep", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.seconds, opts.after = min(opts.seconds, 10.0), min(opts.after, 5.0)
    return opts


def main(argv: list[str] | None = None) -> int:
    title, text, note_lines, _ = run(parse_args(argv))
    harness.print_report(title, text, note_lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
