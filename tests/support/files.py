"""What a test checks on disk after the server wrote there."""

from __future__ import annotations

from pathlib import Path

from coapfs.tree.hidden import SPOOL_PREFIX


def spool_files(root: Path) -> list[Path]:
    """Upload spool files left anywhere below `root` (the prefix is the server's own)."""
    return sorted(root.rglob(f"{SPOOL_PREFIX}*"))
