"""What is stored with a file beside its content: the Content-Format a PUT gave it, in an
extended attribute (`user.coap.content_format`, the number in decimal). Where the file system
has no user extended attributes (some FUSE and network file systems; tmpfs before Linux 6.6),
nothing is stored and the format is guessed from the name, as for any other file."""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

CONTENT_FORMAT = "user.coap.content_format"
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)


def content_format(fd: int) -> int | None:
    """The stored Content-Format of an open file, or None."""
    try:
        value = os.getxattr(fd, CONTENT_FORMAT)
    except OSError:
        return None  # ENODATA (none stored), or no extended attributes here
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number <= 65535 else None


def store_content_format(fd: int, number: int) -> bool:
    """Store `number` with an open file; False where the file system cannot."""
    try:
        os.setxattr(fd, CONTENT_FORMAT, str(number).encode("ascii"))
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            log.debug("Content-Format %d not stored: %s", number, e.strerror)
            return False
        raise
    return True
