"""Logging to stderr, in the journal's own format when stderr is the journal.

systemd sets JOURNAL_STREAM=<st_dev>:<st_ino> for a service whose stderr goes to the
journal; then timestamps would be duplicated, and a `<N>` syslog priority prefix per line
lets `journalctl -p err` filter. Anywhere else: timestamped lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

#: The program's own logger; modules log to children of it (`coapfs.supervisor`, ...).
LOGGER = "coapfs"

# syslog priorities (sd-daemon.h SD_ERR etc.)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def stderr_is_journal(stream: TextIO = sys.stderr) -> bool:
    """True when JOURNAL_STREAM names the file stderr is connected to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):
        return False


class JournalFormatter(logging.Formatter):
    """`<3>coapfs.supervisor: message` -- the journal adds time, host and unit itself."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = _PRIORITY.get(record.levelno)
        if priority is None:  # custom levels: the nearest standard one at or above
            priority = min((p for lv, p in _PRIORITY.items() if lv >= record.levelno), default=2)
        # The journal splits on newlines; a traceback must stay one entry with one priority.
        return f"<{priority}>" + text.replace("\n", "\n ")


def setup(verbosity: int, stream: TextIO | None = None) -> None:
    """Install the stderr handler (once) and set the levels for `verbosity`."""
    stream = stream if stream is not None else sys.stderr
    root = logging.getLogger()
    if not any(getattr(h, "coapfs", False) for h in root.handlers):
        handler = logging.StreamHandler(stream)
        handler.coapfs = True  # type: ignore[attr-defined]
        if stderr_is_journal(stream):
            handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
        root.addHandler(handler)
    set_verbosity(verbosity)


def set_verbosity(verbosity: int) -> None:
    """As aiocoap-fileserver: 0 warnings, 1 our info, 2 our debug + aiocoap info, 3 all debug.

    Called again on reload, so every level is set explicitly.
    """
    ours = logging.getLogger(LOGGER)
    root = logging.getLogger()
    if verbosity <= 0:
        root.setLevel(logging.WARNING)
        ours.setLevel(logging.NOTSET)
    elif verbosity == 1:
        root.setLevel(logging.WARNING)
        ours.setLevel(logging.INFO)
    elif verbosity == 2:
        root.setLevel(logging.INFO)
        ours.setLevel(logging.DEBUG)
    else:
        root.setLevel(logging.DEBUG)
        ours.setLevel(logging.NOTSET)
