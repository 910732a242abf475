"""An exclusive lock on the regular file at a name, taken before a precondition is checked and
held until the write or delete that depends on it is done: flock, which holds between processes
and, where the file system honours it, between servers sharing the files (GlusterFS does)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from .problems import Forbidden, NotAFile
from .root import REPLACED_MEANWHILE, close_quietly


@contextlib.contextmanager
def locked_existing(parent: int, name: str) -> Iterator[os.stat_result | None]:
    """The regular file at `name` (its stat), exclusively locked (flock) until the block ends;
    None if there is none. Symbolic links and directories at the name are refused. A file
    replaced while we waited for its lock, here or through another mount, is let go and the one
    now at the name locked instead."""
    for _attempt in range(20):
        try:
            lst = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            yield None
            return
        _refuse_non_file(lst)
        locked = _lock(parent, name)
        if locked is None:
            continue
        fd, st = locked
        try:
            _refuse_non_file(st)
            yield st
            return
        finally:
            close_quietly(fd)
    raise OSError(errno.EBUSY, "The file keeps changing")


def _lock(parent: int, name: str) -> tuple[int, os.stat_result] | None:
    """The file at `name` opened and exclusively locked, with its stat; None if it was removed
    or replaced before it was locked."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as e:
        if e.errno in REPLACED_MEANWHILE:
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as e:
        close_quietly(fd)
        if e.errno in REPLACED_MEANWHILE:
            return None
        raise
    if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
        close_quietly(fd)
        return None
    return fd, st


def _refuse_non_file(st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise NotAFile()
    if not stat.S_ISREG(st.st_mode):
        raise Forbidden("Only regular files can be written or deleted")
