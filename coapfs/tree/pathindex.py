"""Values keyed by path (a tuple of segments), in least-recently-used order, that can also be
asked for everything at or beneath a path — what both the cache and the observation registry
need when a directory is renamed or deleted."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Generic, TypeVar

from .path import Key

V = TypeVar("V")


class PathIndex(Generic[V]):
    def __init__(self) -> None:
        self._values: OrderedDict[Key, V] = OrderedDict()
        self._beneath: Counter[Key] = Counter()  # ancestor → how many keys lie strictly beneath

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Key) -> bool:
        return key in self._values

    def get(self, key: Key) -> V | None:
        """The value, marked most recently used."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def set(self, key: Key, value: V) -> None:
        if key not in self._values:
            for i in range(len(key)):
                self._beneath[key[:i]] += 1
        self._values[key] = value
        self._values.move_to_end(key)

    def pop(self, key: Key) -> V | None:
        value = self._values.pop(key, None)
        if value is not None:
            for i in range(len(key)):
                ancestor = key[:i]
                self._beneath[ancestor] -= 1
                if not self._beneath[ancestor]:
                    del self._beneath[ancestor]
        return value

    def has_beneath(self, key: Key) -> bool:
        """Whether any key lies strictly beneath `key`."""
        return self._beneath.get(key, 0) > 0

    def at_or_beneath(self, key: Key) -> list[Key]:
        """The keys equal to or beneath `key` (a scan only when something lies beneath)."""
        found = [key] if key in self._values else []
        if self.has_beneath(key):
            n = len(key)
            found.extend(k for k in self._values if len(k) > n and k[:n] == key)
        return found

    def oldest(self) -> Key | None:
        return next(iter(self._values), None)
