"""Deduplication state that stays bounded (aiocoap issue #183).

aiocoap's message layer keeps, for every request, an entry keyed by (remote, Message ID) with
the response, for EXCHANGE_LIFETIME (247 s), so that a retransmission is answered with the same
response: memory grows with the request rate (measured: 1.4-2.3 KiB per request, hundreds of
MiB under a flood). Per RFC 7252 4.5 a server may instead process a duplicate of an idempotent,
side-effect-free request again. So here, per message manager (aiocoap 0.4.14 through 0.4.17
have the same internals; three attributes of the instance are replaced, no class):

* Requests that can be rendered again (GET and FETCH, and the intermediate blocks of a
  block-wise PUT, which `protocol.upload` answers again when they come twice) keep no entry.
  A CON one is marked in flight until its ACK goes out, so a retransmission arriving while it
  is rendered is dropped as before; a later one is rendered again.
* Everything else is stored as aiocoap stores it, while fewer than `max_entries` entries and
  `max_bytes` of responses are held; beyond that a *new* such request is answered at once with
  5.03 and Max-Age, not processed, and nothing is stored for it. That refusal is passed through
  `fitted` (the amplification limit: it bypasses the request's pipe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON, NON

log = logging.getLogger(__name__)

_RENDER_AGAIN = frozenset({Code.GET, Code.FETCH})
#: Python objects per stored entry besides the response's bytes (key, timer, Message), measured.
_ENTRY_OVERHEAD = 1400
Fitted = Callable[[Message, Message], Message]  # (request, response) -> what may be sent
_REQUIRED = (
    "_recent_messages",
    "_deduplicate_message",
    "_store_response_for_duplicates",
    "_send_via_transport",
    "_next_message_id",
)


@dataclass
class Limits:
    """[deduplication] in the configuration; shared by every context, changed on reload."""

    max_entries: int
    max_bytes: int
    retry_after: int = 30


def renders_again(message: Message) -> bool:
    """Whether a duplicate of `message` may simply be processed again."""
    if message.code in _RENDER_AGAIN:
        return True
    block1 = message.opt.block1 if message.code == Code.PUT else None
    return block1 is not None and block1.more


def _cost(message: Message) -> int:
    cached = message.__dict__.get("_coapfs_cost")
    if cached is None:
        cached = _ENTRY_OVERHEAD + len(message.token) + len(message.opt.encode())
        cached += len(message.payload)
        message.__dict__["_coapfs_cost"] = cached
    return int(cached)


class _Store(dict[Any, Any]):
    """Stands in for MessageManager._recent_messages, counting the bytes of what it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        old = dict.get(self, key)
        if old is not None:
            self.nbytes -= _cost(old)
        if value is not None:
            self.nbytes += _cost(value)
        dict.__setitem__(self, key, value)

    def pop(self, key: Any, *default: Any) -> Any:  # aiocoap's timer: pop(key), no default
        value = dict.pop(self, key, None)
        if value is not None:
            self.nbytes -= _cost(value)
        return value


class Deduplication:
    """The bounded replacement, installed on one message manager."""

    def __init__(self, manager: MessageManager, limits: Limits, fitted: Fitted) -> None:
        self.limits = limits
        self._fitted = fitted
        self.refused = 0
        self._manager = manager
        self._store = _Store()
        self._in_flight: dict[Any, float] = {}  # (remote, mid) -> when; CON render-again only
        self._stock_deduplicate = manager._deduplicate_message
        self._stock_store = manager._store_response_for_duplicates
        manager._recent_messages = self._store
        manager._deduplicate_message = self._deduplicate
        manager._store_response_for_duplicates = self._store_response

    def stats(self) -> dict[str, int]:
        return {
            "stored": len(self._store) - len(self._in_flight),
            "stored_bytes": self._store.nbytes,
            "in_flight": len(self._in_flight),
            "refused": self.refused,
        }

    def _deduplicate(self, message: Message) -> bool:
        key = (message.remote, message.mid)
        if key in self._store:
            return bool(self._stock_deduplicate(message))  # a duplicate: aiocoap's handling
        if renders_again(message):
            if message.mtype is CON:
                now = time.monotonic()
                self._prune_in_flight(now)
                dict.__setitem__(self._store, key, None)
                self._in_flight[key] = now
            return False
        stored = len(self._store) - len(self._in_flight)
        if stored >= self.limits.max_entries or self._store.nbytes >= self.limits.max_bytes:
            self._refuse(message)
            return True
        return bool(self._stock_deduplicate(message))

    def _store_response(self, message: Message) -> None:
        key = (message.remote, message.mid)
        if message.mtype is CON:
            # A message of ours (a separate response, a notification) under its own Message ID:
            # aiocoap would keep it where a request of the peer's with that ID happened to be
            # (the two ID spaces are apart) and answer that request's retransmission with it,
            # tripping over its own assertion (a CON is sent only with a monitor): never.
            return
        if self._in_flight.pop(key, None) is not None:
            dict.pop(self._store, key, None)  # answered: a later duplicate is rendered again
            return
        self._stock_store(message)
        if message.__dict__.get("request") is not None and dict.get(self._store, key) is message:
            # aiocoap 0.4.17 hangs the whole request on its response (tokenmanager.py);
            # nothing reads it once the response is sent, but storing would keep it alive.
            message.request = None  # type: ignore[union-attr]

    def _prune_in_flight(self, now: float) -> None:
        """Marks whose ACK never went out (a rendering that failed) go after 247 s."""
        oldest_kept = now - 247.0
        while self._in_flight:
            key, since = next(iter(self._in_flight.items()))
            if since > oldest_kept:
                break
            del self._in_flight[key]
            if dict.get(self._store, key) is None:
                dict.pop(self._store, key, None)

    def _refuse(self, request: Message) -> None:
        """5.03 with Max-Age, sent directly and not stored (a retransmission gets it again)."""
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning(
                "Deduplication state full (%d entries, %d bytes): %d new request(s) refused "
                "with 5.03",
                self.limits.max_entries,
                self.limits.max_bytes,
                self.refused,
            )
        busy = Message(code=Code.SERVICE_UNAVAILABLE, payload=b"Busy, retry later")
        busy.opt.max_age = self.limits.retry_after
        response = self._fitted(request, busy)
        response.token = request.token
        response.remote = request.remote.as_response_address()
        if request.mtype is CON:
            response.mtype, response.mid = ACK, request.mid
        else:
            response.mtype, response.mid = NON, self._manager._next_message_id()
        self._manager._send_via_transport(response)


def install(context: Any, limits: Limits, fitted: Fitted) -> list[Deduplication]:
    """Bound the deduplication state of every message manager of a new context."""
    installed = []
    for interface in context.request_interfaces:
        manager = getattr(interface, "token_interface", None)
        if not isinstance(manager, MessageManager) or not all(
            hasattr(manager, name) for name in _REQUIRED
        ):
            continue
        if not isinstance(manager._recent_messages, dict) or manager._recent_messages:
            log.warning("%r has seen traffic already; its deduplication is left as it is", manager)
            continue
        installed.append(Deduplication(manager, limits, fitted))
    return installed
