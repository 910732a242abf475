"""The tree being served: what a path holds now, read from disk or from the cache while watching
vouches for it, and the writes that change it.

`ServedTree` owns the open root, the freshness machinery (watcher, watch set, cache) and the
routing of change reports: each report drops what it made stale and is handed on through
`on_stale(key, subtree)`, which the file service points at its observers."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config.schema import CacheConfig
from ..watch import stat_signature
from . import attributes, listing, write
from .cache import SMALL_FILE_BYTES, Entry
from .freshness import Freshness
from .path import Key, Target, directories_of
from .problems import Conflict, Forbidden, NotADirectory, NotAFile
from .root import Root
from .spool import Check, Spool

log = logging.getLogger("coapfs")

StaleHandler = Callable[[Key, bool], None]
_MOVED = "The upload's directory was moved or removed meanwhile: nothing written; send it again"


class Found:
    """What a lookup found: its entry and, for a file too large to be kept whole, the file to
    read blocks from (opened on `open()`, which refreshes the entry if the file changed since
    it was cached). Close it when done."""

    def __init__(self, root: Root, target: Target, entry: Entry, fd: int | None) -> None:
        self._root = root
        self._target = target
        self.entry = entry
        self._fd = fd

    @property
    def size(self) -> int:
        body = self.entry.body
        return len(body) if body is not None else self.entry.st.st_size

    def open(self) -> None:
        if self.entry.body is not None or self._fd is not None:
            return
        self._fd, st = self._root.open_for_reading(self._target.segments)
        if stat_signature(st) != stat_signature(self.entry.st):
            self.entry = Entry(False, st, None, content_format=attributes.content_format(self._fd))

    def read(self, offset: int, size: int) -> bytes:
        body = self.entry.body
        if body is not None:
            return body[offset : offset + size]
        assert self._fd is not None, "open() before read()"
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Found:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServedTree:
    """The directory tree beneath `root`, kept fresh. Watching starts with `start()` or the
    first lookup (it needs the event loop)."""

    def __init__(self, root: Path, settings: CacheConfig) -> None:
        self._root = Root(root)
        self._settings = settings
        self._fresh: Freshness | None = None
        self._holds: dict[int, list[Key]] = {}  # observations' watches, kept across restarts
        self._next_hold = 0
        self.on_stale: StaleHandler = lambda key, subtree: None

    @property
    def root(self) -> Path:
        return self._root.path

    @property
    def mode(self) -> str:
        """How changes are detected now: "inotify" or "poll" (before watching starts, the
        configured mode, which may be "auto")."""
        return self._fresh.mode if self._fresh is not None else self._settings.mode

    def stats(self) -> dict[str, Any]:
        """Figures for the status line and for tests: mode, cache use, watched directories."""
        fresh = self._fresh
        watched = fresh.watcher.watched_directories() if fresh is not None else {}
        return {
            "mode": self.mode,
            "cached_entries": len(fresh.cache) if fresh is not None else 0,
            "cached_bytes": fresh.cache.bytes_used if fresh is not None else 0,
            "watched": watched,
        }

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching now, on the event loop (logging how changes are detected), rather
        than with the first lookup; every observer hears afresh."""
        if self._fresh is None:
            self._freshness()
            self.on_stale((), True)

    def close(self) -> None:
        self._stop_watching()
        self._root.close()

    def open_root(self, path: Path) -> Root | None:
        """The new root for a reconfiguration, opened (OSError if it cannot be), or None when
        `path` is the root already."""
        if Path(os.path.abspath(path)) == self._root.path:
            return None
        return Root(path)

    def switch_root(self, new_root: Root) -> None:
        was_watching = self._stop_watching()
        old, self._root = self._root, new_root
        old.close()
        if was_watching:
            self.start()

    def tune(self, settings: CacheConfig) -> None:
        """Apply [cache]; watching restarts if how changes are detected changed."""
        old, self._settings = self._settings, settings
        if self._fresh is not None:
            self._fresh.cache.resize(settings.byte_budget)
        if (old.watch_budget, old.mode, old.poll_interval) != (
            settings.watch_budget,
            settings.mode,
            settings.poll_interval,
        ) and self._stop_watching():
            self.start()

    def simulate_overflow(self) -> None:
        """Test hook: the watcher's kernel queue overflowed."""
        self._freshness().watcher.simulate_overflow()

    def _freshness(self) -> Freshness:
        """The freshness machinery, started on first use (inside the event loop)."""
        if self._fresh is None:
            self._fresh = Freshness(self._root, self._settings, self._on_change, self._on_reset)
            for dirs in self._holds.values():
                self._fresh.watches.hold(dirs)
        return self._fresh

    def _stop_watching(self) -> bool:
        """Forget everything cached and every watch (a new root, or a new way of watching);
        whether anything was being watched."""
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            return False
        fresh.close()
        return True

    # --- observations' watches --------------------------------------------------------------

    def hold(self, target: Target) -> int:
        """Keep the directories of an observed target watched; a token for `release`."""
        dirs = directories_of(target.segments, is_dir=target.is_dir_request)
        self._freshness().watches.hold(dirs)
        self._next_hold += 1
        self._holds[self._next_hold] = dirs
        return self._next_hold

    def release(self, token: int) -> None:
        dirs = self._holds.pop(token)
        if self._fresh is not None:
            self._fresh.watches.release(dirs)

    # --- change reports ---------------------------------------------------------------------

    def _on_change(self, path: Path) -> None:
        self._stale(path, reset=False)

    def _on_reset(self, path: Path) -> None:
        self._stale(path, reset=True)

    def _stale(self, path: Path, *, reset: bool) -> None:
        """What is cached for `path` is stale (with `reset`: everything at or beneath it, since
        changes may have gone unseen); drop it and pass it on."""
        try:
            key = path.relative_to(self._root.path).parts
        except ValueError:
            return
        if self._fresh is None:
            return
        if key == ():
            self._follow_root()
        fresh = self._fresh
        if fresh is None:
            return
        if reset:
            fresh.watches.rewatch(key)  # what went unseen may include a directory replaced
            subtree = True
        else:
            subtree = fresh.watches.replaced(key)
        fresh.cache.drop(key, subtree=subtree)
        self.on_stale(key, subtree)

    def _follow_root(self) -> None:
        """The root's path may now name another directory (`mv srv srv.old; mv srv.new srv`):
        serve what the path names, as a client of that path expects, and start over."""
        path = self._root.path
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._root.identity():
                return
            new_root = Root(path)
        except OSError:
            return  # mid-swap: the path is polled, and its return is reported again
        log.warning("%s now names another directory; serving that one", path)
        self.switch_root(new_root)

    def _changed_here(self, key: Key, *, subtree: bool = False) -> None:
        """Our own write: drop what was cached and pass it on at once, before the watcher
        reports it."""
        for k, beneath in ((key, subtree), (key[:-1], False)):
            if self._fresh is not None:
                self._fresh.cache.drop(k, subtree=beneath)
            self.on_stale(k, beneath)

    # --- reading ----------------------------------------------------------------------------

    def lookup(self, target: Target) -> Found:
        """What `target` holds: from the cache, or read from disk (and cached where watching
        vouches for it). A directory named without its trailing slash is NotAFile, a file
        named with one NotADirectory."""
        key = target.segments
        fresh = self._freshness()
        if fresh.mode == "poll":
            entry, fd, _watchable = self._read(target)
            return Found(self._root, target, entry, fd)
        hit = fresh.cache.get(key)
        if hit is not None and hit.is_dir == target.is_dir_request:
            return Found(self._root, target, hit, None)
        dirs = directories_of(key, is_dir=target.is_dir_request)
        trusted = fresh.watches.hold(dirs)  # before reading, so no change can slip in between
        try:
            entry, fd, watchable = self._read(target)
        except BaseException:
            fresh.watches.release(dirs)
            raise
        cacheable = trusted and watchable and (entry.is_dir or not self._root.names_a_link(key))
        if not (cacheable and fresh.cache.put(key, entry)):
            fresh.watches.release(dirs)
        return Found(self._root, target, entry, fd)

    def _read(self, target: Target) -> tuple[Entry, int | None, bool]:
        """The entry from disk, a descriptor if a large file must still be read from, and
        whether watching the path's directories can see every change to what was read: not for
        a file with other hard links (changed under another name), nor for a listing showing
        links (their targets change elsewhere); `lookup` rules out files reached through a
        link (checked only where the entry would be cached)."""
        fd, st = self._root.open_for_reading(target.segments)
        keep_open = False
        try:
            if stat.S_ISDIR(st.st_mode):
                if not target.is_dir_request:
                    raise NotAFile()
                entries, shows_links = self._listing(fd, target)
                body = listing.render_listing(target.segments, entries)
                return Entry(True, st, body, entries), None, not shows_links
            if target.is_dir_request:
                raise NotADirectory()
            watchable = st.st_nlink == 1
            stored_format = attributes.content_format(fd)
            if st.st_size <= SMALL_FILE_BYTES:
                body = _read_whole(fd, st.st_size)
                after = os.fstat(fd)
                if stat_signature(after) == stat_signature(st):
                    return Entry(False, st, body, content_format=stored_format), None, watchable
                st = after  # written to meanwhile: serve it block by block instead
            keep_open = True
            return Entry(False, st, None, content_format=stored_format), fd, watchable
        finally:
            if not keep_open:
                os.close(fd)

    def _listing(self, dirfd: int, target: Target) -> tuple[tuple[tuple[str, bool], ...], bool]:
        """The servable entries, sorted, and whether any of them is a symbolic link."""
        links = []

        def resolve_link(name: str) -> os.stat_result | None:
            links.append(name)
            try:
                return self._root.stat((*target.segments, name))
            except OSError:
                return None

        entries = listing.read_entries(dirfd, resolve_link)
        return tuple(sorted(entries)), bool(links)

    # --- writing ----------------------------------------------------------------------------

    def place(self, target: Target) -> write.Place:
        """Where a write to `target` lands (close it when done); see `write.open_place`."""
        if not target.segments:
            raise Forbidden("The served root itself cannot be written or deleted")
        return write.open_place(self._root, target)

    def spool(self, place: write.Place, mode: int) -> Spool:
        """An upload to the place, filled as blocks arrive (it owns the place from now on)."""
        try:
            return Spool(place, mode)
        except BaseException:
            place.close()
            raise

    async def commit(
        self, spool: Spool, check: Check, *, create_only: bool, content_format: int | None
    ) -> tuple[os.stat_result, bool]:
        """Put a complete upload in place (off the event loop): the new file's stat and whether
        it was created; the spool is gone afterwards, whatever happened."""
        place = spool.place

        def where_sent(existing: os.stat_result | None) -> None:
            self._check_in_place(place)
            check(existing)

        try:
            result = await asyncio.to_thread(
                spool.commit, where_sent, create_only=create_only, content_format=content_format
            )
        finally:
            spool.discard()
        self._changed_here(place.target.segments)
        return result

    def _check_in_place(self, place: write.Place) -> None:
        """The directory an upload was opened in is still the one its path names beneath the
        root (checked under the lock, just before the file is linked in): one moved or replaced
        meanwhile (renamed elsewhere, even out of the root) must not receive a file its client
        sent to another path, nor one the access rules of its new place might refuse."""
        try:
            fd = self._root.open_parent(place.target.segments)
        except (FileNotFoundError, NotADirectoryError):
            raise Conflict(_MOVED) from None
        try:
            now = os.fstat(fd)
        finally:
            os.close(fd)
        then = os.fstat(place.parent)
        if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
            raise Conflict(_MOVED)

    async def delete_file(self, place: write.Place, check: Check) -> None:
        """Off the event loop: the lock on the file may be held by another writer (another
        process, or a server sharing the file system) for as long as it likes."""
        await asyncio.to_thread(write.delete_file, place, check)
        self._changed_here(place.target.segments)

    def make_directory(self, place: write.Place, mode: int) -> os.stat_result:
        st = write.make_directory(place, mode)
        self._changed_here(place.target.segments)
        return st

    async def delete_directory(self, place: write.Place, *, only_if_empty: bool) -> None:
        await asyncio.to_thread(write.delete_directory, place, only_if_empty=only_if_empty)
        self._changed_here(place.target.segments, subtree=True)

    def space_left(self) -> int:
        return write.space_left(self._root)

    def unwritable_reason(self) -> str | None:
        """Why this process could not write beneath the root (None: it can)."""
        return write.unwritable_reason(self._root)

    async def sweep(self, older_than: float) -> int:
        """Remove what interrupted writes left behind (off the event loop); how many."""
        return await asyncio.to_thread(write.sweep, self._root, older_than)


def _read_whole(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
