"""Who holds a UDP port: read from /proc/net/udp{,6} (the socket's inode) and /proc/*/fd (the
process with that socket open), so that "address already in use" can say by whom. Under the
service's sandbox other processes are invisible, and then nobody is named."""

from __future__ import annotations

import os
from pathlib import Path

_TABLES = (Path("/proc/net/udp"), Path("/proc/net/udp6"))


def _socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in _TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local = fields[1]
            if int(local.rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                inodes.add(fields[9])
    return inodes


def holder(port: int) -> str | None:
    """ "process PID (NAME)" for a process with a UDP socket bound to `port`, if one is visible."""
    inodes = _socket_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) in wanted:
                        return f"process {entry.name} ({_name(entry.name)})"
                except OSError:
                    continue
    return None


def _name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
