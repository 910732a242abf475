"""CPU time and memory of a server's whole process tree, read from /proc.

A server may run worker processes (``--workers N``) or threads; everything here is summed over
the process and all its descendants, found through /proc/PID/task/*/children. Only reading.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """The process and its descendants (those alive now), parent first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def proc_cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """utime + stime of one process from /proc/PID/stat, in seconds (0 if it is gone).

    With reaped_children, cutime + cstime are added: the time of children that exited and were
    waited for, so a tree sum does not drop when a worker ends.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by the process tree (threads included, reaped children too)."""
    return sum(proc_cpu_seconds(p, reaped_children=True) for p in tree_pids(pid))


def status_kib(pid: int, key: str) -> int | None:
    """A kB value (VmHWM, VmRSS) from /proc/PID/status; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_kib(pid: int, key: str) -> dict[int, int]:
    """status_kib for every process of the tree that has the value."""
    values = {p: status_kib(p, key) for p in tree_pids(pid)}
    return {p: v for p, v in values.items() if v is not None}


def tree_rss_kib(pid: int) -> int | None:
    """Resident memory of the whole tree (VmRSS summed), None if the root is gone."""
    values = tree_kib(pid, "VmRSS")
    return sum(values.values()) if pid in values else None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of every process in the tree to its current RSS (Linux >= 4.0, clear_refs 5)."""
    ok = True
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok
