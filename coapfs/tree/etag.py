"""Entity tags derived from stat, not content: cheap, and new whenever the file is replaced or
modified (inode, size, mtime and ctime all feed in; `watch.signature` says which parts)."""

from __future__ import annotations

import hashlib
import os

from ..watch.signature import stat_signature


def stat_digest(st: os.stat_result) -> bytes:
    """The longest ETag (8 bytes) for a file or directory state; shorter ones are its prefixes."""
    state = ":".join(map(str, stat_signature(st)))
    return hashlib.blake2b(state.encode("ascii"), digest_size=8).digest()


def derived_digest(digest: bytes, variant: bytes) -> bytes:
    """The digest of one variant of a representation (a listing with some entries left out):
    different from the full one's and from every other variant's."""
    return hashlib.blake2b(digest + b"\0" + variant, digest_size=8).digest()


def etag_from_digest(digest: bytes, length: int) -> bytes | None:
    """The ETag of the configured length; None when ETags are disabled (length 0)."""
    return digest[:length] if length else None


def etag_from_stat(st: os.stat_result, length: int) -> bytes | None:
    return etag_from_digest(stat_digest(st), length)
