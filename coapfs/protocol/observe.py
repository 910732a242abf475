"""Who observes what (RFC 7641), and when they hear of a change: a few milliseconds after the
first change (so a write, its truncation and its close make one notification), and then at most
once per `coalesce` seconds, so a burst of a thousand changes yields a handful of notifications,
each rendered from the then-current state."""

from __future__ import annotations

import asyncio
from typing import Any

from ..tree.path import Key
from ..tree.pathindex import PathIndex

#: How long after a change its notification waits for the rest of the same write.
SETTLE = 0.005


class Observations:
    def __init__(self, coalesce: float) -> None:
        self.coalesce = coalesce
        self._by_key: PathIndex[set[Any]] = PathIndex()
        self._last_sent: dict[Key, float] = {}
        self._scheduled: dict[Key, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, key: Key, observation: Any) -> None:
        observers = self._by_key.get(key)
        if observers is None:
            observers = set()
            self._by_key.set(key, observers)
        observers.add(observation)

    def remove(self, key: Key, observation: Any) -> None:
        observers = self._by_key.get(key)
        if observers is None:
            return
        observers.discard(observation)
        if not observers:
            self._by_key.pop(key)
            self._last_sent.pop(key, None)
            handle = self._scheduled.pop(key, None)
            if handle is not None:
                handle.cancel()

    def changed(self, key: Key, subtree: bool = False) -> None:
        """Something at `key` (or with `subtree`, at or beneath it) changed on disk."""
        for k in self._by_key.at_or_beneath(key) if subtree else [key]:
            if k not in self._by_key or k in self._scheduled:
                continue
            loop = asyncio.get_running_loop()
            due = max(loop.time() + SETTLE, self._last_sent.get(k, float("-inf")) + self.coalesce)
            self._scheduled[k] = loop.call_at(due, self._notify, k)

    def _notify(self, key: Key) -> None:
        self._scheduled.pop(key, None)
        observers = self._by_key.get(key)
        if not observers:
            return
        self._last_sent[key] = asyncio.get_running_loop().time()
        for observation in list(observers):
            observation.trigger()

    def close(self) -> None:
        for handle in self._scheduled.values():
            handle.cancel()
        self._scheduled.clear()
