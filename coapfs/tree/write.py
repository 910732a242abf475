"""Changing the tree: a file replaced in one step, or deleted, at a name whose parent is open.

`Place` is where a write lands: decided (and its current file stat'ed) before any byte is
written, so that preconditions are checked against what is there."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from dataclasses import dataclass

from .hidden import SPOOL_PREFIX
from .path import Target
from .problems import Forbidden, NotAFile, NotFound
from .root import Root


class NameTaken(Exception):
    """A file appeared at the name while a no-replace write was in progress."""


@dataclass
class Place:
    """The name a write is for: its parent directory (open) and the regular file there now
    (None if there is none)."""

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


def open_place(root: Root, target: Target, directory_refusal: str) -> Place:
    """The place for a write to `target` (a file name); directories and symbolic links there are
    refused, so a write never reaches past the name it was sent to."""
    try:
        parent = root.open_parent(target.segments)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound("Parent directory does not exist") from None
    try:
        try:
            lst = os.stat(target.segments[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return Place(target, parent, None)
        if stat.S_ISDIR(lst.st_mode):
            raise NotAFile(f"Is a directory: {directory_refusal}")
        if not stat.S_ISREG(lst.st_mode):
            raise Forbidden("Only regular files can be written or deleted")
        return Place(target, parent, lst)
    except BaseException:
        os.close(parent)
        raise


def replace_atomically(place: Place, data: bytes, *, no_replace: bool) -> os.stat_result:
    """Write `data` to a hidden spool file beside the name, then move it into place in one step.

    Readers see either the old or the new content, never a mix. With `no_replace` the move is a
    hard link, which fails (NameTaken) instead of replacing a file created meanwhile. Runs in a
    worker thread (the writes and fsync can be slow)."""
    parent, name = place.parent, place.name
    spool = f"{SPOOL_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(
        spool,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o666,
        dir_fd=parent,
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if place.existing is not None:
            os.fchmod(fd, stat.S_IMODE(place.existing.st_mode))
        os.fsync(fd)
        if no_replace:
            try:
                os.link(spool, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            except FileExistsError:
                raise NameTaken() from None
            os.unlink(spool, dir_fd=parent)
        else:
            os.rename(spool, name, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
        return os.fstat(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool, dir_fd=parent)
        raise
    finally:
        os.close(fd)


def delete(place: Place) -> None:
    if place.existing is None:
        raise NotFound()
    os.unlink(place.name, dir_fd=place.parent)


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
    """Bytes an unprivileged writer may still use on the file system holding the root."""
    st = os.fstatvfs(root.fd)
    return st.f_bavail * st.f_frsize
