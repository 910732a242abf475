"""Open what a request path names, strictly beneath the served root.

Two mechanisms, chosen once per process:

- openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (Linux >= 5.6): the kernel refuses any
  resolution that would leave the root (`..`, absolute symlinks, symlinks pointing outside), so
  symlinks that stay inside the root are followed.
- Otherwise a walk component by component from the root descriptor with O_NOFOLLOW: no symlink is
  followed at all.

Opening happens in two steps: first O_PATH (no side effect even on a device node or FIFO), then,
only for regular files and directories, a real non-blocking open whose inode is compared with the
first, so a FIFO swapped in between can neither block the event loop nor be served.

On a distributed file system an entry can be replaced through another mount between the two
steps (or between opening and fstat): GlusterFS then answers ESTALE, or ENOENT from a descriptor
just opened, for the replaced inode. Such an entry is looked up again (a few times), so a file
being replaced elsewhere is served as one version or the other, never as missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..syscalls import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, openat2


def _openat2(dirfd: int, path: str, flags: int) -> int:
    return openat2(dirfd, path, flags | os.O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)


def _probe_openat2() -> bool:
    rootfd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        os.close(_openat2(rootfd, ".", os.O_PATH))
    except OSError:
        return False
    finally:
        os.close(rootfd)
    return True


class Root:
    """An open directory that requests are resolved beneath."""

    def __init__(self, path: str | os.PathLike[str], *, use_openat2: bool | None = None) -> None:
        #: Absolute, without `.` or `..`: the form change reports beneath it are made in.
        self.path = Path(os.path.abspath(path))
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.use_openat2 = _HAS_OPENAT2 if use_openat2 is None else use_openat2

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stat(self, segments: Sequence[str], *, follow_links: bool = True) -> os.stat_result:
        """The entry's stat, from an O_PATH descriptor: no side effect even on a FIFO or device
        (symlinks followed only inside the root, and with `follow_links` only)."""
        flags = os.O_PATH if follow_links else os.O_PATH | os.O_NOFOLLOW
        return _again(lambda: self._stat_once(segments, flags))

    def _stat_once(self, segments: Sequence[str], flags: int) -> os.stat_result:
        try:
            fd = self._open(segments, flags)
        except OSError as e:
            if e.errno == errno.ESTALE:
                raise _Replaced(e) from None
            raise  # ENOENT from the lookup: nothing at the name
        try:
            return os.fstat(fd)
        except OSError as e:
            if e.errno in REPLACED_MEANWHILE:
                raise _Replaced(e) from None
            raise
        finally:
            os.close(fd)

    def names_a_link(self, segments: Sequence[str]) -> bool:
        """Whether the last segment is itself a symbolic link: what is read through it lives in
        another directory than the path names, so watching that directory would not see it."""
        if not segments:
            return False
        try:
            return stat.S_ISLNK(self.stat(segments, follow_links=False).st_mode)
        except OSError:
            return False

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the directory being served (which its path may no longer name)."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    def open_for_reading(self, segments: Sequence[str]) -> tuple[int, os.stat_result]:
        """A readable descriptor on a regular file or directory and its stat; anything else
        (FIFO, socket, device) or a path leaving the root raises OSError."""
        return _again(lambda: self._open_for_reading_once(segments))

    def _open_for_reading_once(self, segments: Sequence[str]) -> tuple[int, os.stat_result]:
        st = self._stat_once(segments, os.O_PATH)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENOENT, "Not a regular file or directory")
        try:
            fd = self._open(segments, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            if e.errno in REPLACED_MEANWHILE:  # it was there a moment ago: look again
                raise _Replaced(e) from None
            raise
        try:
            st2 = os.fstat(fd)
        except OSError as e:
            close_quietly(fd)
            if e.errno in REPLACED_MEANWHILE:
                raise _Replaced(e) from None
            raise
        if (st2.st_ino, st2.st_dev) != (st.st_ino, st.st_dev):
            close_quietly(fd)
            raise _Replaced(OSError(errno.ENOENT, "Entry changed while opening it"))
        return fd, st2

    def open_parent(self, segments: Sequence[str]) -> int:
        """A readable descriptor on the directory that holds the last (non-empty) segment."""
        return self._open(segments[:-1], os.O_RDONLY | os.O_DIRECTORY)

    def _open(self, segments: Sequence[str], flags: int) -> int:
        if not segments:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)
        if self.use_openat2:
            return _openat2(self.fd, "/".join(segments), flags)
        return self._walk(segments, flags)

    def _walk(self, segments: Sequence[str], flags: int) -> int:
        """Fallback for kernels without openat2: one component at a time, never following a link."""
        cur = self.fd
        intermediate = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            for s in segments[:-1]:
                nxt = os.open(s, intermediate, dir_fd=cur)
                if cur != self.fd:
                    os.close(cur)
                cur = nxt
            return os.open(segments[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
        finally:
            if cur != self.fd:
                os.close(cur)


_HAS_OPENAT2 = _probe_openat2()

#: What an entry replaced meanwhile through another mount answers (GlusterFS): ESTALE, or ENOENT
#: from a descriptor opened a moment before (fstat, flock, even close). Look at the name again.
REPLACED_MEANWHILE = (errno.ENOENT, errno.ESTALE)
#: Looks at an entry that keeps being replaced before its last error is raised.
_ATTEMPTS = 5

T = TypeVar("T")


class _Replaced(Exception):
    """The entry was replaced while it was being opened; `error` is what the system said."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def _again(attempt: Callable[[], T]) -> T:
    """`attempt()`, repeated while the entry it opens is replaced meanwhile (at most
    _ATTEMPTS times; then the last error is raised)."""
    for _ in range(_ATTEMPTS - 1):
        try:
            return attempt()
        except _Replaced:
            continue
    try:
        return attempt()
    except _Replaced as e:
        raise e.error from None


def close_quietly(fd: int) -> None:
    """Close a descriptor only read from (or opened only to lock), which close(2) frees even
    when it reports an error, as GlusterFS does (ENOENT, from FUSE's flush) for a file replaced
    through another mount meanwhile: there is nothing to lose, so no error here may fail a
    write that is done, or a check still to come."""
    with contextlib.suppress(OSError):
        os.close(fd)
