"""Directory listings as RFC 6690 link-format, with names percent-encoded (RFC 3986) so that any
file name, commas and angle brackets included, round-trips through a link-format parser."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import quote

from .hidden import is_hidden


def encode_href(segments: Sequence[str], *, directory: bool) -> str:
    """The root-relative URI reference of an entry; each segment fully percent-encoded."""
    path = "/".join(quote(s, safe="") for s in segments)
    return f"/{path}/" if directory else f"/{path}"


def render_listing(
    dir_segments: Sequence[str],
    entries: Iterable[tuple[str, bool]],
) -> bytes:
    """The link-format body for a directory's (name, is_directory) entries, sorted by name."""
    links = []
    for name, is_dir in sorted(entries):
        href = encode_href((*dir_segments, name), directory=is_dir)
        links.append(f"<{href}>;ct=40" if is_dir else f"<{href}>")
    return ",".join(links).encode("ascii")


def read_entries(
    dirfd: int, resolve_link: Callable[[str], os.stat_result | None]
) -> list[tuple[str, bool]]:
    """The servable entries of an open directory: regular files and directories, symlinks only
    where `resolve_link` (which resolves them beneath the root) finds one of those; hidden
    names, names that are not UTF-8 (no Uri-Path can name them) and anything else are left out."""
    result = []
    with os.scandir(dirfd) as it:
        for entry in it:
            name = entry.name
            if is_hidden(name):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue
            try:
                if entry.is_symlink():
                    st = resolve_link(name)
                    if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                        result.append((name, stat.S_ISDIR(st.st_mode)))
                elif entry.is_dir(follow_symlinks=False):
                    result.append((name, True))
                elif entry.is_file(follow_symlinks=False):
                    result.append((name, False))
            except OSError:
                continue
    return result
