"""Request paths: the Uri-Path options checked into segments beneath the root, and whether a
directory was named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .problems import BadPath

Key = tuple[str, ...]  # a path beneath the root, one name per segment; () is the root

#: The deepest path served: more segments are refused before any work is done for them (every
#: ancestor of a path is looked at, so a path's cost grows with its depth).
MAX_SEGMENTS = 64
#: A segment's longest name in bytes (Linux NAME_MAX).
MAX_NAME = 255


class Target(NamedTuple):
    """A validated request path: its segments below the root, and whether it named a directory
    (trailing slash, or the root itself)."""

    segments: Key
    is_dir_request: bool


def parse_uri_path(uri_path: Sequence[str]) -> Target:
    """Validate the Uri-Path options; raise BadPath for anything that is not a plain name."""
    segments = tuple(uri_path)
    is_dir = not segments or segments[-1] == ""
    if segments and segments[-1] == "":
        segments = segments[:-1]
    if len(segments) > MAX_SEGMENTS:
        raise BadPath(f"Path too deep: more than {MAX_SEGMENTS} segments")
    for s in segments:
        if s == "":
            raise BadPath("Empty path segment (double slash)")
        if s in (".", ".."):
            raise BadPath("Path segments '.' and '..' are not allowed")
        if "/" in s or "\0" in s:
            raise BadPath("Path segment contains '/' or NUL")
        if not s.isascii():
            try:
                encoded = s.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes kept as surrogates (surrogateescape)
                raise BadPath("Path segment is not valid UTF-8") from None
            if len(encoded) > MAX_NAME:
                raise BadPath(f"Name too long: more than {MAX_NAME} bytes")
        elif len(s) > MAX_NAME:
            raise BadPath(f"Name too long: more than {MAX_NAME} bytes")
    return Target(segments, is_dir)


def directories_of(key: Key, *, is_dir: bool) -> list[Key]:
    """Every directory whose change can affect `key`: its ancestors, and itself if a directory."""
    dirs = [key[:i] for i in range(len(key))]
    if is_dir:
        dirs.append(key)
    return dirs
