"""Tell which paths under the served root changed on disk: inotify where it can be trusted,
stat polling where it cannot.

This is the only module that touches pyinotify. The rest of the server sees this interface::

    watcher = Watcher(root, on_change, on_reset, mode="auto", watch_budget=1024,
                      poll_interval=2.0, loop=None)
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
machines' changes (NFS, CIFS/SMB, FUSE, Ceph, 9p, AFS, cluster filesystems; found with
statfs(2)) is polled, and when the root is such a filesystem the whole watcher runs in poll
mode. More than ``watch_budget`` inotify watches, or ENOSPC/ENOMEM from inotify_add_watch, demote
the least recently used directory to polling; if no watch of ours is left to give up, the
watcher switches to poll mode for good. Mode "poll" polls everything; mode "inotify" trusts
inotify on any filesystem. The mode is logged (logger "coapfs.watch") at start and on change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import platform
import re
import stat as stat_mode
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # its asyncore import, unused here
    import pyinotify

__all__ = ["Watcher", "filesystem_type", "inotify_sees_all_changes"]

logger = logging.getLogger("coapfs.watch")

MODES = ("auto", "inotify", "poll")

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

# statfs(2) f_type of filesystems whose changes made elsewhere never reach this kernel's inotify.
_REMOTE_MAGIC = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x0BD00BD0: "lustre",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x47504653: "gpfs",
}
_LOCAL_MAGIC = {
    0xEF53: "ext4",
    0x01021994: "tmpfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlay",
    0xF2F52010: "f2fs",
    0x2FC12FC1: "zfs",
    0x4D44: "vfat",
    0x5346544E: "ntfs",
    0x2011BAB0: "exfat",
    0x73717368: "squashfs",
    0x9660: "iso9660",
    0x858458F6: "ramfs",
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1373: "devtmpfs",
}

# f_type is the first member of struct statfs: a long, except on s390x (an unsigned int).
_FSWORD = ctypes.c_uint if platform.machine().startswith("s390") else ctypes.c_ulong
_libc = ctypes.CDLL(None, use_errno=True)


def filesystem_magic(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding path (os.statvfs does not report it)."""
    buffer = ctypes.create_string_buffer(512)  # larger than struct statfs on any architecture
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return _FSWORD.from_buffer(buffer).value & 0xFFFFFFFF


def filesystem_type(path: Path) -> str:
    """Name of the filesystem type holding path, e.g. "ext4", "tmpfs", "nfs", or "0x1234"."""
    magic = filesystem_magic(path)
    return _REMOTE_MAGIC.get(magic) or _LOCAL_MAGIC.get(magic) or f"{magic:#x}"


def inotify_sees_all_changes(path: Path) -> tuple[bool, str]:
    """Whether inotify on path's filesystem reports every change, and that filesystem's type."""
    magic = filesystem_magic(path)
    if magic in _REMOTE_MAGIC:
        return False, _REMOTE_MAGIC[magic]
    return True, _LOCAL_MAGIC.get(magic, f"{magic:#x}")


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

_StatSignature = tuple[int, int, int, int, int]
_Snapshot = dict[str, _StatSignature | None]  # "" is the directory itself, else entry names


def _signature(stat: os.stat_result) -> _StatSignature:
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _snapshot(directory: Path) -> _Snapshot:
    """Stat the directory and every entry in it (following symlinks, as serving does)."""
    try:
        snapshot: _Snapshot = {"": _signature(os.stat(directory))}
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    snapshot[entry.name] = _signature(entry.stat())
                except OSError:
                    try:
                        snapshot[entry.name] = _signature(entry.stat(follow_symlinks=False))
                    except OSError:
                        continue  # removed meanwhile
    except OSError:
        return {"": None}
    return snapshot


def _snapshots(directories: list[Path]) -> list[_Snapshot]:
    return [_snapshot(directory) for directory in directories]


def _differences(directory: Path, old: _Snapshot, new: _Snapshot) -> list[Path]:
    """Paths to report for the change from old to new, entries before their directory."""
    changed: list[Path] = []
    listing_changed = old.keys() != new.keys()
    for name in old.keys() | new.keys():
        if name and old.get(name) != new.get(name):
            changed.append(directory / name)
    if listing_changed or old.get("") != new.get(""):
        changed.append(directory)
    return changed


