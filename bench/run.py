#!/usr/bin/env python3
"""Side-by-side benchmark: coap-fileserver (ours) against aiocoap-fileserver (theirs).

Starts both servers on loopback on equal, freshly created roots, measures each metric in
alternating runs, and prints one table of medians with the ratio ours/theirs and the targets of
issue 3. Every loop is bounded in count and time; only the two servers started here are stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiocoap.meta
import coapmsg
import fleet
import flood
import harness
import proctree
from harness import LOADGEN_MAX_TIME, MIB, SIDES, Metric, loadgen, record
from rawclient import CoapError, CoapTimeout, RawClient
from servers import LISTING_ENTRIES, OURS_CMD, SMALL_FILES, THEIRS_CMD, Server, fill_root

THEIRS_POLL_PERIOD = 10.0  # aiocoap-fileserver's stat polling interval (for spreading samples)


class Bench:
    """Holds the servers, the options and the metrics table."""

    def __init__(self, opts: argparse.Namespace, servers: dict[str, Server], big: dict) -> None:
        self.opts = opts
        self.servers = servers
        self.big_sha = {name: hashlib.sha256(d).hexdigest() for name, d in big.items()}
        self.metrics: dict[str, Metric] = {}
        self.progress = harness.Progress(opts.quiet)
        self.anomalies: list[str] = []

    def fetch_timeout(self, metric: Metric, side: str) -> float:
        """What is left of the side's budget for this metric, within [2, 120] s."""
        return min(max(self.opts.budget - metric.spent[side], 2.0), 120.0)

    def metric(self, key: str, *args, **kwargs) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(*args, **kwargs)
        return self.metrics[key]

    def order(self, run: int) -> list[str]:
        """Alternate which side goes first, so drift does not favour one."""
        live = [s for s in SIDES if self.servers[s].alive()]
        return live if run % 2 == 0 else live[::-1]

    def mark_dead(self) -> None:
        for side in SIDES:
            srv = self.servers[side]
            if not srv.alive():
                for m in self.metrics.values():
                    if not m.samples[side] and side not in m.not_applicable:
                        m.errors.setdefault(side, f"error (server down: {srv.error or 'exited'})")

    # --- measurements -------------------------------------------------------------------

    def get_rates(self) -> None:
        paths = [f"small/s{i:03d}.txt" for i in range(SMALL_FILES)]
        for window in (1, 16, 64):
            self.progress(f"small-file GET rate, {window} outstanding")
            rate = self.metric(
                f"get_rate_w{window}",
                f"small GET rate, {window} outstanding",
                "req/s",
                True,
                "ours/theirs >= 1.3",
                lambda o, t: o >= 1.3 * t,
            )
            ccpu = self.metric(f"get_client_cpu_w{window}", "  client CPU per request", "us", False)
            scpu = self.metric(f"get_server_cpu_w{window}", "  server CPU per request", "us", False)
            for run in range(self.opts.runs):
                for side in self.order(run):
                    res: dict = {}

                    def one(side=side, res=res, window=window) -> float:
                        res.update(loadgen(self.servers[side], paths, window, self.opts.requests))
                        return res["rate"]

                    if record(rate, side, one, self.opts.budget) is not None:
                        if res["lost"] or res["other"] or res["timed_out"]:
                            self.anomalies.append(
                                f"* get_rate_w{window} ({side}): {res['lost']} lost, "
                                f"{res['other']} non-2.05 responses"
                                + (f", stopped after {LOADGEN_MAX_TIME:g} s" * res["timed_out"])
                            )
                        ccpu.samples[side].append(res["client_cpu_per_req_us"])
                        scpu.samples[side].append(res["server_cpu_per_req_us"])

    def etag_rate(self) -> None:
        self.progress("ETag revalidation rate")
        m = self.metric("etag_rate", "ETag revalidation (2.03) rate, 16 outstanding", "req/s", True)
        for run in range(self.opts.runs):
            for side in self.order(run):

                def one(side=side) -> float:
                    c = RawClient(self.servers[side].port)
                    try:
                        etag = c.etag_of("small/s000.txt")
                    finally:
                        c.close()
                    if not etag:
                        raise CoapError("server sent no ETag")
                    res = loadgen(
                        self.servers[side],
                        ["small/s000.txt"],
                        16,
                        self.opts.requests,
                        extra=["--etag", etag.hex()],
                    )
                    return res["rate"]

                record(m, side, one, self.opts.budget)

    def downloads(self) -> None:
        for name, data_mib in (("big1.bin", 1), ("big16.bin", 16)):
            if name not in self.big_sha:
                continue
            self.progress(f"block-wise download of {data_mib} MiB")
            m = self.metric(
                f"download_{data_mib}mib", f"download {data_mib} MiB (szx 6)", "s", False
            )
            runs = self.opts.runs if data_mib == 1 else min(self.opts.runs, self.opts.big_runs)
            for run in range(runs):
                for side in self.order(run):

                    def one(side=side, name=name) -> float:
                        c = RawClient(self.servers[side].port)
                        try:
                            f = c.fetch(name, timeout=self.opts.download_timeout)
                        finally:
                            c.close()
                        if f.sha256 != self.big_sha[name]:
                            raise CoapError(f"sha256 mismatch ({len(f.body)} bytes)")
                        return f.seconds

                    record(m, side, one, self.opts.budget)

    def listings(self) -> None:
        self.progress(f"{LISTING_ENTRIES}-entry listing, first and repeated fetch")
        first = self.metric(
            "listing_first", f"{LISTING_ENTRIES}-entry listing, first fetch", "s", False
        )
        repeat = self.metric(
            "listing_repeat",
            f"{LISTING_ENTRIES}-entry listing, repeat fetch",
            "s",
            False,
            "ours/theirs <= 0.5",
            lambda o, t: o <= 0.5 * t,
        )
        restarts = self.metric(
            "listing_restarts", "  block restarts (4.08/ETag change)", "", False, aggregate=sum
        )
        for run in range(self.opts.runs):
            for side in self.order(run):
                path = f"list{run}/"
                c = RawClient(self.servers[side].port)
                try:
                    for m, n in ((first, 1), (repeat, self.opts.listing_repeats)):
                        for _ in range(n):

                            def one(c=c, path=path, side=side, m=m) -> float:
                                f = c.fetch(path, timeout=self.fetch_timeout(m, side))
                                entries = f.body.count(b"<")
                                if entries != LISTING_ENTRIES:
                                    raise CoapError(f"{entries} entries, not {LISTING_ENTRIES}")
                                restarts.samples[side].append(f.restarts)
                                return f.seconds

                            if record(m, side, one, self.opts.budget) is None:
                                break
                finally:
                    c.close()

    def notification_latency(self) -> None:
        o = self.opts
        for kind, path in (("file", "obs/watched.txt"), ("dir", "obs/dir/")):
            self.progress(f"change->notification latency, {kind}")
            med = self.metric(
                f"notify_{kind}_median",
                f"{kind} change->notification, median",
                "ms",
                False,
                "ours <= 20 ms",
                lambda v, _t: v <= 20,
            )
            mx = self.metric(
                f"notify_{kind}_max",
                f"{kind} change->notification, max",
                "ms",
                False,
                "ours <= 100 ms",
                lambda v, _t: v <= 100,
                aggregate=max,
            )
            for side in SIDES:
                if kind == "dir" and side == "theirs":
                    # aiocoap-fileserver never notifies directory observers.
                    med.not_applicable.add(side)
                    mx.not_applicable.add(side)
                    continue
                if not self.servers[side].alive():
                    continue
                if side == "ours":
                    count, timeout = o.notify_samples, o.notify_timeout
                    pauses = [o.notify_pause] * count
                else:
                    count, timeout = o.theirs_latency_samples, o.theirs_latency_timeout
                    # Spread the writes over the poll cycle so the samples are not all ~10 s.
                    pauses = [THEIRS_POLL_PERIOD * (k + 0.5) / count for k in range(count)]
                try:
                    lat = self.observe_latency(side, kind, path, pauses, timeout)
                except (CoapError, CoapTimeout, OSError) as e:
                    med.errors[side] = mx.errors[side] = f"error ({e})"
                    continue
                med.samples[side].extend(lat)
                mx.samples[side].extend(lat)

    def observe_latency(
        self, side: str, kind: str, path: str, pauses: list[float], timeout: float
    ) -> list[float]:
        """Observe path, change it len(pauses) times, return latencies in ms (inf = timeout)."""
        srv = self.servers[side]
        c = RawClient(srv.port)
        latencies: list[float] = []
        try:
            token, first = c.observe(path)
            if first.code != coapmsg.CONTENT:
                raise CoapError(f"observe: {coapmsg.code_str(first.code)} {first.payload[:60]!r}")
            if first.opt(coapmsg.OPT_OBSERVE) is None:
                raise CoapError("observation not accepted (no Observe option)")
            for k, pause in enumerate(pauses):
                # Drain stragglers from the previous change, then pause.
                end = time.perf_counter() + pause
                while c.wait_notification(token, end) is not None:
                    pass
                marker = f"{side}-{kind}-{k}-{time.time_ns()}"
                t0 = time.perf_counter()
                if kind == "file":
                    with open(srv.root / path, "w") as f:
                        f.write(marker + "\n")
                    expect = marker.encode()
                else:
                    name = f"n{k:03d}.txt"
                    os.close(os.open(srv.root / path / name, os.O_CREAT | os.O_WRONLY, 0o644))
                    expect = name.encode()
                deadline = t0 + timeout
                while True:
                    got = c.wait_notification(token, deadline)
                    if got is None:
                        latencies.append(float("inf"))
                        break
                    t1, msg = got
                    if msg.code != coapmsg.CONTENT:
                        raise CoapError(f"notification {coapmsg.code_str(msg.code)}")
                    # The first block is enough for a small resource; wait for current content.
                    if expect in msg.payload:
                        latencies.append((t1 - t0) * 1e3)
                        break
            c.cancel_observation(path, token)
        finally:
            c.close()
        return latencies

    def uploads(self, workdir: Path) -> None:
        """Block-wise PUT (Block1 szx 6) to write-enabled servers of their own, on empty roots.

        RSS growth is VmHWM after the upload minus VmRSS before it, summed over the process
        tree, with VmHWM reset to the current RSS first (clear_refs), so earlier peaks do not
        count. The file on disk must have the uploaded sha256.
        """
        sizes = [1] + ([64] if self.opts.upload_64 else [])
        writers = {}
        for side in SIDES:
            root = workdir / f"{side}-write"
            root.mkdir()
            cmd = getattr(self.opts, f"{side}_cmd") + " --write"
            writers[side] = Server(f"{side}-write", cmd, root, workdir)
        try:
            for side in SIDES:
                writers[side].start()
            for mib in sizes:
                self.progress(f"block-wise upload of {mib} MiB")
                data = random.Random(mib).randbytes(mib * MIB)
                sha = hashlib.sha256(data).hexdigest()
                t = self.metric(f"upload_{mib}mib", f"upload {mib} MiB (Block1 szx 6)", "s", False)
                g = self.metric(
                    f"upload_{mib}mib_rss",
                    "  RSS growth (VmHWM after - VmRSS before)",
                    "MiB",
                    False,
                )
                # 64 MiB is one long run: its own time limit rather than the per-metric budget.
                limit = self.opts.upload_timeout if mib > 1 else None
                runs = self.opts.runs if mib == 1 else 1
                for run in range(runs):
                    for side in self.order(run):
                        srv = writers[side]
                        grew: list[float] = []

                        def one(
                            srv=srv,
                            side=side,
                            name=f"up{mib}-{run}.bin",
                            data=data,
                            sha=sha,
                            t=t,
                            limit=limit,
                            grew=grew,
                        ) -> float:
                            if not srv.alive():
                                raise CoapError(f"server not running: {srv.error}")
                            proctree.reset_peak_rss(srv.pid)
                            before = srv.tree_rss_kib() or 0
                            c = RawClient(srv.port)
                            try:
                                seconds = c.put(
                                    name, data, timeout=limit or self.fetch_timeout(t, side)
                                )
                            finally:
                                c.close()
                            grew.append((sum(srv.tree_hwm_kib().values()) - before) / 1024)
                            on_disk = hashlib.sha256((srv.root / name).read_bytes()).hexdigest()
                            if on_disk != sha:
                                raise CoapError(f"sha256 of {name} on disk does not match")
                            (srv.root / name).unlink()
                            return seconds

                        if record(t, side, one, self.opts.budget) is not None:
                            g.samples[side].extend(grew)
                        elif side in t.errors:
                            g.errors.setdefault(side, t.errors[side])
        finally:
            for srv in writers.values():
                srv.stop()

    def startup_rss(self) -> None:
        """Resident memory right after start-up, before any request: the baseline."""
        m = self.metric("start_rss", "RSS after start-up (VmRSS)", "MiB", False)
        for side in SIDES:
            kib = self.servers[side].rss_kib()
            if kib is None:
                m.errors[side] = f"error (server not running: {self.servers[side].error})"
            else:
                m.samples[side].append(kib / 1024)

    def peak_rss(self) -> None:
        budget = self.opts.cache_budget_mib
        m = self.metric(
            "peak_rss",
            "peak RSS (VmHWM)",
            "MiB",
            False,
            f"ours <= theirs + {budget:g} MiB",
            lambda o, t: o <= t + budget,
        )
        for side in SIDES:
            kib = self.servers[side].peak_rss_kib()
            if kib is None:
                m.errors[side] = "error (server not running)"
            else:
                m.samples[side].append(kib / 1024)

    # --- output -------------------------------------------------------------------------

    def table(self) -> str:
        return harness.table(self.metrics.values(), SIDES)

    def notes(self) -> list[str]:
        return harness.notes(self.metrics, self.anomalies)

    def as_json(self) -> dict:
        return {
            "options": vars(self.opts),
            "environment": {
                "python": platform.python_version(),
                "aiocoap": aiocoap.meta.version,
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
            },
            "servers": {
                s: {"cmd": self.servers[s].cmd, "error": self.servers[s].error} for s in SIDES
            },
            "metrics": {k: m.as_json(SIDES) for k, m in self.metrics.items()},
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="runs per metric, median reported")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 run, short windows, no 16 MiB file, 1 sample of theirs' "
        "notification latency (well under a minute)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="measured requests per GET-rate run (equal for both servers)",
    )
    p.add_argument("--big-runs", type=int, default=3, help="runs of the 16 MiB download")
    p.add_argument("--download-timeout", type=float, default=120.0)
    p.add_argument(
        "--listing-repeats",
        type=int,
        default=3,
        help="repeated listing fetches per run (each one a sample)",
    )
    p.add_argument("--notify-samples", type=int, default=20, help="changes observed on ours")
    p.add_argument(
        "--notify-timeout",
        type=float,
        default=2.0,
        help="seconds ours may take to notify before the sample is a timeout",
    )
    p.add_argument("--notify-pause", type=float, default=0.1, help="seconds between changes")
    p.add_argument(
        "--theirs-latency-samples",
        type=int,
        default=3,
        help="changes observed on aiocoap-fileserver (it polls every 10 s)",
    )
    p.add_argument("--theirs-latency-timeout", type=float, default=12.0)
    p.add_argument(
        "--cache-budget-mib",
        type=float,
        default=64.0,
        help="ours' cache byte budget: allowed RSS above theirs",
    )
    p.add_argument(
        "--ours-cmd",
        default=OURS_CMD,
        help="command template for ours ({port}, {root}); e.g. point it at "
        "aiocoap-fileserver to test the harness",
    )
    p.add_argument("--theirs-cmd", default=THEIRS_CMD)
    p.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="seconds per metric and server after which further runs are skipped",
    )
    p.add_argument(
        "--upload-64",
        action="store_true",
        help="also upload 64 MiB (one run; aiocoap-fileserver assembles it in memory)",
    )
    p.add_argument(
        "--upload-timeout", type=float, default=60.0, help="seconds for the 64 MiB upload"
    )
    p.add_argument(
        "--fleet",
        action="store_true",
        help="also run bench/fleet.py (about 4 minutes; under 1 with --quick)",
    )
    p.add_argument(
        "--flood",
        action="store_true",
        help="also run bench/flood.py (about 3 minutes; 35 s with --quick)",
    )
    p.add_argument("--json", metavar="FILE", help="also write all samples as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary roots and logs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.runs = 1
        opts.requests = 600
        opts.big_runs = 0
        opts.listing_repeats = 1
        opts.notify_samples = 5
        opts.budget = min(opts.budget, 5.0)
        opts.theirs_latency_samples = 1
    if opts.runs < 1:
        p.error("--runs must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="coapfs-bench-"))
    rng = random.Random(7)
    big = {"big1.bin": rng.randbytes(MIB)}
    if opts.big_runs > 0:
        big["big16.bin"] = rng.randbytes(16 * MIB)
    servers: dict[str, Server] = {}
    t0 = time.monotonic()
    try:
        for side, cmd in (("ours", opts.ours_cmd), ("theirs", opts.theirs_cmd)):
            root = workdir / side
            fill_root(root, listings=opts.runs, big=big)
            servers[side] = Server(side, cmd, root, workdir)
        bench = Bench(opts, servers, big)
        bench.progress(f"roots ready in {workdir}")
        for side in SIDES:
            if not servers[side].start():
                print(f"{side} did not start: {servers[side].error}", file=sys.stderr)
        for step in (
            bench.startup_rss,
            bench.get_rates,
            bench.etag_rate,
            bench.downloads,
            bench.listings,
            bench.notification_latency,
            bench.peak_rss,
            lambda: bench.uploads(workdir),
        ):
            step()
            bench.mark_dead()
        harness.print_report(
            f"coap-fileserver (ours) vs aiocoap-fileserver (theirs): medians of {opts.runs} "
            f"run(s), {time.monotonic() - t0:.0f} s total",
            bench.table(),
            bench.notes(),
        )
        for srv in servers.values():
            srv.stop()  # the optional sections start servers of their own
        extra_json = {}
        for wanted, module in ((opts.fleet, fleet), (opts.flood, flood)):
            if not wanted:
                continue
            sub = module.parse_args(
                ["--ours-cmd", opts.ours_cmd, "--theirs-cmd", opts.theirs_cmd]
                + ["--quick"] * opts.quick
                + ["--quiet"] * opts.quiet
            )
            title, text, note_lines, data = module.run(sub)
            print()
            harness.print_report(title, text, note_lines)
            extra_json[module.__name__] = data
        if opts.json:
            Path(opts.json).write_text(json.dumps(bench.as_json() | extra_json, indent=2) + "\n")
    finally:
        for srv in servers.values():
            srv.stop()
        if opts.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
