"""Telling the service manager how we are: sd_notify(3) messages over NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not under systemd) every call is a no-op, so the supervisor need
not care whether it runs under systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import sdnotify

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it next to RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    WATCHDOG_PID, when set, names the process meant; a child that merely inherited the
    environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("Ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


class ServiceManager:
    """What the supervisor tells systemd (sd_notify states); each method is one state change."""

    def __init__(self) -> None:
        # The socket is connected here: create it after any daemon fork.
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._systemd = sdnotify.SystemdNotifier() if self.enabled else None
        self._status: str | None = None

    def _send(self, state: str) -> None:
        if self._systemd is not None:
            self._systemd.notify(state)

    def ready(self, status: str | None = None) -> None:
        """Start-up or reload complete: every socket bound, the root open."""
        if status is not None:
            self._status = status
            self._send(f"READY=1\nSTATUS={status}")
        else:
            self._send("READY=1")

    def reloading(self) -> None:
        """Type=notify-reload: the timestamp lets systemd match the READY=1 that ends it."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """One human line for `systemctl status`; sent only when it changed."""
        text = text.replace("\n", " ")
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    async def keep_watchdog_fed(self, interval: float) -> None:
        """Ping from the event loop itself: a stalled loop stops the pings, and systemd acts."""
        while True:
            self.watchdog()
            await asyncio.sleep(interval)
