"""Change detection by stat: a directory's snapshot (the signature of itself and of every entry),
taken again every interval off the event loop, and the paths that differ."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .signature import Signature, stat_signature

Snapshot = dict[str, Signature | None]  # "" is the directory itself, else entry names


def snapshot(directory: Path) -> Snapshot:
    """Stat the directory and every entry in it (following symlinks, as serving does)."""
    try:
        taken: Snapshot = {"": stat_signature(os.stat(directory))}
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    taken[entry.name] = stat_signature(entry.stat())
                except OSError:
                    try:
                        taken[entry.name] = stat_signature(entry.stat(follow_symlinks=False))
                    except OSError:
                        continue  # removed meanwhile
    except OSError:
        return {"": None}
    return taken


def _snapshots(directories: list[Path]) -> list[Snapshot]:
    return [snapshot(directory) for directory in directories]


def differences(directory: Path, old: Snapshot, new: Snapshot) -> list[Path]:
    """Paths to report for the change from old to new, entries before their directory."""
    changed: list[Path] = []
    listing_changed = old.keys() != new.keys()
    for name in old.keys() | new.keys():
        if name and old.get(name) != new.get(name):
            changed.append(directory / name)
    if listing_changed or old.get("") != new.get(""):
        changed.append(directory)
    return changed


class Poller:
    """Directories checked every `interval` seconds; each difference goes to `report(path)`, and
    `flush()` follows each round."""

    def __init__(
        self,
        interval: float,
        report: Callable[[Path], None],
        flush: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.interval = interval
        self._report = report
        self._flush = flush
        self._loop = loop
        self._snapshots: dict[Path, Snapshot] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __contains__(self, directory: Path) -> bool:
        return directory in self._snapshots

    def __iter__(self) -> Iterator[Path]:
        return iter(self._snapshots)

    def add(self, directory: Path, since: Snapshot | None = None) -> None:
        """Poll `directory`, reporting what changed after `since` (default: from now on)."""
        self._snapshots[directory] = since if since is not None else snapshot(directory)
        if self._task is None and not self._closed:
            self._task = self._loop.create_task(self._poll_forever())

    def remove(self, directory: Path) -> Snapshot | None:
        """Stop polling `directory`; its last snapshot, if it was polled."""
        return self._snapshots.pop(directory, None)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._snapshots.clear()

    async def _poll_forever(self) -> None:
        try:
            while self._snapshots:
                await asyncio.sleep(self.interval)
                directories = list(self._snapshots)
                snapshots = await self._loop.run_in_executor(None, _snapshots, directories)
                for directory, new in zip(directories, snapshots, strict=True):
                    old = self._snapshots.get(directory)
                    if old is None:
                        continue  # unwatched or promoted to inotify meanwhile
                    self._snapshots[directory] = new
                    for path in differences(directory, old, new):
                        self._report(path)
                self._flush()
        finally:
            if self._task is asyncio.current_task():
                self._task = None
