"""What every benchmark script shares: the Metric/record/budget pattern, the result table and its
notes, and running the small-GET load generator (bench/coapload.py; optionally sharded over
processes).

A Metric is one table row with a column per side (server); a failed measurement becomes that
side's "error"/"timeout" cell with the reason in the notes, never a crash.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import coapload
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
    # check(first, second) -> True/False, or None where the target does not apply ("n/a")
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
        return "n/a" if ok is None else ("pass" if ok else "FAIL")

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
    if float(v).is_integer() and abs(v) < 1e15:  # counts
        return f"{int(v):,}"
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


def table(
    metrics: Iterable[Metric], sides: Iterable[str], ratio_header: str | None = "ratio o/t"
) -> str:
    """The metrics as an aligned text table: one column per side, the ratio (unless
    ratio_header is None), target, result."""
    sides = list(sides)
    ratio = [ratio_header] if ratio_header is not None else []
    head = ("metric", "unit", *sides, *ratio, "target", "result")
    rows = [head]
    for m in metrics:
        r = m.ratio()
        rows.append(
            (
                m.label,
                m.unit,
                *(m.cell(s) for s in sides),
                *([f"{r:.3g}" if r is not None else ""] if ratio else []),
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
    """Errors, partial failures and skipped runs, one line each; rows of one side that failed
    for the same reason (a server that did not start) share one line."""
    out = list(anomalies)
    same: dict[tuple[str, str], list[str]] = {}
    for key, m in metrics.items():
        for side, err in m.errors.items():
            if m.samples[side]:
                out.append(f"* {key} ({side}): some runs failed: {err}")
            else:
                same.setdefault((side, err), []).append(key)
    for (side, err), keys in same.items():
        where = keys[0] if len(keys) == 1 else f"{keys[0]} and {len(keys) - 1} more rows"
        out.append(f"- {where} ({side}): {err}")
    for key, m in metrics.items():
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
    tick: float = 0.0,
    while_running: Callable[[], None] | None = None,
) -> dict:
    """Run `coapload gets` in `shards` processes at once against one server.

    Each shard keeps `window` requests outstanding (`requests` measured ones, or for `seconds`).
    With several shards the rate is all successes over the union of their measured intervals,
    and the server CPU the tree's CPU over that union. tick: see bench/coapload.py;
    while_running: see run_json.
    """
    cmd = coapload.command(
        "gets",
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
        "--tick",
        str(tick),
        *extra,
        *paths,
    )
    results = run_json([cmd] * shards, max_time + 30, while_running)
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
    result = combine(results)
    if not result["ok"]:
        raise RuntimeError(
            f"no successful responses ({result['other']} other, {result['lost']} lost)"
        )
    return result


def run_json(
    cmds: list[list[str]], timeout: float, while_running: Callable[[], None] | None = None
) -> list[dict]:
    """Run the commands at once, each printing one JSON object; return those, in order.

    Output goes to temporary files, not pipes, so a large result cannot block its writer.
    while_running is called repeatedly (it should sleep a little) until all have exited or the
    timeout is reached; then stragglers are killed. A failure raises RuntimeError.
    """
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        procs = []
        for cmd in cmds:
            out = stack.enter_context(tempfile.TemporaryFile("w+"))
            err = stack.enter_context(tempfile.TemporaryFile("w+"))
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            stack.callback(_kill, proc)
            procs.append((proc, out, err))
        while time.monotonic() < deadline and any(p.poll() is None for p, _, _ in procs):
            if while_running is not None:
                while_running()
            else:
                time.sleep(0.05)
        results = []
        for proc, out, err in procs:
            _kill(proc)
            out.seek(0)
            err.seek(0)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{Path(cmds[0][1]).name} exited with {proc.returncode}: "
                    f"{err.read().strip()[-300:]}"
                )
            try:
                results.append(json.loads(out.read()))
            except ValueError as e:
                raise RuntimeError(f"{Path(cmds[0][1]).name}: bad output ({e})") from None
        return results


def _kill(proc: subprocess.Popen) -> None:
    """End a helper process this harness started, by its PID, if it still runs."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


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
