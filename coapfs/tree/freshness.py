"""Watching switched on: the watcher, the watch set that holds its directories, and the cache of
what they vouch for — made together, closed together."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config.schema import CacheConfig
from ..watch import Watcher
from .cache import Cache, Entry
from .path import Key, directories_of
from .root import Root
from .watchset import WatchSet


class Freshness:
    """Started on the event loop; `on_change`/`on_reset` receive the watcher's reports."""

    def __init__(
        self,
        root: Root,
        settings: CacheConfig,
        on_change: Callable[[Path], None],
        on_reset: Callable[[Path], None],
    ) -> None:
        self.watcher = Watcher(root.path, on_change, on_reset, settings)
        self.watcher.start()
        self.watches = WatchSet(root, self.watcher)
        self.cache = Cache(settings.byte_budget, self._entry_dropped)

    @property
    def mode(self) -> str:
        """ "inotify" or "poll": how changes are detected now."""
        return self.watcher.mode

    def _entry_dropped(self, key: Key, entry: Entry) -> None:
        self.watches.release(directories_of(key, is_dir=entry.is_dir))

    def close(self) -> None:
        """Forget everything cached; closing the watcher ends its watches at once."""
        self.watcher.close()
