"""Names that are neither listed, served nor written: dot files and dot directories, and the
spool files of uploads in progress."""

from __future__ import annotations

from collections.abc import Sequence

from .path import Key
from .problems import NotFound

#: Prefix of the files an upload is spooled to where the file system has no unnamed files.
SPOOL_PREFIX = ".coapfs-upload-"
#: Prefix a deleted directory is renamed to while its contents are removed.
TRASH_PREFIX = ".coapfs-delete-"


def is_hidden(name: str) -> bool:
    """Dot files (upload spools among them) are hidden."""
    return name.startswith(".")


def check_visible(segments: Sequence[str] | Key) -> None:
    """Hidden names anywhere in the path are NotFound, as if they did not exist."""
    for s in segments:
        if s.startswith("."):
            raise NotFound()
