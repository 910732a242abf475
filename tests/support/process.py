"""What /proc tells about a server process from outside: its peak memory, the upload spools it
holds open, and how its own mount namespace sees a path."""

from __future__ import annotations

import os
from pathlib import Path

from coapfs.tree.hidden import SPOOL_PREFIX

from .tools import require


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def held_spools(pid: int, root: Path) -> list[str]:
    """The files below `root` the process holds open that no name leads to any more (unnamed
    O_TMPFILE spools, as the kernel names them: "<dir>/#<inode> (deleted)") or that are named
    spools."""
    held = []
    fds = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith(f"{root}/") and (
            target.endswith(" (deleted)") or Path(target).name.startswith(SPOOL_PREFIX)
        ):
            held.append(target)
    return sorted(held)


def seen_by(pid: int, path: Path) -> Path:
    """`path` as the process sees it, through its mount namespace (/proc/PID/root)."""
    return Path(f"/proc/{pid}/root{path}")


def with_own_mount(target: Path | str, fstype: str = "tmpfs", options: str = "") -> list[str]:
    """A wrapper for a server (`wrapper=`): it runs in a user and mount namespace of its own, in
    which a fresh `fstype` is mounted at `target` first — no privilege needed, and nothing
    outside sees the mount (`seen_by` looks through it)."""
    unshare = require("unshare", "util-linux")
    opts = f"-o {options} " if options else ""
    script = f'mount -t {fstype} {opts}coapfs-test "$0" && exec "$@"'
    return [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, str(target)]
