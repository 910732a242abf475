"""Block-wise uploads (Block1, RFC 7959) put together before a PUT writes anything."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

import aiocoap
from aiocoap.numbers import OptionNumber, TransportTuning

from . import errors

#: Options that differ between the blocks of one upload; everything else (Request-Tag
#: included) must be the same in all of them (RFC 7959 2.4, RFC 9175 3).
_PER_BLOCK_OPTIONS = (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE)


@dataclass
class _Upload:
    body: bytearray
    touched: float


class Uploads:
    """Block-wise uploads (Block1, RFC 7959) being assembled, one per client endpoint and request.

    Stricter than aiocoap's spool, which answers a gap with 5.00 and, since two concurrent
    uploads of one resource from one endpoint are told apart only by Request-Tag (RFC 9175),
    stitches their blocks into a file neither client sent. Here a block must continue its upload
    exactly, a second block 0 while an upload is in progress drops both, and every misfit is a
    4.08 that drops the upload; uploads stay within the space left on disk (4.13)."""

    def __init__(self, expiry: float = TransportTuning().MAX_TRANSMIT_WAIT) -> None:
        self._expiry = expiry
        self._pending: dict[Hashable, _Upload] = {}  # least recently fed first
        self._held = 0

    def __len__(self) -> int:
        return len(self._pending)

    def feed(self, request: aiocoap.Message, *, space: int) -> bytes | None:
        """The whole payload once the last block is in; None while more blocks are to come."""
        block1 = request.opt.block1
        if block1 is None:
            return request.payload
        now = time.monotonic()
        self._expire(now)
        key = (request.remote.blockwise_key, request.get_cache_key(_PER_BLOCK_OPTIONS))
        upload = self._take(key)
        if block1.block_number == 0:
            if upload is not None:
                raise errors.UploadIncomplete(
                    "Another upload of this resource from your endpoint was in progress; both "
                    "are dropped (concurrent uploads need distinct Request-Tags)"
                )
            upload = _Upload(bytearray(), now)
        elif upload is None:
            raise errors.UploadIncomplete("No upload in progress; start with block 0")
        elif block1.start != len(upload.body):
            raise errors.UploadIncomplete(
                f"Block {block1.block_number} does not continue the upload "
                f"({len(upload.body)} bytes received); send it again from block 0"
            )
        size = len(request.payload)
        if block1.more and not (
            size == block1.size or (block1.size_exponent == 7 and size and size % 1024 == 0)
        ):
            raise errors.UploadIncomplete("A block other than the last must fill its size")
        if max(block1.start + size, request.opt.size1 or 0) > space - self._held:
            raise errors.UploadTooLarge(limit=max(space - self._held, 0))
        upload.body += request.payload
        if not block1.more:
            return bytes(upload.body)
        upload.touched = now
        self._pending[key] = upload
        self._held += len(upload.body)
        return None

    def _take(self, key: Hashable) -> _Upload | None:
        upload = self._pending.pop(key, None)
        if upload is not None:
            self._held -= len(upload.body)
        return upload

    def _expire(self, now: float) -> None:
        """Forget uploads the client has given up on (no block for MAX_TRANSMIT_WAIT)."""
        for key, upload in list(self._pending.items()):
            if now - upload.touched < self._expiry:
                break
            self._take(key)
