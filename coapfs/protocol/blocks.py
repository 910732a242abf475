"""Block2 responses (RFC 7959): only the requested block of a body is read, any block can be
asked for cold, and Size2 carries the total."""

from __future__ import annotations

from collections.abc import Callable

import aiocoap
from aiocoap.optiontypes import BlockOption

from . import errors

#: 1024-byte blocks unless the client asks for smaller ones (szx 7, BERT, is answered so too).
DEFAULT_SZX = 6


def block_response(
    request: aiocoap.Message, total: int, read: Callable[[int, int], bytes]
) -> aiocoap.Message:
    """The requested Block2 of a body of `total` bytes, reading only that block."""
    requested = request.opt.block2
    if requested is None:
        requested = BlockOption.BlockwiseTuple(0, False, DEFAULT_SZX)
    offset, size = requested.start, requested.size
    if offset > 0 and offset >= total:
        raise errors.BlockOutOfRange()
    payload = read(offset, size) if total else b""
    more = offset + len(payload) < total
    response = aiocoap.Message(payload=payload)
    if more or requested.block_number > 0 or request.opt.block2 is not None:
        response.opt.block2 = BlockOption.BlockwiseTuple(
            requested.block_number, more, min(requested.size_exponent, DEFAULT_SZX)
        )
        response.opt.size2 = total
    elif request.opt.size2 is not None:
        response.opt.size2 = total
    return response
