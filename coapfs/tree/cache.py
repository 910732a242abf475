"""Listings and file state kept in memory, bounded by a byte budget, least recently used first
out. Only entries whose directories inotify watches are put here (the served tree sees to that),
so an entry stays valid until a change report drops it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .etag import stat_digest
from .path import Key
from .pathindex import PathIndex

#: Files up to this size are kept whole; larger ones keep only their stat.
SMALL_FILE_BYTES = 64 * 1024
_ENTRY_OVERHEAD = 300  # bytes of bookkeeping per entry, roughly (stat, key, dict slots)
_ENTRY_NAME_OVERHEAD = 120  # bytes per listed name kept beside the body (tuple, str)


@dataclass(frozen=True, slots=True)
class Entry:
    """What one successful lookup found: a directory's listing, or a file's stat and (if small)
    its whole content."""

    is_dir: bool
    st: os.stat_result
    body: bytes | None
    #: A directory's servable entries (name, is a directory), from which `body` was rendered.
    entries: tuple[tuple[str, bool], ...] = ()
    #: A file's stored Content-Format (`attributes`), if a PUT gave it one.
    content_format: int | None = None
    digest: bytes = field(init=False)  # its ETag, computed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", stat_digest(self.st))

    @property
    def cost(self) -> int:
        body = len(self.body) if self.body is not None else 0
        return _ENTRY_OVERHEAD + body + _ENTRY_NAME_OVERHEAD * len(self.entries)


class Cache:
    def __init__(self, byte_budget: int, on_drop: Callable[[Key, Entry], None]) -> None:
        self.byte_budget = byte_budget
        self.bytes_used = 0
        self._entries: PathIndex[Entry] = PathIndex()
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Entry | None:
        return self._entries.get(key)

    def put(self, key: Key, entry: Entry) -> bool:
        """Keep `entry`, evicting the least recently used to make room; False if it can't fit."""
        if entry.cost > self.byte_budget:
            return False
        self.drop(key)
        while self.bytes_used + entry.cost > self.byte_budget:
            oldest = self._entries.oldest()
            assert oldest is not None
            self.drop(oldest)
        self._entries.set(key, entry)
        self.bytes_used += entry.cost
        return True

    def drop(self, key: Key, *, subtree: bool = False) -> None:
        """Forget `key` (and with `subtree`, everything beneath it)."""
        for k in self._entries.at_or_beneath(key) if subtree else [key]:
            entry = self._entries.pop(k)
            if entry is not None:
                self.bytes_used -= entry.cost
                self._on_drop(k, entry)

    def resize(self, byte_budget: int) -> None:
        self.byte_budget = byte_budget
        while self.bytes_used > byte_budget:
            oldest = self._entries.oldest()
            assert oldest is not None
            self.drop(oldest)
