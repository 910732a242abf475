"""Tell which paths under the served root changed on disk: inotify where it can be trusted,
stat polling where it cannot.

The rest of the server sees this interface::

    watcher = Watcher(root, on_change, on_reset, CacheConfig(...), loop=None)
    watcher.start()                        # on (or for) the asyncio loop; logs the mode
    watcher.mode                           # "inotify" or "poll": the effective mode now
    trusted = watcher.watch_directory(d)   # d: absolute directory path at or beneath root
    watcher.unwatch_directory(d)
    watcher.watched_directories()          # {directory: True if by inotify, False if polled}
    watcher.simulate_overflow()            # test hook: a kernel IN_Q_OVERFLOW record
    watcher.close()

Callbacks run on the loop thread, never inside a Watcher method (except simulate_overflow):

- ``on_change(path)``: what was cached for ``path`` is stale. ``path`` is an entry of a watched
  directory whose content or attributes changed (close after write, modify, attrib), or which
  was created, deleted, or renamed in or out (then ``on_change(directory)`` follows, since its
  listing changed), or the watched directory itself (its attributes changed, or it was deleted
  or renamed away). Several events for one path in one read from the kernel arrive as one call.
- ``on_reset(path)``: changes at or beneath ``path`` may have gone unseen; drop everything cached
  there and re-check what is observed there. ``on_reset(root)`` follows an inotify queue
  overflow and a switch to poll mode; ``on_reset(directory)`` follows the demotion of that
  directory from inotify to polling (over the watch budget, or the kernel's watch limit).

Watching a directory covers the directory and its entries; files are never watched alone.
``watch_directory`` is idempotent and cheap: call it each time a directory (or an entry in it)
is served or observed (a hit is a dict lookup). It marks the directory most recently used and
tells whether inotify watches it. True: cached state of the directory and its entries stays
valid until ``on_change`` or ``on_reset`` says otherwise. False: the directory is polled every
``poll_interval`` seconds (changes arrive that late), so cache nothing for it and validate by
stat on every request. It raises ValueError for a path outside root, and OSError
(FileNotFoundError, NotADirectoryError, PermissionError) when path is no accessible directory.
A watched directory stays watched, by inotify or by polling, until ``unwatch_directory``.
Paths are watched as given, not resolved: two paths to one directory (a symlink to it, or
a bind mount) are two watched directories that share one kernel watch, and each change in it
is reported under both.

Fallbacks: in mode "auto", a directory on a filesystem where inotify does not see other
machines' changes (`fstype`) is polled, and when the root is such a filesystem the whole watcher
runs in poll mode. More than ``watch_budget`` inotify watches, or ENOSPC/ENOMEM from
inotify_add_watch, demote the least recently used directory to polling; if no watch of ours is
left to give up, the watcher switches to poll mode for good. Mode "poll" polls everything; mode
"inotify" trusts inotify on any filesystem. The mode is logged (logger "coapfs.watch") at start
and on change.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import stat as stat_mode
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..config.schema import CacheConfig
from .fstype import inotify_sees_all_changes
from .inotify import Inotify, WatchLimit
from .poll import Poller, Snapshot, differences, snapshot

logger = logging.getLogger("coapfs.watch")

#: Reports pending at once (a read of the kernel's queue holds about 150 records) beyond which a
#: directory's many entries are folded into one report that everything in it is stale: a storm of
#: creations costs a report per directory and read, not one per file.
FOLD_ABOVE = 64
#: Entries of one directory pending at once that are worth folding.
_FOLD_ENTRIES = 8


class Watcher:
    """Tells which paths changed on disk; inotify where trustworthy, stat polling otherwise."""

    def __init__(
        self,
        root: Path,
        on_change: Callable[[Path], None],
        on_reset: Callable[[Path], None],
        settings: CacheConfig,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.root = root
        self.settings = settings
        self._on_change = on_change
        self._on_reset = on_reset
        self._loop = loop
        self.mode = "poll" if settings.mode == "poll" else "inotify"
        self._kernel: Inotify | None = None
        self._inotify: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        self._poller: Poller | None = None
        self._trusted_devices: dict[int, tuple[bool, str]] = {}
        self._pending: dict[Path, bool] = {}  # path -> is a reset; in arrival order
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Decide the mode, open inotify if it is used, and log the mode."""
        if self._started:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._started = True
        self._poller = Poller(self.settings.poll_interval, self._queue, self._flush, self._loop)
        root_stat = os.stat(self.root)
        trusted, fstype = inotify_sees_all_changes(self.root)
        self._trusted_devices[root_stat.st_dev] = (trusted, fstype)
        requested = self.settings.mode
        if requested == "poll":
            reason = "configured"
        elif requested == "auto" and not trusted:
            self.mode = "poll"
            reason = f"{fstype}: inotify does not see changes made by other machines"
        else:
            reason = fstype if trusted else f"{fstype}, trusted by configuration"
            try:
                self._kernel = Inotify(self._loop, self)
            except OSError as error:  # e.g. EMFILE: fs.inotify.max_user_instances reached
                self.mode = "poll"
                reason = f"cannot use inotify: {error}"
        if self.mode == "poll":
            logger.info(
                "watching %s by polling every %g s (%s)",
                self.root,
                self.settings.poll_interval,
                reason,
            )
        else:
            logger.info("watching %s with inotify (%s)", self.root, reason)

    def close(self) -> None:
        """Stop watching; no callback runs after this returns."""
        if self._closed:
            return
        self._closed = True
        self._close_inotify()
        if self._poller is not None:
            self._poller.close()
        self._pending.clear()

    def _close_inotify(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
        self._kernel = None
        self._inotify.clear()

    def inotify_fileno(self) -> int | None:
        """The inotify descriptor, while inotify is in use."""
        return self._kernel.fileno() if self._kernel is not None else None

    def watch_directory(self, path: Path) -> bool:
        """Watch directory path and its entries (idempotent; marks it most recently used).

        Returns True when inotify watches it, False when it is polled. Raises ValueError for a
        path outside root and OSError when path is not an accessible directory.
        """
        if path in self._inotify:  # the per-request case: no path arithmetic, no system call
            self._inotify.move_to_end(path)
            return True
        path = self._checked(path)
        if not self._started or self._closed or self._poller is None:
            raise RuntimeError("watcher is not running")
        if path in self._inotify:
            self._inotify.move_to_end(path)
            return True
        st = os.stat(path)
        if not stat_mode.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        if self.mode == "inotify" and self._device_trusted(path, st.st_dev):
            was_polled = self._poller.remove(path)
            if self._add_inotify(path):
                if was_polled is not None:
                    # Report what changed since the last poll, which no poll will see now.
                    self._queue_differences(path, was_polled, snapshot(path))
                return True
            if was_polled is not None:
                self._poller.add(path, since=was_polled)
        if path not in self._poller:
            self._poller.add(path)
        self._flush_soon()
        return False

    def unwatch_directory(self, path: Path) -> None:
        """Stop watching directory path (no-op when it is not watched)."""
        path = self._checked(path)
        if self._poller is not None:
            self._poller.remove(path)
        wd = self._inotify.pop(path, None)
        if wd is not None and self._kernel is not None:
            self._kernel.release(path, wd)

    def watched_directories(self) -> dict[Path, bool]:
        """Every watched directory, mapped to whether inotify (True) or polling watches it."""
        watched = dict.fromkeys(self._poller or (), False)
        watched.update(dict.fromkeys(self._inotify, True))
        return watched

    def simulate_overflow(self) -> None:
        """Test hook: feed an IN_Q_OVERFLOW record through the path real kernel records take.

        Unlike the kernel's records, it reports (on_reset(root)) before returning.
        """
        if self._kernel is not None:
            self._kernel.simulate_overflow()
        else:
            self._queue(self.root, reset=True)
            self._flush()

    def _checked(self, path: Path) -> Path:
        path = Path(os.path.abspath(path))
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{path} is not beneath {self.root}")
        return path

    def _device_trusted(self, path: Path, device: int) -> bool:
        if self.settings.mode == "inotify":
            return True
        if device not in self._trusted_devices:
            trusted, fstype = inotify_sees_all_changes(path)
            self._trusted_devices[device] = (trusted, fstype)
            if not trusted:
                logger.info(
                    "polling %s and other directories on its %s filesystem every %g s "
                    "(inotify does not see changes made by other machines)",
                    path,
                    fstype,
                    self.settings.poll_interval,
                )
        return self._trusted_devices[device][0]

    def _add_inotify(self, path: Path) -> bool:
        """Add an inotify watch within budget and kernel limits, demoting LRU watches to polling."""
        assert self._kernel is not None
        while len(self._inotify) >= self.settings.watch_budget:
            self._demote_least_recent()
        while True:
            try:
                wd = self._kernel.add(path)
            except WatchLimit as limit:
                if self._inotify:
                    self._demote_least_recent()
                    continue
                self._switch_to_poll(f"inotify watch limit reached ({limit})")
                return False
            if wd is None:
                return False  # a name inotify cannot be given: poll it
            self._inotify[path] = wd
            return True

    def _demote_least_recent(self) -> None:
        """Move the least recently used inotify watch to polling."""
        assert self._kernel is not None and self._poller is not None
        path, wd = self._inotify.popitem(last=False)
        self._poller.add(path)
        self._kernel.release(path, wd)
        self._queue(path, reset=True)
        self._flush_soon()

    def _switch_to_poll(self, reason: str) -> None:
        assert self._poller is not None
        if self.mode == "poll":
            return
        logger.warning(
            "watching %s by polling every %g s from now on (%s)",
            self.root,
            self.settings.poll_interval,
            reason,
        )
        self.mode = "poll"
        for path in self._inotify:
            self._poller.add(path)
        self._close_inotify()
        self._queue(self.root, reset=True)
        self._flush_soon()

    # --- what the kernel's records mean (the inotify.Sink interface) ----------------------

    def changed(self, path: Path) -> None:
        self._queue(path)

    def overflowed(self) -> None:
        self._queue(self.root, reset=True)

    def lost(self, directory: Path, wd: int) -> None:
        if self._inotify.get(directory) == wd and self._poller is not None:
            del self._inotify[directory]
            self._poller.add(directory)

    def read_done(self) -> None:
        self._flush()

    # --- reporting ------------------------------------------------------------------------

    def _queue(self, path: Path, *, reset: bool = False) -> None:
        if self._pending.get(path) is None or reset:
            self._pending.pop(path, None)
            self._pending[path] = reset

    def _fold(self) -> None:
        """Replace the entries of crowded directories by one reset of each directory."""
        per_directory = collections.Counter(
            path.parent for path, reset in self._pending.items() if not reset
        )
        crowded = {d for d, n in per_directory.items() if n >= _FOLD_ENTRIES}
        if not crowded:
            return
        folded = {
            path: reset
            for path, reset in self._pending.items()
            if reset or (path.parent not in crowded and path not in crowded)
        }
        folded.update(dict.fromkeys(crowded, True))
        self._pending = folded

    def _queue_differences(self, directory: Path, old: Snapshot, new: Snapshot) -> None:
        for path in differences(directory, old, new):
            self._queue(path)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._pending and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Report pending paths, each once, to the consumer."""
        if len(self._pending) > FOLD_ABOVE:
            self._fold()
        while self._pending and not self._closed:
            path, reset = next(iter(self._pending.items()))
            del self._pending[path]
            callback = self._on_reset if reset else self._on_change
            try:
                callback(path)
            except Exception:
                logger.exception("watch callback failed for %s", path)
