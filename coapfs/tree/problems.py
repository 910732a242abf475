"""What can be wrong with a request for the tree, in the tree's terms; `protocol.errors` gives
each its CoAP response code. File-system conditions stay OSErrors, mapped there too."""

from __future__ import annotations


class Problem(Exception):
    """A request the tree cannot carry out; `str()` is the client-facing diagnostic."""

    message = "Cannot be done"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)


class BadPath(Problem):
    message = "Malformed path"


class NotFound(Problem):
    message = "Not found"


class NotAFile(Problem):
    message = "Not a file (add a trailing slash)"


class NotADirectory(Problem):
    message = "Not a directory (strip the trailing slash)"


class Forbidden(Problem):
    message = "Forbidden"


class Conflict(Problem):
    message = "Something of the other kind is at that name (a file where a directory is meant)"
