"""The checkout under test, and the environment of the child processes the tests start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What systemd hands a service; a test sets these itself where it plays systemd.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: this checkout's coapfs first on PYTHONPATH
    (whatever else is installed), without systemd's service variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env
