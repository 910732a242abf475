"""Kernel inotify watches on directories, read on the asyncio loop; the only module that
imports pyinotify.

One kernel watch per inode: every path leading to a watched directory (a symlink to it, a bind
mount) shares it, and each of its records is reported under every such path."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Protocol

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # its asyncore import, unused here
    import pyinotify

_DIRECTORY_MASK = (
    pyinotify.IN_CREATE
    | pyinotify.IN_DELETE
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_MODIFY
    | pyinotify.IN_ATTRIB
    | pyinotify.IN_DELETE_SELF
    | pyinotify.IN_MOVE_SELF
    | pyinotify.IN_ONLYDIR
    | pyinotify.IN_EXCL_UNLINK
)
_LISTING_EVENTS = (
    pyinotify.IN_CREATE | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM | pyinotify.IN_MOVED_TO
)
_ENTRY_EVENTS = pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MODIFY | pyinotify.IN_ATTRIB
_SELF_GONE_EVENTS = pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_UNMOUNT


class WatchLimit(Exception):
    """inotify_add_watch failed with ENOSPC or ENOMEM: the kernel's watch limit is reached."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode[code])


class Sink(Protocol):
    """Where the records read from the kernel go (the watcher)."""

    def changed(self, path: Path) -> None:
        """What was known of `path` (an entry, or a watched directory itself) is stale."""

    def overflowed(self) -> None:
        """The kernel's queue overflowed: changes anywhere may have gone unseen."""

    def lost(self, directory: Path, wd: int) -> None:
        """Watch `wd` no longer covers `directory` (the kernel dropped it, or it follows the
        directory's inode elsewhere): poll that path instead."""

    def read_done(self) -> None:
        """A read from the kernel has been processed."""


class _QuietPyinotify(logging.Filter):
    """Drop pyinotify's records about situations this module expects and handles itself."""

    _EXPECTED = (
        # Events still queued in the kernel for a watch we have just removed.
        "Unable to retrieve Watch object",
        # IN_MOVE_SELF of a watched directory: we drop that watch, pyinotify's path is not used.
        "has probably changed and couldn't be updated",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self._EXPECTED)


def _route_pyinotify_logging() -> None:
    """pyinotify prints to stderr through its own handler; send its records through ours."""
    pyinotify_logger = logging.getLogger("pyinotify")
    for handler in list(pyinotify_logger.handlers):
        pyinotify_logger.removeHandler(handler)
    if not any(isinstance(f, _QuietPyinotify) for f in pyinotify_logger.filters):
        pyinotify_logger.addFilter(_QuietPyinotify())


_route_pyinotify_logging()

_ERRNO_NAME = re.compile(r"\((E[A-Z0-9]+)\)")


def _add_watch_errno(error: pyinotify.WatchManagerError) -> int | None:
    """errno of a failed inotify_add_watch, as pyinotify words it in its exception."""
    match = _ERRNO_NAME.search(str(error))
    return getattr(errno, match.group(1), None) if match else None


def _overflow_record() -> pyinotify._RawEvent:
    return pyinotify._RawEvent(-1, pyinotify.IN_Q_OVERFLOW, 0, "")


class _AsyncioReader(pyinotify.AsyncioNotifier):
    """pyinotify's asyncio notifier, surviving file names that are not UTF-8."""

    def handle_read(self, *args: object, **kwargs: object) -> None:
        try:
            self.read_events()
        except UnicodeDecodeError:
            # pyinotify decodes names strictly; the records after such a name are lost.
            self.append_event(_overflow_record())
        self.process_events()
        if self.handle_read_callback is not None:
            self.handle_read_callback(self)


class Inotify:
    """One inotify instance on `loop`; records go to `sink`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink) -> None:
        self._sink = sink
        self._by_wd: dict[int, set[Path]] = {}
        self._manager = pyinotify.WatchManager()
        try:
            self._reader = _AsyncioReader(
                self._manager,
                loop,
                callback=lambda _reader: sink.read_done(),
                default_proc_fun=self._process,
            )
        except BaseException:
            self._manager.close()
            raise

    def fileno(self) -> int:
        """The inotify descriptor (its /proc/self/fdinfo lists the kernel's watches)."""
        return int(self._manager.get_fd())

    def close(self) -> None:
        """Remove the reader and close the descriptor, ending every watch at once."""
        self._reader.stop()
        self._by_wd.clear()

    def add(self, path: Path) -> int | None:
        """Watch directory `path`: its watch descriptor, or None for a name pyinotify cannot
        encode (not UTF-8). Raises WatchLimit at the kernel's limit, OSError otherwise."""
        try:
            result = self._manager.add_watch(str(path), _DIRECTORY_MASK, quiet=False)
        except UnicodeEncodeError:
            return None
        except pyinotify.WatchManagerError as error:
            code = _add_watch_errno(error)
            if code in (errno.ENOSPC, errno.ENOMEM):
                raise WatchLimit(code) from None
            raise OSError(code or errno.EIO, f"cannot watch {path}: {error}") from None
        wd = int(result[os.path.normpath(str(path))])
        # The kernel returns the existing descriptor for an inode that is already watched,
        # e.g. the same directory reached by two paths: the paths share it.
        self._by_wd.setdefault(wd, set()).add(path)
        return wd

    def release(self, path: Path, wd: int) -> None:
        """Drop path's share of watch wd; remove the kernel watch when no path is left on it."""
        paths = self._by_wd.get(wd)
        if paths is not None:
            paths.discard(path)
            if paths:
                return  # another path to the same directory still uses it
            del self._by_wd[wd]
        if self._manager.get_watch(wd) is None:
            return  # the kernel has dropped it already (IN_IGNORED processed)
        # It fails when the kernel dropped the watch and its IN_IGNORED record is still queued.
        with contextlib.suppress(pyinotify.WatchManagerError):
            self._manager.rm_watch(wd, quiet=False)

    def simulate_overflow(self) -> None:
        """Test hook: an IN_Q_OVERFLOW record, through the path real kernel records take, and
        reported before this returns."""
        self._reader.append_event(_overflow_record())
        self._reader.process_events()
        self._sink.read_done()

    def _process(self, event: pyinotify.Event) -> None:
        """pyinotify's processing function: one kernel record to the sink."""
        mask = event.mask
        if mask & pyinotify.IN_Q_OVERFLOW:
            self._sink.overflowed()
            return
        directories = self._by_wd.get(event.wd)
        if not directories:
            return  # a record for a watch we have removed
        if mask & pyinotify.IN_IGNORED:
            # The kernel dropped the watch: the directory is gone or its filesystem unmounted.
            del self._by_wd[event.wd]
            for directory in directories:
                self._sink.lost(directory, event.wd)
                self._sink.changed(directory)
            return
        name = event.name
        for directory in directories:
            if name and mask & (_LISTING_EVENTS | _ENTRY_EVENTS):
                self._sink.changed(directory / name)
            if not name or mask & (_LISTING_EVENTS | _SELF_GONE_EVENTS):
                self._sink.changed(directory)
        if mask & pyinotify.IN_MOVE_SELF:
            # The watch follows the moved inode, no longer the paths: poll the paths instead.
            for directory in list(directories):
                self._sink.lost(directory, event.wd)
                self.release(directory, event.wd)
