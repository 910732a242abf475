"""How many CPUs this process may use: what `workers = "auto"` means.

The CPUs it may run on (its affinity: taskset, systemd's CPUAffinity= and AllowedCPUs=), and no
more than its cgroup's CPU quota allows (systemd's CPUQuota=, a container's --cpus), rounded up:
with a quota of 1.5 CPUs two workers can use all of it, one could not. The quota is the smallest
on the way from the process's cgroup up to the root of the hierarchy, as the kernel applies it;
cgroup v2 (cpu.max) and v1 (cpu.cfs_quota_us, cpu.cfs_period_us) are both read. Whatever cannot
be read counts as no limit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    count = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cpu_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
) -> float | None:
    """The CPUs' worth of time the cgroup hierarchy allows this process (None: no limit)."""
    try:
        groups = proc_cgroup.read_text().splitlines()
        mounts = mountinfo.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in groups:
        if line.count(":") < 2:
            continue
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:
            version = 2
        elif "cpu" in controllers.split(","):
            version = 1
        else:
            continue
        for directory in _directories(mounts, version, path):
            limit = _limit(directory, version)
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)


def _directories(mounts: list[str], version: int, path: str) -> list[Path]:
    """The cgroup's directory and its ancestors' in each mount of that hierarchy."""
    found = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
        if version == 2 and fstype != "cgroup2":
            continue
        if version == 1 and (fstype != "cgroup" or "cpu" not in options.split(",")):
            continue
        mount_root, mount_point = fields[3], Path(fields[4])
        if ".." in mount_root.split("/"):
            continue  # mounted outside this process's cgroup namespace: not its hierarchy
        relative = os.path.relpath(path, mount_root)
        if relative.startswith(".."):
            continue  # the cgroup lies outside what this mount shows (another namespace's)
        here = mount_point / relative if relative != "." else mount_point
        while True:
            found.append(here)
            if here == mount_point:
                break
            here = here.parent
    return found


def _limit(directory: Path, version: int) -> float | None:
    try:
        if version == 2:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota == "max" or int(period) <= 0:
                return None
            return int(quota) / int(period)
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us < 0 or period_us <= 0 else quota_us / period_us
