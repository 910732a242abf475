"""Who holds a UDP port: read from the socket tables (/proc/self/net/udp{,6}: the socket's
inode and owner) and /proc/*/fd (the process with that socket open), so that "address already
in use" can say by whom.

The tables are read through /proc/self/net, not the /proc/net symlink, which the unit's
ProcSubset=pid hides. Under the unit's ProtectProc=invisible only processes of the service's
own user can be seen; for any other holder the table still tells its owner, and that is named.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

_TABLES = (Path("/proc/self/net/udp"), Path("/proc/self/net/udp6"))
#: What a user namespace shows for an owner it does not map (PrivateUsers=): no one to name.
_OVERFLOW_UID = 65534


def _sockets(port: int) -> dict[str, int]:
    """Inode -> owner uid of every UDP socket bound to `port`."""
    found = {}
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
                found[fields[9]] = int(fields[7])
    return found


def holder(port: int) -> str | None:
    """ "process PID (NAME)" for a process with a UDP socket bound to `port`, if one is visible;
    else "a process of user NAME, not visible here; ..." if only the socket's owner is known."""
    sockets = _sockets(port)
    if not sockets:
        return None
    wanted = {f"socket:[{inode}]" for inode in sockets}
    me = str(os.getpid())
    wanted -= _open_sockets(me)  # our own sockets on that port are not in the way
    if not wanted:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == me:
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
    others = {uid for inode, uid in sockets.items() if f"socket:[{inode}]" in wanted}
    owners = sorted(others - {_OVERFLOW_UID})
    if len(owners) != 1:
        return None
    return f"a process of user {_user(owners[0])}, not visible here; ss -ulpn names it"


def _open_sockets(pid: str) -> set[str]:
    links = set()
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                try:
                    links.add(os.readlink(fd.path))
                except OSError:
                    continue
    except OSError:
        pass
    return links


def _name(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
