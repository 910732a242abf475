"""The Linux system calls Python's `os` module lacks, through one handle on libc: openat2(2)
(resolution confined beneath a directory) and statfs(2) (the file system's type)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

_SYS_OPENAT2 = 437  # the same number on every Linux architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); retried on EINTR/EAGAIN (RESOLVE_* races), OSError otherwise."""
    how = _OpenHow(flags, mode, resolve)
    encoded = os.fsencode(path)
    while True:
        fd = _libc.syscall(
            _SYS_OPENAT2,
            ctypes.c_int(dirfd),
            encoded,
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err), path)


# f_type is the first member of struct statfs: a long, except on s390x (an unsigned int).
_FSWORD = ctypes.c_uint if platform.machine().startswith("s390") else ctypes.c_ulong


def statfs_type(path: str | os.PathLike[str]) -> int:
    """statfs(2) f_type of the file system holding `path` (os.statvfs does not report it)."""
    buffer = ctypes.create_string_buffer(512)  # larger than struct statfs on any architecture
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(path))
    return int(_FSWORD.from_buffer(buffer).value) & 0xFFFFFFFF
