"""An upload on its way to disk: an unnamed file in the directory it is for (Linux O_TMPFILE),
filled as blocks arrive and linked into place in one step once complete, so that no half-written
or temporary name is ever visible, listed, served, or left behind by a crash or `kill -9`.

Where the file system cannot make unnamed files (FUSE, some network file systems) the spool is a
hidden `SPOOL_PREFIX` file beside the target, which `sweep` removes at start-up if a crash left
it. Its writer holds a shared lock (flock) on it until it is committed or dropped, so that no
sweep — of this server or of another one sharing the file system, whatever its clock or its
idle_timeout — removes an upload in progress (a crashed writer's lock goes with it).

Committing replaces the target under an exclusive lock (flock) on the file being replaced,
taken before the preconditions are checked and held until the rename: two writers with the same
If-Match never both win, within one server and across servers sharing the file system where it
honours flock (GlusterFS does)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
import stat
from collections.abc import Callable

from .attributes import store_content_format
from .hidden import SPOOL_PREFIX
from .locks import locked_existing
from .write import Place, fsync_directory

#: A precondition check, given the stat of the file now at the name (None: no file).
Check = Callable[[os.stat_result | None], None]


class NameTaken(Exception):
    """A file appeared at the name while a create-only (If-None-Match) write was in progress."""


@functools.cache
def _tmpfile_linkable() -> bool:
    """O_TMPFILE files are linked through /proc/self/fd (linkat with AT_EMPTY_PATH would
    need CAP_DAC_READ_SEARCH)."""
    return os.path.isdir("/proc/self/fd")


class Spool:
    """The upload for `place`; `write` appends, `commit` puts it in place, `discard` drops it."""

    def __init__(self, place: Place, mode: int) -> None:
        self.place = place
        self.size = 0
        self._name: str | None = None  # the hidden name of a named spool
        try:
            if not _tmpfile_linkable():
                raise OSError(errno.EOPNOTSUPP, "no /proc/self/fd")
            self._fd = os.open(
                ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=place.parent
            )
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
            self._name = f"{SPOOL_PREFIX}{secrets.token_hex(8)}"
            self._fd = os.open(
                self._name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=place.parent,
            )
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # in use: see `write.spool_in_use`
            except BaseException:
                self.discard()
                raise

    @property
    def open(self) -> bool:
        return self._fd >= 0

    def write(self, data: bytes) -> None:
        """Append `data` (a block: small, so written on the event loop, to the page cache)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self.size)
            self.size += written
            view = view[written:]

    def discard(self) -> None:
        """Drop the upload: an unnamed file is freed with its descriptor; a named one unlinked."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._name, dir_fd=self.place.parent)
            self._name = None
        self.place.close()

    def commit(
        self, check: Check, *, create_only: bool, content_format: int | None
    ) -> tuple[os.stat_result, bool]:
        """Put the upload at its name: the new file's stat, and whether it was created (not
        replaced). `check` sees what is at the name under the lock and may raise. Blocking:
        runs in a worker thread."""
        os.fsync(self._fd)
        if content_format is not None:
            store_content_format(self._fd, content_format)
        parent, name = self.place.parent, self.place.name
        with locked_existing(parent, name) as existing:
            check(existing)
            if existing is None:
                self._link_new(create_only)
            else:
                os.fchmod(self._fd, _kept_mode(existing))
                self._replace()
            fsync_directory(parent)
            _unlock(self._fd)  # no spool any more: the file at the name
            return os.fstat(self._fd), existing is None

    def _link_new(self, create_only: bool) -> None:
        """Give the file its name, failing if one appeared meanwhile (If-None-Match)."""
        parent, name = self.place.parent, self.place.name
        try:
            self._link_to(name)
        except FileExistsError:
            if create_only:
                raise NameTaken() from None
            self._replace()  # created by someone else meanwhile: last writer wins
            return
        if self._name is not None:
            os.unlink(self._name, dir_fd=parent)
            self._name = None

    def _replace(self) -> None:
        parent, name = self.place.parent, self.place.name
        if self._name is None:
            # An unnamed file can only be linked to a free name: link it hidden, then rename.
            hidden = f"{SPOOL_PREFIX}{secrets.token_hex(8)}"
            self._link_to(hidden)
            self._name = hidden
        os.rename(self._name, name, src_dir_fd=parent, dst_dir_fd=parent)
        self._name = None

    def _link_to(self, name: str) -> None:
        parent = self.place.parent
        if self._name is None:
            os.link(f"/proc/self/fd/{self._fd}", name, dst_dir_fd=parent, follow_symlinks=True)
        else:
            os.link(self._name, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


def _kept_mode(existing: os.stat_result) -> int:
    """A replaced file's permission bits, never setuid, setgid or sticky: new content must not
    inherit privileges granted to the old."""
    return stat.S_IMODE(existing.st_mode) & 0o777
