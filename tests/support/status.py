"""The server's figures as `systemctl status` shows them: its STATUS= line (sd_notify), read
fresh by a reload that changes nothing (SIGHUP ends with READY=1 and the current line)."""

from __future__ import annotations

import re
import signal

from support.server import Server


def current_status(server: Server) -> str:
    """The STATUS= line as of now (the server was started with `notify`, and is ready)."""
    assert server.notify is not None
    server.send(signal.SIGHUP)
    return server.notify.wait_for("READY")["STATUS"]


def figure(status: str, name: str) -> int:
    """The number before `name` in a status line, e.g. figure(s, "observers")."""
    found = re.search(rf"(\d+) {re.escape(name)}\b", status)
    assert found is not None, f"no {name!r} in {status!r}"
    return int(found.group(1))
