"""A real cgroup with a CPU quota, for a test's process to run in (root only): cgroup v2's
cpu.max where the unified hierarchy has the cpu controller, else v1's cpu hierarchy."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .tools import missing

PERIOD_US = 100_000


def _v2_parent() -> Path | None:
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        controllers = candidate / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return candidate
    return None


@contextlib.contextmanager
def cpu_limited(cpus: float) -> Iterator[Path]:
    """A new cgroup allowing `cpus` CPUs' worth of time; yields its cgroup.procs (write a PID
    there to move that process in). Removed afterwards, once its processes have left."""
    if os.geteuid() != 0:
        missing("a cgroup of the test's own needs root")
    parent = _v2_parent()
    if parent is not None:
        with contextlib.suppress(OSError):  # the controller for children; may already be on
            (parent / "cgroup.subtree_control").write_text("+cpu")
    else:
        parent = Path("/sys/fs/cgroup/cpu")
        if not (parent / "cpu.cfs_quota_us").exists():
            missing("neither cgroup v2 with the cpu controller nor v1's cpu hierarchy is mounted")
    group = parent / f"coapfs-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        quota = int(cpus * PERIOD_US)
        if (group / "cpu.max").exists():
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        yield group / "cgroup.procs"
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # processes still leaving
