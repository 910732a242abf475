"""Logging for the journal, and for a terminal or file everywhere else.

systemd sets JOURNAL_STREAM=<st_dev>:<st_ino> for a service whose stderr goes to the journal.
Then records are sent to the journal directly, over its native protocol (a datagram of
KEY=value fields to /run/systemd/journal/socket, as sd_journal_send(3) does): each carries its
PRIORITY, so `journalctl -p err` filters, and a record may carry fields of its own (the access
log's REMOTE, METHOD, PATH, ...; `extra={"journal_fields": {...}}`), so `journalctl
CODE=4.03` finds them. Should that socket be unreachable, lines go to stderr with a `<N>`
priority prefix, which the journal's stream reader understands. Anywhere else: timestamped
lines on stderr.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ..protocol.accesslog import FIELDS

#: The program's own logger; modules log to children of it (`coapfs.daemon.supervisor`, ...).
LOGGER = "coapfs"
#: Loggers whose info records are the point (the access log, the log of changes made over CoAP):
#: kept whatever the verbosity.
RECORD_LOGGERS = ("coapfs.access", "coapfs.changes")
#: Where journald takes native-protocol datagrams.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "coap-fileserver"

# syslog priorities (sd-daemon.h SD_ERR etc.)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_FORMAT = "%(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels: the nearest standard one above)."""
    known = _PRIORITY.get(levelno)
    if known is not None:
        return known
    return min((p for lv, p in _PRIORITY.items() if lv >= levelno), default=2)


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
    """`<3>coapfs.daemon.supervisor: message` -- the journal adds time, host and unit itself."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # The journal splits on newlines; a traceback must stay one entry with one priority.
        return f"<{priority(record.levelno)}>" + text.replace("\n", "\n ")


def encode_fields(fields: Mapping[str, Any]) -> bytes:
    """The journal's native datagram: `KEY=value\\n`, or for a value holding a newline
    `KEY\\n<64-bit little-endian length><value>\\n`."""
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


def journal_key(name: str) -> str:
    """A journal field name: upper-case letters, digits and underscores, not leading with one."""
    key = "".join(c if c.isalnum() else "_" for c in name.upper()).lstrip("_")
    return key or "FIELD"


class JournalHandler(logging.Handler):
    """Sends each record to journald as one entry with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER,
    LOGGER, CODE_FILE/CODE_LINE/CODE_FUNC, and the record's own fields. Raises OSError when
    the socket cannot be reached (the caller then logs to stderr)."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self._identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.connect(path)
        except OSError:
            self._socket.close()
            raise
        self.setFormatter(logging.Formatter(_FORMAT))

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        message = self.format(record)
        fields: dict[str, Any] = {
            "MESSAGE": message,
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self._identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            fields[journal_key(key)] = value
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode_fields(self.fields(record))
            try:
                self._socket.send(datagram)
            except OSError:
                # Too large for one datagram (EMSGSIZE) or the journal restarting: keep the
                # message, drop the traceback's tail.
                self._socket.send(datagram[:60_000])
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._socket.close()
        super().close()


def _stderr_handler(stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter(_FORMAT))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + _FORMAT))
    return handler


def _unraisable(report: Any) -> None:
    """An exception Python can only ignore (in a `__del__`, e.g. aiocoap's security context
    finalizer after a credentials file failed to load, which the configuration error already
    reported): one debug line, not a traceback on stderr."""
    logging.getLogger(LOGGER).debug(
        "Ignored in %r: %s", report.object, report.exc_value, exc_info=report.exc_value
    )


def setup(verbosity: int, stream: TextIO | None = None) -> None:
    """Install the handler (once) and set the levels for `verbosity`."""
    sys.unraisablehook = _unraisable
    stream = stream if stream is not None else sys.stderr
    root = logging.getLogger()
    if not any(getattr(h, "coapfs", False) for h in root.handlers):
        handler: logging.Handler | None = None
        if stderr_is_journal(stream):
            try:
                handler = JournalHandler()
            except OSError:
                handler = None
        if handler is None:
            handler = _stderr_handler(stream)
        handler.coapfs = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    set_verbosity(verbosity)


def fatal_line(message: str, stream: TextIO = sys.stderr) -> str:
    """The one line a failed start prints: at err priority where stderr is the journal."""
    return f"<{priority(logging.ERROR)}>{message}" if stderr_is_journal(stream) else message


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
    for name in RECORD_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 3 else logging.INFO)