_ERRNO_NAME = re.compile(r"\((E[A-Z0-9]+)\)")


def _add_watch_errno(error: pyinotify.WatchManagerError) -> int | None:
    """errno of a failed inotify_add_watch, as pyinotify words it in its exception."""
    match = _ERRNO_NAME.search(str(error))
    return getattr(errno, match.group(1), None) if match else None


class _Notifier(pyinotify.AsyncioNotifier):
    """pyinotify's asyncio notifier, surviving file names that are not UTF-8."""

    def handle_read(self, *args: object, **kwargs: object) -> None:
        try:
            self.read_events()
        except UnicodeDecodeError:
            # pyinotify decodes names strictly; the records after such a name are lost.
            self.append_event(pyinotify._RawEvent(-1, pyinotify.IN_Q_OVERFLOW, 0, ""))
        self.process_events()
        if self.handle_read_callback is not None:
            self.handle_read_callback(self)


class Watcher:
    """Tells which paths changed on disk; inotify where trustworthy, stat polling otherwise."""

    def __init__(
        self,
        root: Path,
        on_change: Callable[[Path], None],
        on_reset: Callable[[Path], None],
        *,
        mode: str = "auto",
        watch_budget: int = 1024,
        poll_interval: float = 2.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"watch mode must be one of {', '.join(MODES)}, not {mode!r}")
        if watch_budget < 1:
            raise ValueError("watch budget must be at least 1")
        if not poll_interval > 0:
            raise ValueError("poll interval must be positive")
        self.root = Path(os.path.abspath(root))
        self._on_change = on_change
        self._on_reset = on_reset
        self._requested_mode = mode
        self.watch_budget = watch_budget
        self.poll_interval = poll_interval
        self._loop = loop
        self.mode = "poll" if mode == "poll" else "inotify"
        self._watch_manager: pyinotify.WatchManager | None = None
        self._notifier: _Notifier | None = None
        self._inotify: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        # One kernel watch per inode: every watched path leading to that directory shares it.
        self._by_wd: dict[int, set[Path]] = {}
        self._polled: dict[Path, _Snapshot] = {}
        self._poll_task: asyncio.Task[None] | None = None
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
        root_stat = os.stat(self.root)
        trusted, fstype = inotify_sees_all_changes(self.root)
        self._trusted_devices[root_stat.st_dev] = (trusted, fstype)
        if self._requested_mode == "poll":
            reason = "configured"
        elif self._requested_mode == "auto" and not trusted:
            self.mode = "poll"
            reason = f"{fstype}: inotify does not see changes made by other machines"
        else:
            reason = fstype if trusted else f"{fstype}, trusted by configuration"
            try:
                self._open_inotify()
            except OSError as error:  # e.g. EMFILE: fs.inotify.max_user_instances reached
                self.mode = "poll"
                reason = f"cannot use inotify: {error}"
        if self.mode == "poll":
            logger.info(
                "watching %s by polling every %g s (%s)", self.root, self.poll_interval, reason
            )
        else:
            logger.info("watching %s with inotify (%s)", self.root, reason)

    def _open_inotify(self) -> None:
        self._watch_manager = pyinotify.WatchManager()
        try:
            self._notifier = _Notifier(
                self._watch_manager,
                self._loop,
                callback=self._after_read,
                default_proc_fun=self._process_event,
            )
        except BaseException:
            self._watch_manager.close()
            self._watch_manager = None
            raise

    def close(self) -> None:
        """Stop watching; no callback runs after this returns."""
        if self._closed:
            return
        self._closed = True
        self._close_inotify()
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        self._polled.clear()
        self._pending.clear()

    def _close_inotify(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()  # removes the reader and closes the inotify descriptor
        self._notifier = None
        self._watch_manager = None
        self._inotify.clear()
        self._by_wd.clear()

    def watch_directory(self, path: Path) -> bool:
        """Watch directory path and its entries (idempotent; marks it most recently used).

        Returns True when inotify watches it, False when it is polled. Raises ValueError for a
        path outside root and OSError when path is not an accessible directory.
        """
        if path in self._inotify:  # the per-request case: no path arithmetic, no system call
            self._inotify.move_to_end(path)
            return True
        path = self._checked(path)
        if not self._started or self._closed:
            raise RuntimeError("watcher is not running")
        if path in self._inotify:
            self._inotify.move_to_end(path)
            return True
        stat = os.stat(path)
        if not stat_mode.S_ISDIR(stat.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        if self.mode == "inotify" and self._device_trusted(path, stat.st_dev):
            was_polled = self._polled.pop(path, None)
            if self._add_inotify(path):
                if was_polled is not None:
                    # Report what changed since the last poll, which no poll will see now.
                    self._queue_differences(path, was_polled, _snapshot(path))
                return True
            if was_polled is not None:
                self._polled[path] = was_polled
        if path not in self._polled:
            self._polled[path] = _snapshot(path)
        self._ensure_polling()
        return False

    def unwatch_directory(self, path: Path) -> None:
        """Stop watching directory path (no-op when it is not watched)."""
        path = self._checked(path)
        self._polled.pop(path, None)
        wd = self._inotify.pop(path, None)
        if wd is not None:
            self._release(path, wd)

    def watched_directories(self) -> dict[Path, bool]:
        """Every watched directory, mapped to whether inotify (True) or polling watches it."""
        watched = dict.fromkeys(self._polled, False)
        watched.update(dict.fromkeys(self._inotify, True))
        return watched

    def simulate_overflow(self) -> None:
        """Test hook: feed an IN_Q_OVERFLOW record through the path real kernel records take.

        Unlike the kernel's records, it reports (on_reset(root)) before returning.
        """
        if self._notifier is not None:
            self._notifier.append_event(pyinotify._RawEvent(-1, pyinotify.IN_Q_OVERFLOW, 0, ""))
            self._notifier.process_events()
            self._after_read(self._notifier)
        else:
            self._queue(self.root, reset=True)
            self._flush()

    def _checked(self, path: Path) -> Path:
        path = Path(os.path.abspath(path))
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"{path} is not beneath {self.root}")
        return path

    def _device_trusted(self, path: Path, device: int) -> bool:
        if self._requested_mode == "inotify":
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
                    self.poll_interval,
                )
        return self._trusted_devices[device][0]

    def _add_inotify(self, path: Path) -> bool:
        """Add an inotify watch within budget and kernel limits, demoting LRU watches to polling."""
        assert self._watch_manager is not None
        while len(self._inotify) >= self.watch_budget:
            self._demote_least_recent()
        while True:
            try:
                result = self._watch_manager.add_watch(str(path), _DIRECTORY_MASK, quiet=False)
            except UnicodeEncodeError:
                return False  # pyinotify encodes paths strictly; poll a name that is not UTF-8
            except pyinotify.WatchManagerError as error:
                code = _add_watch_errno(error)
                if code not in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(code or errno.EIO, f"cannot watch {path}: {error}") from None
                if self._inotify:
                    self._demote_least_recent()
                    continue
                self._switch_to_poll(f"inotify watch limit reached ({errno.errorcode[code]})")
                return False
            wd = result[os.path.normpath(str(path))]
            break
        # The kernel returns the existing descriptor for an inode that is already watched,
        # e.g. the same directory reached by two paths: the paths share it.
        self._inotify[path] = wd
        self._by_wd.setdefault(wd, set()).add(path)
        return True

    def _release(self, path: Path, wd: int) -> None:
        """Drop path's share of watch wd; remove the kernel watch when no path is left on it."""
        paths = self._by_wd.get(wd)
        if paths is not None:
            paths.discard(path)
            if paths:
                return  # another path to the same directory still uses it
            del self._by_wd[wd]
        if self._watch_manager is None or self._watch_manager.get_watch(wd) is None:
            return  # the kernel has dropped it already (IN_IGNORED processed)
        # It fails when the kernel dropped the watch and its IN_IGNORED record is still queued.
        with contextlib.suppress(pyinotify.WatchManagerError):
            self._watch_manager.rm_watch(wd, quiet=False)

    def _demote_least_recent(self) -> None:
        """Move the least recently used inotify watch to polling."""
        path, wd = self._inotify.popitem(last=False)
        self._polled[path] = _snapshot(path)
        self._release(path, wd)
        self._queue(path, reset=True)
        self._ensure_polling()

    def _switch_to_poll(self, reason: str) -> None:
        if self.mode == "poll":
            return
        logger.warning(
            "watching %s by polling every %g s from now on (%s)",
            self.root,
            self.poll_interval,
            reason,
        )
        self.mode = "poll"
        for path in self._inotify:
            self._polled[path] = _snapshot(path)
        self._close_inotify()
        self._queue(self.root, reset=True)
        self._ensure_polling()

    def _process_event(self, event: pyinotify.Event) -> None:
        """pyinotify's processing function: turn one kernel record into pending reports."""
        mask = event.mask
        if mask & pyinotify.IN_Q_OVERFLOW:
            self._queue(self.root, reset=True)
            return
        directories = self._by_wd.get(event.wd)
        if not directories:
            return  # a record for a watch we have removed
        if mask & pyinotify.IN_IGNORED:
            # The kernel dropped the watch: the directory is gone or its filesystem unmounted.
            del self._by_wd[event.wd]
            for directory in directories:
                self._poll_instead(directory, event.wd)
                self._queue(directory)
            self._ensure_polling()
            return
        name = event.name
        for directory in directories:
            if name and mask & (_LISTING_EVENTS | _ENTRY_EVENTS):
                self._queue(directory / name)
            if not name or mask & (_LISTING_EVENTS | _SELF_GONE_EVENTS):
                self._queue(directory)
        if mask & pyinotify.IN_MOVE_SELF:
            # The watch follows the moved inode, no longer the paths: poll the paths instead.
            for directory in list(directories):
                self._poll_instead(directory, event.wd)
                self._release(directory, event.wd)
            self._ensure_polling()

    def _poll_instead(self, directory: Path, wd: int) -> None:
        """Poll directory from now on if inotify watched it through wd."""
        if self._inotify.get(directory) == wd:
            del self._inotify[directory]
            self._polled[directory] = _snapshot(directory)

    def _after_read(self, notifier: pyinotify.Notifier) -> None:
        self._flush()

    def _queue(self, path: Path, *, reset: bool = False) -> None:
        if self._pending.get(path) is None or reset:
            self._pending.pop(path, None)
            self._pending[path] = reset

    def _queue_differences(self, directory: Path, old: _Snapshot, new: _Snapshot) -> None:
        for path in _differences(directory, old, new):
            self._queue(path)
        if self._pending and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Report pending paths, each once, to the consumer."""
        while self._pending and not self._closed:
            path, reset = next(iter(self._pending.items()))
            del self._pending[path]
            callback = self._on_reset if reset else self._on_change
            try:
                callback(path)
            except Exception:
                logger.exception("watch callback failed for %s", path)

    def _ensure_polling(self) -> None:
        if self._poll_task is None and self._polled and not self._closed:
            assert self._loop is not None
            self._poll_task = self._loop.create_task(self._poll_forever())
        if self._pending and self._loop is not None:
            self._loop.call_soon(self._flush)

    async def _poll_forever(self) -> None:
        """Every poll_interval, stat the polled directories (off the loop) and report changes."""
        assert self._loop is not None
        try:
            while self._polled:
                await asyncio.sleep(self.poll_interval)
                directories = list(self._polled)
                snapshots = await self._loop.run_in_executor(None, _snapshots, directories)
                for directory, new in zip(directories, snapshots, strict=True):
                    old = self._polled.get(directory)
                    if old is None:
                        continue  # unwatched or promoted to inotify meanwhile
                    self._polled[directory] = new
                    for path in _differences(directory, old, new):
                        self._queue(path)
                self._flush()
        finally:
            if self._poll_task is asyncio.current_task():
                self._poll_task = None
