"""The directories the server needs watched, reference-counted by those who need them (cached
entries, observations): a watch is taken with its first holder and goes with its last."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..watch import Watcher
from .path import Key
from .root import Root

log = logging.getLogger("coapfs")

#: Seconds a directory nobody holds stays watched, in case it is wanted again right away.
IDLE_UNWATCH = 1.0


class WatchSet:
    def __init__(self, root: Root, watcher: Watcher) -> None:
        self._root = root
        self._watcher = watcher
        self._holders: dict[Key, int] = {}
        self._identity: dict[Key, tuple[int, int] | None] = {}

    def hold(self, dirs: list[Key]) -> bool:
        """Watch `dirs` for one more holder; True if inotify covers all of them (so what was
        read from them may be cached), False if any is only polled or cannot be watched."""
        trusted = True
        missing = False  # beneath a directory that does not exist, none can: no system calls
        for key in dirs:
            if not missing:
                try:
                    trusted = self._watcher.watch_directory(self._path(key)) and trusted
                except (FileNotFoundError, NotADirectoryError):
                    trusted, missing = False, True
                except (OSError, ValueError) as e:
                    log.debug("Cannot watch %s: %s", self._path(key), e)
                    trusted = False
            if key not in self._holders:
                self._holders[key] = 0
                self._identity[key] = None if missing else self._current_identity(key)
            self._holders[key] += 1
        return trusted

    def release(self, dirs: list[Key]) -> None:
        """One holder fewer; a directory nobody holds is unwatched after IDLE_UNWATCH seconds
        (unless held again by then), so what is read afresh on every request — an entry that
        cannot be cached — does not add and remove a kernel watch each time."""
        for key in dirs:
            count = self._holders.get(key, 0) - 1
            if count > 0:
                self._holders[key] = count
                continue
            self._holders.pop(key, None)
            self._identity.pop(key, None)
            try:
                asyncio.get_running_loop().call_later(IDLE_UNWATCH, self._unwatch_if_idle, key)
            except RuntimeError:  # not on the loop (closing): no later
                self._unwatch_if_idle(key)

    def _unwatch_if_idle(self, key: Key) -> None:
        if key not in self._holders:
            self._watcher.unwatch_directory(self._path(key))

    def replaced(self, key: Key) -> bool:
        """Whether the held directory at `key` is no longer the one first watched there (renamed,
        deleted, swapped, or a symlink retargeted): then everything read beneath it is stale, and
        the watches at and beneath it are moved to what the paths lead to now."""
        if key not in self._holders or self._current_identity(key) == self._identity[key]:
            return False
        self.rewatch(key)
        return True

    def rewatch(self, key: Key) -> None:
        """Re-check every held directory at or beneath `key` (after a replacement, or when
        events may have been lost) and watch again those whose path now leads elsewhere; a
        watch follows its inode, not its path."""
        n = len(key)
        for held in [k for k in self._holders if k[:n] == key]:
            now = self._current_identity(held)
            if now == self._identity[held]:
                continue
            self._identity[held] = now
            path = self._path(held)
            self._watcher.unwatch_directory(path)
            try:
                self._watcher.watch_directory(path)
            except (OSError, ValueError) as e:
                log.debug("Cannot watch %s again: %s", path, e)

    def _current_identity(self, key: Key) -> tuple[int, int] | None:
        try:
            st = self._root.stat(key)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _path(self, key: Key) -> Path:
        return self._root.path.joinpath(*key)
