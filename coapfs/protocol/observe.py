"""Who observes what (RFC 7641), and when they hear of a change: a few milliseconds after the
first change (so a write, its truncation and its close make one notification), and then at most
once per `coalesce` seconds, so a burst of a thousand changes yields a handful of notifications,
each rendered from the then-current state.

Notifying is spread over event-loop turns, `FANOUT_BATCH` observers a turn, so that thousands
of observers of one file do not hold up the requests arriving meanwhile. And a resource that is
costly to render (the listing of a directory of tens of thousands of entries, changing all the
time) is notified at most once per `COST_FACTOR` times its rendering time, so that rendering it
for observers never takes more than a tenth of the server's time."""

from __future__ import annotations

import asyncio
from typing import Any

from ..tree.path import Key
from ..tree.pathindex import PathIndex

#: How long after a change its notification waits for the rest of the same write.
SETTLE = 0.005
#: Observers notified per event-loop turn.
FANOUT_BATCH = 32
#: A resource is notified at most once per this many times its last rendering took.
COST_FACTOR = 10


class Observations:
    def __init__(self, coalesce: float) -> None:
        self.coalesce = coalesce
        self._by_key: PathIndex[set[Any]] = PathIndex()
        self._last_sent: dict[Key, float] = {}
        self._cost: dict[Key, float] = {}  # seconds its last rendering for observers took
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
            self._cost.pop(key, None)
            handle = self._scheduled.pop(key, None)
            if handle is not None:
                handle.cancel()

    def rendered(self, key: Key, seconds: float) -> None:
        """What rendering `key` for its observers took, last time."""
        if key in self._by_key:
            self._cost[key] = seconds

    def changed(self, key: Key, subtree: bool = False) -> None:
        """Something at `key` (or with `subtree`, at or beneath it) changed on disk."""
        for k in self._by_key.at_or_beneath(key) if subtree else [key]:
            if k not in self._by_key or k in self._scheduled:
                continue
            loop = asyncio.get_running_loop()
            gap = max(self.coalesce, COST_FACTOR * self._cost.get(k, 0.0))
            due = max(loop.time() + SETTLE, self._last_sent.get(k, float("-inf")) + gap)
            self._scheduled[k] = loop.call_at(due, self._notify, k)

    def _notify(self, key: Key) -> None:
        self._scheduled.pop(key, None)
        observers = self._by_key.get(key)
        if not observers:
            return
        loop = asyncio.get_running_loop()
        self._last_sent[key] = loop.time()
        self._trigger(loop, list(observers))

    def _trigger(self, loop: asyncio.AbstractEventLoop, pending: list[Any]) -> None:
        """Notify a batch now and the rest on later turns (each renders the state it finds)."""
        batch, rest = pending[:FANOUT_BATCH], pending[FANOUT_BATCH:]
        for observation in batch:
            observation.trigger()
        if rest:
            loop.call_soon(self._trigger, loop, rest)

    def close(self) -> None:
        for handle in self._scheduled.values():
            handle.cancel()
        self._scheduled.clear()
