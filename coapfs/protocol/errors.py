"""The client-facing errors: every request problem becomes a 4.xx (or a named 5.03) with a short
diagnostic payload, so that nothing a client sends can end in a 5.00 or a traceback. The tree's
problems (`tree.problems`) and OS errors get their response codes here."""

from __future__ import annotations

import errno
import logging

import aiocoap.error
from aiocoap.numbers import codes

from ..tree import problems

log = logging.getLogger("coapfs")

#: The largest Max-Age there is (RFC 7252 5.10.5: a 4-byte unsigned integer).
MAX_AGE_LIMIT = 2**32 - 1


class ReadOnly(aiocoap.error.MethodNotAllowed):
    message = "This server is read-only"


class Unauthorized(aiocoap.error.Unauthorized):
    """4.01: an authenticated peer could be granted this (RFC 7252 5.9.2.2)."""

    message = "Authentication needed (OSCORE, EDHOC or DTLS)"


class Refused(aiocoap.error.Forbidden):
    """4.03 from the access rules: said the same whether or not the path exists."""

    message = "Not allowed for you"


class Busy(aiocoap.error.ConstructionRenderableError):
    """5.03 with Max-Age: a limit of the server is reached, retry after that many seconds."""

    code = codes.SERVICE_UNAVAILABLE
    message = "Busy, retry later"

    def __init__(self, message: str | None = None, *, max_age: int) -> None:
        super().__init__(message)
        self.max_age = min(max_age, MAX_AGE_LIMIT)

    def to_message(self) -> aiocoap.Message:
        response = super().to_message()
        response.opt.max_age = self.max_age
        return response


class PreconditionFailed(aiocoap.error.PreconditionFailed):
    message = "Precondition failed"


class BlockOutOfRange(aiocoap.error.BadOption):
    message = "Block beyond the end of the resource"


class UnsupportedOption(aiocoap.error.BadOption):
    """A critical option this server does not implement (RFC 7252 5.4.1)."""

    message = "Unsupported critical option"


class NotAcceptable(aiocoap.error.NotAcceptable):
    message = "Not available in the Content-Format asked for (Accept)"


class NotAProxy(aiocoap.error.ProxyingNotSupported):
    """Proxy-Uri or Proxy-Scheme: RFC 7252 5.7.2 prescribes 5.05, though it is the client's
    mistake (counted as such)."""

    message = "This server is not a proxy (Proxy-Uri, Proxy-Scheme)"


class DirectoryPayload(aiocoap.error.BadRequest):
    message = "A directory (trailing slash) takes no payload; to upload a file, strip the slash"


class UploadIncomplete(aiocoap.error.RequestEntityIncomplete):
    message = "Block-wise upload out of sequence; send it again from block 0"


class UploadTooLarge(aiocoap.error.RequestEntityTooLarge):
    """4.13 with the largest acceptable size in Size1 (RFC 7959 4)."""

    message = "Upload larger than the space left on the server"

    def __init__(self, message: str | None = None, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit

    def to_message(self) -> aiocoap.Message:
        response = super().to_message()
        response.opt.size1 = self.limit
        return response


class Unavailable(aiocoap.error.ConstructionRenderableError):
    """A server-side condition the client cannot fix (disk full, I/O error): 5.03, never 5.00."""

    code = codes.SERVICE_UNAVAILABLE
    message = "Service unavailable"


_BY_ERRNO: dict[int, tuple[type[aiocoap.error.ConstructionRenderableError], str]] = {
    errno.ENOENT: (aiocoap.error.NotFound, problems.NotFound.message),
    errno.ENOTDIR: (aiocoap.error.NotFound, "Not found (a path component is not a directory)"),
    errno.EISDIR: (aiocoap.error.BadRequest, problems.NotAFile.message),
    errno.ELOOP: (aiocoap.error.Forbidden, "Symbolic links are not followed here"),
    errno.EXDEV: (aiocoap.error.Forbidden, "Path leads outside the served directory"),
    errno.EACCES: (aiocoap.error.Forbidden, "Permission denied"),
    errno.EPERM: (aiocoap.error.Forbidden, "Operation not permitted"),
    errno.EROFS: (aiocoap.error.Forbidden, "Read-only file system"),
    errno.ENAMETOOLONG: (aiocoap.error.BadRequest, "Name too long"),
    errno.EINVAL: (aiocoap.error.BadRequest, "Invalid name"),
    errno.EILSEQ: (aiocoap.error.BadRequest, "Invalid name"),
    errno.ENOSPC: (Unavailable, "No space left on the server"),
    errno.EDQUOT: (Unavailable, "Disk quota exceeded on the server"),
    errno.EMFILE: (Unavailable, "Server is out of file descriptors, retry later"),
    errno.ENFILE: (Unavailable, "Server is out of file descriptors, retry later"),
    errno.EIO: (Unavailable, "I/O error on the server"),
    errno.ENOTEMPTY: (aiocoap.error.Conflict, "Directory not empty"),
    errno.EBUSY: (aiocoap.error.Conflict, "Resource busy"),
    errno.ETXTBSY: (aiocoap.error.Conflict, "File busy"),
}


_BY_PROBLEM: dict[type[problems.Problem], type[aiocoap.error.ConstructionRenderableError]] = {
    problems.BadPath: aiocoap.error.BadRequest,
    problems.NotFound: aiocoap.error.NotFound,
    problems.NotAFile: aiocoap.error.BadRequest,
    problems.NotADirectory: aiocoap.error.BadRequest,
    problems.Forbidden: aiocoap.error.Forbidden,
    problems.Conflict: aiocoap.error.Conflict,
}


def from_problem(e: problems.Problem) -> aiocoap.error.ConstructionRenderableError:
    """The response for something the tree refused, with its diagnostic."""
    for cls in type(e).__mro__:
        renderable = _BY_PROBLEM.get(cls)
        if renderable is not None:
            return renderable(str(e))
    return aiocoap.error.BadRequest(str(e))


def from_oserror(e: OSError) -> aiocoap.error.ConstructionRenderableError:
    """Map an OS error caused while serving a request to the response the client gets."""
    known = _BY_ERRNO.get(e.errno or 0)
    if known is None:
        log.warning("Unexpected OS error while serving a request: %s", e)
        return Unavailable(f"Server error: {e.strerror or e}")
    cls, message = known
    return cls(message)
