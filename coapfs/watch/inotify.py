"""Kernel inotify watches on directories, read on the asyncio loop; the only module that
imports pyinotify.

One kernel watch per inode: every path leading to a watched directory (a symlink to it, a bind
mount) shares it, and each of its records is reported under every such path.

pyinotify adds and removes the watches; the records are read here, at most READ_LIMIT bytes
(about 150 records) per event-loop turn and decoded straight from the kernel's structs:
pyinotify's own reader takes the whole queue in one turn and builds an object with a formatted
string for every record, which under a storm of changes (tens of thousands of files created a
second) left the loop no time for requests. What the kernel cannot queue meanwhile becomes an
overflow, which drops everything cached and re-checks every observation: bounded work either
way."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterator
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


def _route_pyinotify_logging() -> None:
    """pyinotify prints to stderr through its own handler; send its records through ours."""
    pyinotify_logger = logging.getLogger("pyinotify")
    for handler in list(pyinotify_logger.handlers):
        pyinotify_logger.removeHandler(handler)


_route_pyinotify_logging()

_ERRNO_NAME = re.compile(r"\((E[A-Z0-9]+)\)")


def _add_watch_errno(error: pyinotify.WatchManagerError) -> int | None:
    """errno of a failed inotify_add_watch, as pyinotify words it in its exception."""
    match = _ERRNO_NAME.search(str(error))
    return getattr(errno, match.group(1), None) if match else None


#: Bytes of records read per event-loop turn (about 150 records): aiocoap takes one datagram a
#: turn, so this keeps requests and change reports taking turns under any storm.
READ_LIMIT = 4096
_RECORD = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def records(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(wd, mask, name) of each inotify_event in `data`; names that are not UTF-8 keep their
    bytes as surrogates (they are never served, and no path of ours can name them)."""
    offset = 0
    while offset + _RECORD.size <= len(data):
        wd, mask, _cookie, length = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        raw = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        yield wd, mask, raw.decode("utf-8", "surrogateescape")


class Inotify:
    """One inotify instance on `loop`; records go to `sink`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink) -> None:
        self._sink = sink
        self._loop = loop
        self._by_wd: dict[int, set[Path]] = {}
        self._manager = pyinotify.WatchManager()
        self._fd = int(self._manager.get_fd())
        try:
            os.set_blocking(self._fd, False)
            loop.add_reader(self._fd, self._read)
        except BaseException:
            self._manager.close()
            raise

    def fileno(self) -> int:
        """The inotify descriptor (its /proc/self/fdinfo lists the kernel's watches)."""
        return self._fd

    def close(self) -> None:
        """Remove the reader and close the descriptor, ending every watch at once."""
        self._loop.remove_reader(self._fd)
        self._manager.close()
        self._by_wd.clear()

    def _read(self) -> None:
        """One bounded read of the kernel's queue, its records processed, then the loop's turn."""
        try:
            data = os.read(self._fd, READ_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._sink.overflowed()  # cannot read on: assume everything changed
            self._sink.read_done()
            return
        # The same name in one read (a file renamed back and forth) is processed once.
        merged: dict[tuple[int, str], int] = {}
        for wd, mask, name in records(data):
            merged[wd, name] = merged.get((wd, name), 0) | mask
        for (wd, name), mask in merged.items():
            self._process(wd, mask, name)
        self._sink.read_done()

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
        self._process(-1, pyinotify.IN_Q_OVERFLOW, "")
        self._sink.read_done()

    def _process(self, wd: int, mask: int, name: str) -> None:
        """One kernel record to the sink."""
        if mask & pyinotify.IN_Q_OVERFLOW:
            self._sink.overflowed()
            return
        directories = self._by_wd.get(wd)
        if not directories:
            return  # a record for a watch we have removed
        if mask & pyinotify.IN_IGNORED:
            # The kernel dropped the watch: the directory is gone or its filesystem unmounted.
            del self._by_wd[wd]
            for directory in directories:
                self._sink.lost(directory, wd)
                self._sink.changed(directory)
            return
        for directory in directories:
            if name and mask & (_LISTING_EVENTS | _ENTRY_EVENTS):
                self._sink.changed(directory / name)
            if not name or mask & (_LISTING_EVENTS | _SELF_GONE_EVENTS):
                self._sink.changed(directory)
        if mask & pyinotify.IN_MOVE_SELF:
            # The watch follows the moved inode, no longer the paths: poll the paths instead.
            for directory in list(directories):
                self._sink.lost(directory, wd)
                self.release(directory, wd)
