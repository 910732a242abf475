"""Changing the tree, at a name whose parent directory is open: deleting a file, making and
deleting directories (files are written through `spool`), and the checks around writing.

`Place` is where a write lands: decided (and what is there now stat'ed, without following a
link) before any byte is written, so that preconditions are checked against what is there."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .hidden import SPOOL_PREFIX, TRASH_PREFIX
from .locks import locked_existing
from .path import Target
from .problems import Conflict, Forbidden, NotAFile, NotFound
from .root import Root, close_quietly

log = logging.getLogger(__name__)


class NotEmpty(Exception):
    """A directory to be deleted only if empty is not."""


@dataclass
class Place:
    """The name a write is for: its parent directory (open) and what is there now (its lstat;
    None if nothing)."""

    target: Target
    parent: int
    existing: os.stat_result | None

    @property
    def name(self) -> str:
        return self.target.segments[-1]

    def close(self) -> None:
        if self.parent >= 0:
            os.close(self.parent)
            self.parent = -1


def open_place(root: Root, target: Target) -> Place:
    """The place for a write to `target` (not the root). Symbolic links at the name, and
    anything but regular files and directories, are refused: a write never reaches past the
    name it was sent to. A directory named without its trailing slash (or a file with one)
    is refused too."""
    try:
        parent = root.open_parent(target.segments)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound("Parent directory does not exist") from None
    try:
        try:
            lst = os.stat(target.segments[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return Place(target, parent, None)
        if stat.S_ISDIR(lst.st_mode) and not target.is_dir_request:
            raise NotAFile()
        if stat.S_ISREG(lst.st_mode) and target.is_dir_request:
            raise Conflict("A file of that name exists (strip the trailing slash to write it)")
        if not (stat.S_ISREG(lst.st_mode) or stat.S_ISDIR(lst.st_mode)):
            raise Forbidden("Only regular files and directories can be written or deleted")
        return Place(target, parent, lst)
    except BaseException:
        os.close(parent)
        raise


def fsync_directory(fd: int) -> None:
    """Make a directory's new entries durable (not every file system can: then it is skipped)."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise


def delete_file(place: Place, check: Callable[[os.stat_result | None], None]) -> None:
    """Unlink the file at the place once `check` (the preconditions) passed for it, under the
    lock writers take (`locks`): a PUT replacing it meanwhile is either before (and `check` sees
    the new file) or after (and finds nothing)."""
    with locked_existing(place.parent, place.name) as existing:
        if existing is None:
            raise NotFound()
        check(existing)
        os.unlink(place.name, dir_fd=place.parent)


def make_directory(place: Place, mode: int) -> os.stat_result:
    """Create the directory at the place; EEXIST if something appeared meanwhile."""
    os.mkdir(place.name, mode, dir_fd=place.parent)
    fsync_directory(place.parent)
    return os.stat(place.name, dir_fd=place.parent, follow_symlinks=False)


def delete_directory(place: Place, *, only_if_empty: bool) -> None:
    """Delete the directory at the place. With `only_if_empty`, NotEmpty unless it is. Otherwise
    it is first renamed to a hidden name (it disappears for clients at once), then removed with
    everything in it, following no link (shutil.rmtree on descriptors): nothing outside it is
    touched. Blocking: runs in a worker thread."""
    if place.existing is None:
        raise NotFound()
    if only_if_empty:
        try:
            os.rmdir(place.name, dir_fd=place.parent)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise NotEmpty() from None
            raise
        return
    trash = f"{TRASH_PREFIX}{secrets.token_hex(8)}"
    os.rename(place.name, trash, src_dir_fd=place.parent, dst_dir_fd=place.parent)
    fsync_directory(place.parent)
    _remove_tree(place.parent, trash)


def _remove_tree(parent: int, name: str) -> None:
    try:
        where = os.readlink(f"/proc/self/fd/{parent}")
    except OSError:
        where = "."

    def complain(path: str, error: BaseException | None) -> None:
        log.warning(
            "Could not remove %s of a deleted directory (hidden from clients; tried again at "
            "the next start, or remove it by hand): %s",
            os.path.join(where, path),
            getattr(error, "strerror", None) or error,
        )

    if sys.version_info >= (3, 12):
        shutil.rmtree(name, dir_fd=parent, onexc=lambda _f, path, e: complain(path, e))
    else:
        shutil.rmtree(name, dir_fd=parent, onerror=lambda _f, path, info: complain(path, info[1]))


def sweep(root: Root, older_than: float) -> int:
    """Remove what interrupted writes left beneath the root: named spools and renamed-away
    directories not touched for `older_than` seconds (younger ones may belong to a write in
    progress, by this or another server on the same files), and of the spools only those no
    writer holds locked (`spool_in_use`). How many were removed."""
    removed = 0
    cutoff = time.time() - older_than
    for _directory, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=root.fd):
        for name in [*filenames, *dirnames]:
            if not name.startswith((SPOOL_PREFIX, TRASH_PREFIX)):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if st.st_mtime > cutoff:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    _remove_tree(dirfd, name)
                elif name.startswith(SPOOL_PREFIX) and spool_in_use(dirfd, name):
                    continue
                else:
                    os.unlink(name, dir_fd=dirfd)
                removed += 1
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return removed


def spool_in_use(parent: int, name: str) -> bool:
    """Whether the spool file `name` belongs to an upload in progress, by this or another server
    sharing the file system: its writer holds a lock on it (`spool.Spool`). False also when it is
    gone, or cannot be opened (the unlink will tell)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        close_quietly(fd)
    return False


def unwritable_reason(root: Root) -> str | None:
    """Why nothing could be created in the root by this process, or None: a read-only mount
    (e.g. systemd's ProtectSystem=strict without ReadWritePaths=) or missing permission."""
    if os.fstatvfs(root.fd).f_flag & os.ST_RDONLY:
        return "it is on a read-only mount"
    if not os.access(root.path, os.W_OK | os.X_OK):
        return f"user {_user_name()} lacks write permission"
    return None


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def space_left(root: Root) -> int:
    """Bytes an unprivileged writer may still use on the file system holding the root; where it
    reports no sizes at all (ramfs, some FUSE file systems) only a failed write can tell."""
    st = os.fstatvfs(root.fd)
    if st.f_blocks == 0:
        return sys.maxsize
    return st.f_bavail * st.f_frsize
