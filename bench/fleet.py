#!/usr/bin/env python3
"""Fleet benchmark: K simulated devices download one image block by block from each server.

For each K of the sweep and each server (ours, ours with N workers, aiocoap-fileserver; in
alternating order, a fresh server per cell), `coapload fleet` shards run K devices, each on its own
UDP socket, fetching a 256 KiB image with 64-byte blocks (Block2 szx 2), one block per simulated
round trip, with simulated response loss and CoAP retransmission. Reported per server and K:
devices started and completed within the time budget, completion time (projected from progress
for devices still running) against the round-trip-bound ideal, sustained block rate, retries,
server CPU and RSS summed over its process tree, and the load generator's own CPU. A small-GET
rate row compares the worker counts. Runnable alone (`python3 bench/fleet.py [--quick]`) or from
bench/run.py --fleet. Only loopback; every run has a deadline; only servers started here are
stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import coapload
import harness
from harness import Metric, record
from servers import OURS_CMD, SMALL_FILES, THEIRS_CMD, Server, fill_root

IMAGE = "image.bin"
SZX = 2
RSS_SAMPLE = 0.5  # seconds between RSS samples of the server tree during a cell
PER_DEVICE_LIMIT_KIB = 256  # "memory bounded": less than one copy of the image per device
SPEEDUP = 1.7  # issue target: N workers against one, on this 2-core machine
ACK_TIMEOUT, ACK_RANDOM_FACTOR = 2.0, 1.5  # RFC 7252's defaults, as the devices use them
ACK_TIMEOUT_MEAN = ACK_TIMEOUT * (1 + ACK_RANDOM_FACTOR) / 2
TICK = 0.002  # the generators' wake-up tick (bench/coapload.py)
WORKERS_CMD = OURS_CMD + " --workers {workers}"


class AllOurs(Metric):
    """A row whose target applies to every side named in ratio_of, each on its own."""

    def verdict(self) -> str:
        if self.check is None:
            return ""
        values = [self.value(s) for s in self.ratio_of if s not in self.errors]
        if not values or None in values:
            return "FAIL" if not values else "?"
        return "pass" if all(self.check(v, None) for v in values) else "FAIL"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class FleetBench:
    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.o = opts
        self.workdir = workdir
        self.progress = harness.Progress(opts.quiet)
        self.image = random.Random(11).randbytes(opts.image_kib * 1024)
        self.blocks = -(-len(self.image) // (16 << SZX))
        self.ideal = self.blocks * opts.rtt
        self.wside = f"ours-w{opts.workers}"
        self.sides = [
            ("ours", opts.ours_cmd),
            (self.wside, opts.workers_cmd),
            ("theirs", opts.theirs_cmd),
        ]
        if opts.servers:
            wanted = {"workers" if n == "ours-wN" else n for n in opts.servers}
            self.sides = [
                (n, c) for n, c in self.sides if ("workers" if n == self.wside else n) in wanted
            ]
        self.names = [name for name, _ in self.sides]
        self.metrics: dict[str, Metric] = {}
        self.anomalies: list[str] = []
        self.roots = {}
        for name, _ in self.sides:
            root = workdir / name
            fill_root(root, listings=0, big={IMAGE: self.image})
            self.roots[name] = root

    def metric(self, key: str, *args, cls=Metric, **kwargs) -> Metric:
        if key not in self.metrics:
            kwargs.setdefault("ratio_of", (self.wside, "ours"))
            self.metrics[key] = cls(*args, **kwargs)
        return self.metrics[key]

    def server(self, name: str, template: str, tag: str) -> Server:
        return Server(
            f"{name}-{tag}", template, self.roots[name], self.workdir, workers=self.o.workers
        )

    # --- one cell: K devices against one server -------------------------------------------

    def run_devices(self, srv: Server, k: int) -> dict:
        """Start the shards, sample the server while they run, merge what they print."""
        shards = self.o.shards or max(1, -(-k // self.o.devices_per_shard))
        start = time.monotonic() + 1.0 + k / 2000  # time to start shards and open sockets
        end = start + self.o.ramp + self.o.budget
        cmds = []
        for s in range(shards):
            count = k // shards + (s < k % shards)
            cmds.append(
                coapload.command(
                    "fleet",
                    *("--port", str(srv.port), "--path", IMAGE),
                    *("--image", str(srv.root / IMAGE)),
                    *("--count", str(count), "--szx", str(SZX)),
                    *("--rtt", str(self.o.rtt), "--loss", str(self.o.loss)),
                    *("--ack-timeout", str(ACK_TIMEOUT), "--ack-random", str(ACK_RANDOM_FACTOR)),
                    *("--start", str(start), "--ramp", str(self.o.ramp), "--end", str(end)),
                    *("--seed", str(s + 1), "--tick", str(TICK)),
                )
            )
        samples = {"cpu0": None, "peak": 0}

        def sample() -> None:
            now = time.monotonic()
            if now >= start and samples["cpu0"] is None:
                samples["cpu0"] = srv.tree_cpu_seconds()
            if now >= start:
                samples["peak"] = max(samples["peak"], srv.tree_rss_kib() or 0)
            time.sleep(min(RSS_SAMPLE, max(start - now, 0.01)))

        results = harness.run_json(cmds, end - time.monotonic() + 10, sample)
        cpu0 = samples["cpu0"] if samples["cpu0"] is not None else srv.tree_cpu_seconds()
        cpu1 = srv.tree_cpu_seconds()
        hwm = srv.tree_hwm_kib()
        peak_sum = samples["peak"]
        if not srv.alive():
            raise RuntimeError(f"server exited during the run: {srv.last_log_line()}")
        return {
            "start": start,
            "ramp_end": start + self.o.ramp,
            "t_end": max(r["t_end"] for r in results),
            "server_cpu": cpu1 - cpu0,
            "peak_rss_sum_kib": peak_sum,
            "hwm_kib": hwm,
            "shard_cpu": [r["cpu"] for r in results],
            "devices": [d for r in results for d in r["devices"]],
            "bins": [sum(c) for c in _zip_longest0([r["bins"] for r in results])],
            "bin": results[0]["bin"],
            "resp_ms": [x for r in results for x in r["resp_ms"]],
        }

    def summarise(self, res: dict) -> dict[str, float]:
        devs = res["devices"]
        t_end = res["t_end"]
        started = [d for d in devs if d["start"] is not None]
        done = [d for d in started if d["done"] is not None]
        completion = []
        for d in started:
            if d["done"] is not None:
                completion.append(d["done"] - d["start"])
            elif d["error"] is None and d["blocks"]:
                completion.append((t_end - d["start"]) * self.blocks / d["blocks"])
            else:
                completion.append(float("inf"))
        first_done = min((d["done"] for d in done), default=t_end)
        w0, w1 = res["ramp_end"], min(t_end, first_done)
        if w1 - w0 < 1.0:  # devices finished during the ramp: use the whole run
            w0, w1 = res["start"], t_end
        bins, width = res["bins"], res["bin"]
        lo, hi = int((w0 - res["start"]) / width), int((w1 - res["start"]) / width)
        rate = sum(bins[lo:hi]) / ((hi - lo) * width) if hi > lo else 0.0
        elapsed = t_end - res["start"]
        total = sum(d["blocks"] for d in devs)
        return {
            "started": len(started),
            "completed": len(done),
            "failed": sum(1 for d in devs if d["error"]),
            "median": percentile(completion, 50) if completion else float("inf"),
            "p99": percentile(completion, 99) if completion else float("inf"),
            "rate": rate,
            "resp_median": percentile(res["resp_ms"], 50) if res["resp_ms"] else float("inf"),
            "retries": sum(d["retries"] for d in devs),
            "restarts": sum(d["restarts"] for d in devs),
            "cpu_pct": res["server_cpu"] / elapsed * 100,
            "cpu_per_block_us": res["server_cpu"] / total * 1e6 if total else float("inf"),
            "rss_mib": res["peak_rss_sum_kib"] / 1024,
            "hwm_mib": max(res["hwm_kib"].values(), default=0) / 1024,
            "gen_cpu_pct": sum(res["shard_cpu"]) / elapsed * 100,
            "gen_max_shard_pct": max(res["shard_cpu"]) / elapsed * 100,
            "shards": len(res["shard_cpu"]),
            "errors": [d["error"] for d in devs if d["error"]],
        }

    def cell_metrics(self, k: int) -> list[tuple[str, Metric]]:
        p = f"K={k} "

        # What K devices would fetch from an instant server: one block per rtt, plus the mean
        # retransmission wait (2 s x 1.25) per lost response.
        unloaded = k / (self.o.rtt + self.o.loss * ACK_TIMEOUT_MEAN)

        def server_bound(w: float, one: float | None) -> bool | None:
            # The target applies only where one worker is the bottleneck; at small K the
            # devices' round trips and losses bound the rate instead.
            if one is None or one >= 0.8 * unloaded:
                return None
            return w >= SPEEDUP * one

        m = self.metric
        return [
            ("started", m(f"k{k}_started", p + "devices started", "", True)),
            ("completed", m(f"k{k}_completed", "  completed within the budget", "", True)),
            ("failed", m(f"k{k}_failed", "  failed (timeout, ETag, content...)", "", False)),
            (
                "median",
                m(
                    f"k{k}_median",
                    "  completion median (projected if unfinished)",
                    "s",
                    False,
                    f"ideal {self.ideal:.1f} s",
                ),
            ),
            ("p99", m(f"k{k}_p99", "  completion p99 (projected if unfinished)", "s", False)),
            (
                "rate",
                m(
                    f"k{k}_rate",
                    "  sustained block rate",
                    "blocks/s",
                    True,
                    f"wN/1 >= {SPEEDUP} if 1 < 80% of {unloaded:,.0f}",
                    server_bound,
                ),
            ),
            ("resp_median", m(f"k{k}_resp", "  server response time, median", "ms", False)),
            ("retries", m(f"k{k}_retries", "  retransmissions (loss + slow answers)", "", False)),
            ("restarts", m(f"k{k}_restarts", "  restarts from block 0 (4.08)", "", False)),
            ("cpu_pct", m(f"k{k}_cpu", "  server CPU (tree)", "% core", False)),
            ("cpu_per_block_us", m(f"k{k}_cpu_blk", "  server CPU per block", "us", False)),
            ("rss_mib", m(f"k{k}_rss", "  server RSS, peak of tree sum", "MiB", False)),
            ("hwm_mib", m(f"k{k}_hwm", "  server VmHWM, largest process", "MiB", False)),
            ("gen_cpu_pct", m(f"k{k}_gen", "  load generator CPU (all shards)", "% core", False)),
        ]

    def fleet(self) -> None:
        for run, (ki, k) in itertools.product(range(self.o.runs), enumerate(self.o.devices)):
            rows = self.cell_metrics(k)
            order = self.sides if (ki + run) % 2 == 0 else self.sides[::-1]
            for name, template in order:
                self.progress(f"K={k} devices against {name} (run {run + 1}/{self.o.runs})")
                srv = self.server(name, template, f"k{k}-{run}")
                summary: dict = {}

                def one(srv=srv, k=k, summary=summary) -> float:
                    if not srv.start():
                        raise RuntimeError(srv.error)
                    summary.update(self.summarise(self.run_devices(srv, k)))
                    return summary["started"]

                try:
                    ok = record(rows[0][1], name, one, float("inf")) is not None
                finally:
                    srv.stop()
                if not ok:
                    for _, metric in rows[1:]:
                        metric.errors[name] = rows[0][1].errors[name]
                    continue
                for key, metric in rows[1:]:
                    metric.samples[name].append(summary[key])
                self.check_cell(name, k, summary)
        self.memory_row()

    def check_cell(self, name: str, k: int, s: dict) -> None:
        if s["errors"]:
            kinds = sorted({e.split(" at ")[0][:60] for e in s["errors"]})
            self.anomalies.append(f"* K={k} ({name}): {len(s['errors'])} failed: {kinds[:3]}")
        if s["gen_max_shard_pct"] > 85:
            self.anomalies.append(
                f"* K={k} ({name}): a load generator shard used {s['gen_max_shard_pct']:.0f}% "
                f"of a core ({s['shards']} shard(s)): the generator may be the bottleneck; "
                "try --devices-per-shard lower"
            )

    def memory_row(self) -> None:
        ks = self.o.devices
        if len(ks) < 2:
            return
        lo, hi = min(ks), max(ks)
        m = self.metric(
            "rss_per_device",
            f"RSS growth per added device, K={lo}->{hi}",
            "KiB",
            False,
            f"each ours < {PER_DEVICE_LIMIT_KIB} KiB (bounded)",
            lambda v, _t: v < PER_DEVICE_LIMIT_KIB,
            cls=AllOurs,
            ratio_of=("ours", self.wside),
        )
        for name in self.names:
            a, b = self.metrics[f"k{lo}_rss"], self.metrics[f"k{hi}_rss"]
            if a.samples[name] and b.samples[name]:
                m.samples[name].append((b.value(name) - a.value(name)) * 1024 / (hi - lo))
            else:
                m.errors[name] = a.errors.get(name) or b.errors.get(name) or "error (no value)"

    # --- small GETs: N workers against one --------------------------------------------------

    def get_rate(self) -> None:
        o = self.o
        paths = [f"small/s{i:03d}.txt" for i in range(SMALL_FILES)]
        total = o.get_window * o.get_shards
        m = self.metric(
            "get_rate",
            f"small GET rate, {total} outstanding ({o.get_shards} loadgen proc.)",
            "req/s",
            True,
            f"wN/1 >= {SPEEDUP}",
            lambda w, one: w >= SPEEDUP * one,
        )
        gen = self.metric("get_gen_cpu", "  load generator CPU per request", "us", False)
        scpu = self.metric("get_server_cpu", "  server CPU per request (tree)", "us", False)
        for run in range(o.get_runs):
            for name, template in self.sides if run % 2 == 0 else self.sides[::-1]:
                self.get_run(name, template, run, paths, (m, gen, scpu))

    def get_run(
        self, name: str, template: str, run: int, paths: list[str], rows: tuple[Metric, ...]
    ) -> None:
        o = self.o
        rate, gen, scpu = rows
        self.progress(f"small GET rate against {name} (run {run + 1}/{o.get_runs})")
        srv = self.server(name, template, f"get{run}")
        res: dict = {}

        def one() -> float:
            if not srv.start():
                raise RuntimeError(srv.error)
            res.update(
                harness.loadgen(
                    srv,
                    paths,
                    o.get_window,
                    0,
                    shards=o.get_shards,
                    seconds=o.get_seconds,
                    sockets=o.get_sockets,
                    max_time=o.get_seconds + 15,
                    tick=TICK,
                )
            )
            return res["rate"]

        try:
            if record(rate, name, one, float("inf")) is not None:
                gen.samples[name].append(res["client_cpu_per_req_us"])
                scpu.samples[name].append(res["server_cpu_per_req_us"])
                if res["lost"] or res["other"]:
                    self.anomalies.append(
                        f"* get_rate ({name}): {res['lost']} lost, {res['other']} non-2.05"
                    )
            else:
                gen.errors[name] = scpu.errors[name] = rate.errors[name]
        finally:
            srv.stop()

    def report(self, elapsed: float) -> tuple[str, str, list[str]]:
        o = self.o
        title = (
            f"Fleet: {'/'.join(map(str, o.devices))} devices x {o.image_kib} KiB image in "
            f"{self.blocks} blocks of {16 << SZX} B, rtt {o.rtt * 1e3:g} ms, loss "
            f"{o.loss * 100:g} %, budget {o.budget:g} s per cell (+{o.ramp:g} s ramp); "
            f"ideal completion {self.ideal:.1f} s; {os.cpu_count()} CPUs; {elapsed:.0f} s total"
        )
        return (
            title,
            harness.table(self.metrics.values(), self.names, "wN/1"),
            harness.notes(self.metrics, self.anomalies),
        )


def _zip_longest0(lists: list[list[int]]):
    n = max((len(x) for x in lists), default=0)
    return ([x[i] if i < len(x) else 0 for x in lists] for i in range(n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--devices",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[100, 500, 2000],
        help="comma-separated sweep of device counts (default 100,500,2000)",
    )
    p.add_argument("--rtt", type=float, default=0.05, help="simulated round-trip time, s")
    p.add_argument("--loss", type=float, default=0.01, help="fraction of responses lost")
    p.add_argument("--image-kib", type=int, default=256)
    p.add_argument(
        "--budget", type=float, default=20.0, help="seconds per cell after the start ramp"
    )
    p.add_argument("--ramp", type=float, default=1.0, help="device starts spread over this")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for ours-wN")
    p.add_argument("--shards", type=int, default=0, help="device processes (0: by K)")
    p.add_argument("--devices-per-shard", type=int, default=4000)
    p.add_argument("--get-window", type=int, default=64, help="outstanding per loadgen process")
    p.add_argument("--get-shards", type=int, default=1, help="loadgen processes for small GETs")
    p.add_argument("--get-sockets", type=int, default=16, help="source ports per loadgen process")
    p.add_argument("--get-seconds", type=float, default=5.0)
    p.add_argument("--get-runs", type=int, default=3, help="small-GET runs per server (median)")
    p.add_argument("--runs", type=int, default=1, help="sweeps of the fleet cells (median)")
    p.add_argument("--no-get", action="store_true", help="skip the small-GET rate row")
    p.add_argument("--ours-cmd", default=OURS_CMD, help="template with {port}, {root}")
    p.add_argument(
        "--workers-cmd",
        default=WORKERS_CMD,
        help="template for ours with N workers ({port}, {root}, {workers})",
    )
    p.add_argument("--theirs-cmd", default=THEIRS_CMD)
    p.add_argument(
        "--servers",
        type=lambda v: v.split(","),
        help="subset of ours,workers,theirs (default: all three)",
    )
    p.add_argument("--quick", action="store_true", help="50,200 devices, 4 s cells: under 1 min")
    p.add_argument("--json", metavar="FILE", help="also write all samples as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary roots and logs")
    p.add_argument("-q", "--quiet", action="store_true")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.devices = [50, 200]
        opts.budget = min(opts.budget, 4.0)
        opts.ramp = min(opts.ramp, 0.5)
        opts.get_seconds = min(opts.get_seconds, 2.0)
        opts.get_runs = 1
    if not opts.devices or min(opts.devices) < 1:
        p.error("--devices needs positive counts")
    return opts


def run(opts: argparse.Namespace) -> tuple[str, str, list[str], dict]:
    """The whole fleet benchmark; returns (title, table, notes, JSON)."""
    workdir = Path(tempfile.mkdtemp(prefix="coapfs-fleet-"))
    t0 = time.monotonic()
    try:
        bench = FleetBench(opts, workdir)
        if not opts.no_get:
            bench.get_rate()
        bench.fleet()
        title, text, note_lines = bench.report(time.monotonic() - t0)
        data = {
            "options": vars(opts),
            "metrics": {k: m.as_json(bench.names) for k, m in bench.metrics.items()},
        }
        return title, text, note_lines, data
    finally:
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    title, text, note_lines, data = run(opts)
    harness.print_report(title, text, note_lines)
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
