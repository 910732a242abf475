"""What every benchmark script shares: the Metric/record/budget pattern, the result table and its
notes, and running bench/loadgen.py (optionally sharded over processes).

A Metric is one table row with a column per side (server); a failed measurement becomes that
side's "error"/"timeout" cell with the reason in the notes, never a crash.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rawclient import CoapError, CoapTimeout
from servers import Server

HERE = Path(__file__).resolve().parent
SIDES = ("ours", "theirs")
MIB = 1 << 20
LOADGEN_MAX_TIME = 20.0  # per load-generator run


@dataclass
class Metric:
    """One table row: samples per side, how to compare them and the issue's target.

    The ratio column and the target compare ratio_of[0] against ratio_of[1].
    """

    label: str
    unit: str
    higher_is_better: bool
    target: str = ""
    # check(first, second) -> True/False; None when no target applies
    check: Callable[[float, float | None], bool] | None = None
    aggregate: Callable[[list[float]], float] = statistics.median
    ratio_of: tuple[str, str] = SIDES
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, str] = field(default_factory=dict)
    not_applicable: set[str] = field(default_factory=set)
    spent: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def value(self, side: str) -> float | None:
        s = self.samples[side]
        return self.aggregate(s) if s else None

    def cell(self, side: str) -> str:
        if side in self.not_applicable:
            return "n/a"
        v = self.value(side)
        if v is None:
            err = self.errors.get(side, "")
            return "timeout" if err.startswith("timeout") else ("error" if err else "-")
        if v == float("inf"):
            return "timeout"
        text = fmt(v)
        if side in self.errors:
            text += "*"
        return text

    def ratio(self) -> float | None:
        o, t = (self.value(s) for s in self.ratio_of)
        if o is None or t is None or t == 0 or float("inf") in (o, t):
            return None
        return o / t

    def verdict(self) -> str:
        if self.check is None:
            return ""
        o = self.value(self.ratio_of[0])
        if o is None:
            return "FAIL"
        try:
            ok = self.check(o, self.value(self.ratio_of[1]))
        except TypeError:  # the other side missing where the target needs it
            return "?"
        return "pass" if ok else "FAIL"

    def as_json(self, sides: Iterable[str]) -> dict:
        return {
            "label": self.label,
            "unit": self.unit,
            "target": self.target,
            "result": self.verdict(),
            "ratio": self.ratio(),
            "ratio_of": list(self.ratio_of),
            **{
                s: {
                    "value": (None if s in self.not_applicable else self.value(s)),
                    "samples": self.samples[s],
                    "error": self.errors.get(s),
                    "not_applicable": s in self.not_applicable,
                }
                for s in sides
            },
        }


def fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def record(metric: Metric, side: str, fn: Callable[[], float], budget: float) -> float | None:
    """Run one measurement; an exception becomes the side's error text, never a crash.

    Once a side has spent its time budget on this metric (and has had one attempt), further
    runs are skipped and counted, so a slow server cannot stretch the benchmark unboundedly.
    """
    if metric.spent[side] >= budget and (metric.samples[side] or side in metric.errors):
        metric.skipped[side] += 1
        return None
    t0 = time.monotonic()
    try:
        v = fn()
    except CoapTimeout as e:
        metric.errors[side] = f"timeout ({e})"
        return None
    except (CoapError, OSError, ValueError, subprocess.SubprocessError, RuntimeError) as e:
        metric.errors[side] = f"error ({e})"
        return None
    finally:
        metric.spent[side] += time.monotonic() - t0
    metric.samples[side].append(v)
    return v


def table(metrics: Iterable[Metric], sides: Iterable[str], ratio_header: str = "ratio o/t") -> str:
    """The metrics as an aligned text table: one column per side, ratio, target, result."""
    sides = list(sides)
    head = ("metric", "unit", *sides, ratio_header, "target", "result")
    rows = [head]
    for m in metrics:
        r = m.ratio()
        rows.append(
            (
                m.label,
                m.unit,
                *(m.cell(s) for s in sides),
                f"{r:.3g}" if r is not None else "",
                m.target,
                m.verdict(),
            )
        )
    left = {0, 1, len(head) - 2}
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j in left else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(metrics: dict[str, Metric], anomalies: Iterable[str] = ()) -> list[str]:
    """Errors, partial failures and skipped runs, one line each."""
    out = list(anomalies)
    for key, m in metrics.items():
        for side, err in m.errors.items():
            if m.samples[side]:
                out.append(f"* {key} ({side}): some runs failed: {err}")
            else:
                out.append(f"- {key} ({side}): {err}")
        for side, n in m.skipped.items():
            if n:
                out.append(f"* {key} ({side}): {n} run(s) skipped, time budget spent")
    return out


def print_report(title: str, text: str, note_lines: list[str]) -> None:
    print(title)
    print(text)
    if note_lines:
        print("\nNotes (- no value; * value from the runs that completed):")
        print("\n".join(note_lines))


class Progress:
    """Progress lines on stderr, stamped with the seconds since the start."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t_start = time.monotonic()

    def __call__(self, what: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.t_start:6.1f} s] {what}", file=sys.stderr, flush=True)


def loadgen(
    server: Server,
    paths: list[str],
    window: int,
    requests: int,
    extra=(),
    *,
    shards: int = 1,
    seconds: float = 0.0,
    sockets: int = 1,
    max_time: float = LOADGEN_MAX_TIME,
) -> dict:
    """Run bench/loadgen.py in `shards` processes at once against one server.

    Each shard keeps `window` requests outstanding (`requests` measured ones, or for `seconds`).
    With several shards the rate is all successes over the union of their measured intervals,
    and the server CPU the tree's CPU over that union.
    """
    cmd = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--port",
        str(server.port),
        "--server-pid",
        str(server.pid),
        "--window",
        str(window),
        "--requests",
        str(requests),
        "--seconds",
        str(seconds),
        "--sockets",
        str(sockets),
        "--max-time",
        str(max_time),
        *extra,
        *paths,
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(shards)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max_time + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err.strip()[-200:]}")
        results.append(json.loads(out))
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
    result = combine(results)
    if not result["ok"]:
        raise RuntimeError(
            f"no successful responses ({result['other']} other, {result['lost']} lost)"
        )
    return result


def combine(results: list[dict]) -> dict:
    """Merge the JSON results of concurrent load-generator shards into one."""
    if len(results) == 1:
        return {**results[0], "shards": 1}
    ok = sum(r["ok"] for r in results)
    elapsed = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    server_cpu = max(r["server_cpu"][1] for r in results) - min(r["server_cpu"][0] for r in results)
    client_cpu = sum(r["client_cpu"] for r in results)
    return {
        "rate": ok / elapsed,
        "ok": ok,
        "other": sum(r["other"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "elapsed": elapsed,
        "timed_out": any(r["timed_out"] for r in results),
        "client_cpu": client_cpu,
        "client_cpu_per_req_us": client_cpu / ok * 1e6 if ok else None,
        "server_cpu_per_req_us": server_cpu / ok * 1e6 if ok else None,
        "latency_median_ms": statistics.median(
            r["latency_median_ms"] for r in results if r["latency_median_ms"] is not None
        ),
        "shards": len(results),
    }
