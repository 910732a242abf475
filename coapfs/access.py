"""What may be seen and changed: hidden names, our own temporary files, write permission.

Kept apart from path resolution (which only guarantees "beneath the root") so that finer rules
(per-path access lists) can grow here without touching the protocol code."""

from __future__ import annotations

from collections.abc import Sequence

from . import errors

#: Prefix of the temporary files an upload is spooled to; never listed or served.
TEMP_PREFIX = ".coapfs-upload-"


def is_hidden(name: str, *, show_hidden: bool = False) -> bool:
    """Dot files are hidden unless configured otherwise; upload spools always are."""
    if name.startswith(TEMP_PREFIX):
        return True
    return name.startswith(".") and not show_hidden


def check_visible(segments: Sequence[str], *, show_hidden: bool = False) -> None:
    """Hidden names anywhere in the path answer 4.04, as if they did not exist."""
    for s in segments:
        if is_hidden(s, show_hidden=show_hidden):
            raise errors.NotFound()


def check_writable(write: bool) -> None:
    """PUT and DELETE on a read-only server answer 4.05."""
    if not write:
        raise errors.ReadOnly()
