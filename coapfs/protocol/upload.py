"""Block-wise uploads (Block1, RFC 7959): each block written to its spool on disk as it arrives,
so memory stays flat whatever the upload's size.

Stricter than aiocoap's own assembly, which answers a gap with 5.00 and, since two concurrent
uploads of one resource from one endpoint are told apart only by Request-Tag (RFC 9175), stitches
their blocks into a file neither client sent. Here a block must continue its upload exactly, a
second block 0 while an upload is in progress drops both, and every misfit is a 4.08 that drops
the upload. Limits ([upload]): the size (4.13 with Size1, checked against Size1 at block 0 and as
bytes arrive), uploads in progress at once (5.03 with Max-Age), and an idle timeout after which
an abandoned upload is dropped with its spool (its next block is a 4.08)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import aiocoap
from aiocoap.numbers import OptionNumber

from ..config.schema import UploadConfig
from ..tree.spool import Spool
from . import errors

#: Options that differ between the blocks of one upload; everything else (Request-Tag
#: included) must be the same in all of them (RFC 7959 2.4, RFC 9175 3).
_PER_BLOCK_OPTIONS = (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class _Upload:
    spool: Spool
    touched: float
    last: tuple[int, bytes] = (-1, b"")  # block number and digest of the block taken last

    def repeats_last(self, number: int, start: int, payload: bytes) -> bool:
        """A retransmission of the block taken last (its ACK was lost; the same bytes): answered
        again, not appended again (`transport.dedup` keeps no copy of the answer to it). A
        different block 0 is another upload, not a retransmission."""
        return start + len(payload) == self.spool.size and self.last == (number, _digest(payload))


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class Uploads:
    """Uploads in progress, one per client endpoint and request (least recently fed first)."""

    def __init__(self, settings: UploadConfig) -> None:
        self.settings = settings
        self._pending: dict[Hashable, _Upload] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def feed(
        self,
        request: aiocoap.Message,
        open_spool: Callable[[], Spool],
        space_left: Callable[[], int],
    ) -> Spool | None:
        """The spool holding the whole upload once its last block is in (the caller commits or
        discards it); None while more blocks are to come."""
        block1 = request.opt.block1
        now = time.monotonic()
        self._expire(now)
        if block1 is None or (block1.block_number == 0 and not block1.more):
            return self._single(request, open_spool, space_left)
        key = (request.remote.blockwise_key, request.get_cache_key(_PER_BLOCK_OPTIONS))
        upload = self._pending.pop(key, None)
        if block1.block_number == 0:
            if upload is not None and upload.repeats_last(0, 0, request.payload):
                upload.touched = now
                self._pending[key] = upload
                return None
            if upload is not None:
                upload.spool.discard()
                raise errors.UploadIncomplete(
                    "Another upload of this resource from your endpoint was in progress; both "
                    "are dropped (concurrent uploads need distinct Request-Tags)"
                )
            self._check_room(now)
            self._check_size(request.opt.size1 or 0, space_left)
            upload = _Upload(open_spool(), now)
        elif upload is None:
            raise errors.UploadIncomplete(
                "No upload in progress that this block continues: start with block 0, and send "
                "every block with block 0's options (Content-Format, If-Match, Uri-Query...)"
            )
        elif upload.repeats_last(block1.block_number, block1.start, request.payload):
            upload.touched = now
            self._pending[key] = upload
            return None
        try:
            self._append(upload.spool, request, space_left)
        except BaseException:
            upload.spool.discard()
            raise
        if not block1.more:
            return upload.spool
        upload.touched = now
        upload.last = (block1.block_number, _digest(request.payload))
        self._pending[key] = upload
        self._arm_sweeper()
        return None

    def _single(
        self,
        request: aiocoap.Message,
        open_spool: Callable[[], Spool],
        space_left: Callable[[], int],
    ) -> Spool:
        self._check_size(len(request.payload), space_left)
        spool = open_spool()
        try:
            self._append(spool, request, space_left)
        except BaseException:
            spool.discard()
            raise
        return spool

    def _append(
        self, spool: Spool, request: aiocoap.Message, space_left: Callable[[], int]
    ) -> None:
        block1 = request.opt.block1
        size = len(request.payload)
        if block1 is not None:
            if block1.start != spool.size:
                raise errors.UploadIncomplete(
                    f"Block {block1.block_number} does not continue the upload "
                    f"({spool.size} bytes received); send it again from block 0"
                )
            if block1.more and not (
                size == block1.size or (block1.size_exponent == 7 and size and size % 1024 == 0)
            ):
                raise errors.UploadIncomplete("A block other than the last must fill its size")
        if spool.size + size > self.settings.max_size:
            raise errors.UploadTooLarge(
                f"Upload larger than {self.settings.max_size} bytes", limit=self.settings.max_size
            )
        try:
            spool.write(request.payload)
        except OSError as e:
            if e.errno in _NO_SPACE:
                # What fits once this upload is dropped (its spool's space is given back).
                limit = max(space_left(), 0) + spool.size
                raise errors.UploadTooLarge(limit=limit) from None
            raise

    def _check_size(self, size: int, space_left: Callable[[], int]) -> None:
        """Before anything is spooled: the announced (Size1) or whole size must fit, both the
        configured limit and the space left; Size1 of a 4.13 is the smaller of the two."""
        limit = self.settings.max_size
        if not size:
            return
        space = max(space_left(), 0)
        if size > min(limit, space):
            if space < limit:
                raise errors.UploadTooLarge(limit=space)
            raise errors.UploadTooLarge(f"Upload larger than {limit} bytes", limit=limit)

    def _check_room(self, now: float) -> None:
        if len(self._pending) < self.settings.max_concurrent:
            return
        oldest = next(iter(self._pending.values()))
        wait = oldest.touched + self.settings.idle_timeout - now
        raise errors.Busy(
            f"Uploads in progress: {len(self._pending)}, the most this server takes; retry later",
            max_age=max(1, math.ceil(wait)),
        )

    def _expire(self, now: float) -> None:
        """Drop uploads the client has given up on (no block for idle_timeout): their spools
        go, and a late block gets 4.08."""
        timeout = self.settings.idle_timeout
        for key, upload in list(self._pending.items()):
            if now - upload.touched < timeout:
                break
            del self._pending[key]
            upload.spool.discard()

    def _arm_sweeper(self) -> None:
        """Expire abandoned uploads on time even when no other upload comes along."""
        if self._sweeper is not None or not self._pending:
            return
        oldest = next(iter(self._pending.values()))
        delay = max(0.0, oldest.touched + self.settings.idle_timeout - time.monotonic()) + 0.05
        self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        self._expire(time.monotonic())
        self._arm_sweeper()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for upload in self._pending.values():
            upload.spool.discard()
        self._pending.clear()
