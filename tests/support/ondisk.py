"""What is on disk below a directory, hidden names included, to compare before and after a
request: a refused or interrupted write must leave it exactly as it was."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(top: Path) -> dict[str, bytes | int | None]:
    """Every entry below `top` by relative path: a file's content, a directory's None, anything
    else its mode. Hidden files (spools, renamed-away directories) are entries like any other."""
    out: dict[str, bytes | int | None] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(directory, name)
            relative = str(path.relative_to(top))
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                out[relative] = path.lstat().st_mode
            elif path.is_dir():
                out[relative] = None
            else:
                out[relative] = path.read_bytes()
    return out
