"""Two guards on aiocoap's UDP interface (udp6), per context, for aiocoap 0.4.14 through 0.4.17.

Truncated datagrams: aiocoap reads at most 4096 bytes per datagram (util/asyncio/recvmsg.py)
and processes what it read even when the kernel says it cut the datagram (MSG_TRUNC): a longer
single-datagram PUT would be stored cut short. Here such a datagram is never processed; a
request gets 4.13 with Size1 (send it block-wise, blocks of at most that size), anything else
is dropped. The limit is MAX_DATAGRAM.

ICMP errors blamed on the wrong peer: aiocoap asks the kernel for socket errors (IP_RECVERR),
and Linux reports an ICMP error for an earlier datagram (a notification to an observer that
has gone away) as the failure of the *next* send on the socket, whoever it goes to. aiocoap
then ends the exchange of that innocent peer — an observer that happened to be next loses its
observation, and a TypeError traceback in aiocoap's Pipe reaches the log. Here a send that
fails that way is sent again (twice at most); the real culprit is then reported through the
error queue, which names the failed destination, and its observation ends as it should.
Where aiocoap's Pipe still has the defect that turns the wrong blame into a traceback, its
event dispatch is replaced by one that stops once the pipe has ended.
"""

from __future__ import annotations

import inspect
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiocoap.pipe
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON, NON
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

log = logging.getLogger(__name__)

#: The largest datagram read (aiocoap's buffer); a longer one is refused, never processed.
MAX_DATAGRAM = 4096
#: Payload bytes that always fit into MAX_DATAGRAM with an 8-byte token and ample options.
_SIZE1 = MAX_DATAGRAM - 4 - 8 - 256 - 1
_SEND_RETRIES = 2


def udp_interfaces(context: Any) -> list[MessageInterfaceUDP6]:
    found = []
    for interface in context.request_interfaces:
        manager = getattr(interface, "token_interface", None)
        message_interface = getattr(manager, "message_interface", None)
        if isinstance(message_interface, MessageInterfaceUDP6):
            found.append(message_interface)
    return found


def install(context: Any) -> None:
    _repair_pipe()
    for interface in udp_interfaces(context):
        _refuse_truncated(interface)
        _blame_the_right_peer(interface)


def _refuse_truncated(interface: MessageInterfaceUDP6) -> None:
    received = interface.datagram_msg_received

    def datagram_msg_received(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        if not flags & socket.MSG_TRUNC:
            return received(data, ancdata, flags, address)  # type: ignore[no-any-return]
        log.info("Datagram from %s longer than %d bytes: refused", address[0], MAX_DATAGRAM)
        _answer_too_large(interface, data, ancdata, address)
        return None

    interface.datagram_msg_received = datagram_msg_received  # type: ignore[method-assign]


def _answer_too_large(
    interface: MessageInterfaceUDP6, data: bytes, ancdata: Any, address: Any
) -> None:
    if len(data) < 4 or data[0] >> 6 != 1:
        return
    mtype, token_length, code = (data[0] >> 4) & 3, data[0] & 0x0F, data[1]
    if token_length > 8 or not 1 <= code <= 31 or mtype not in (CON, NON):
        return
    pktinfo = None
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            pktinfo = value
    response = Message(
        code=Code.REQUEST_ENTITY_TOO_LARGE,
        payload=f"Datagram longer than {MAX_DATAGRAM} bytes: send it block-wise".encode(),
    )
    response.opt.size1 = _SIZE1
    response.token = data[4 : 4 + token_length]
    response.remote = UDP6EndpointAddress(address, interface, pktinfo=pktinfo).as_response_address()
    if mtype == CON:
        response.mtype, response.mid = ACK, struct.unpack("!H", data[2:4])[0]
    else:
        response.mtype, response.mid = NON, interface._ctx._next_message_id()
    interface.send(response)


def _blame_the_right_peer(interface: MessageInterfaceUDP6) -> None:
    send: Callable[[Message], None] = interface.send
    report: Callable[[Exception], None] = interface.error_received
    held: list[Exception] = []
    holding = [False]

    def error_received(error: Exception) -> None:
        if holding[0]:
            held.append(error)
            return
        report(error)

    def send_again_once_wrongly_failed(message: Message) -> None:
        for attempt in range(_SEND_RETRIES + 1):
            held.clear()
            holding[0] = attempt < _SEND_RETRIES
            try:
                send(message)
            finally:
                holding[0] = False
            if not held:
                return
            log.debug(
                "Send to %s failed (%s), an error of an earlier one: again", message.remote, held[0]
            )

    interface.error_received = error_received  # type: ignore[method-assign]
    interface.send = send_again_once_wrongly_failed  # type: ignore[method-assign]


def _add_event(self: aiocoap.pipe.Pipe, event: Any) -> None:
    """aiocoap's Pipe._add_event, stopping once a callback has ended the pipe (it iterated
    on, calling `_any_interest()` on the ended pipe's False) and logging a late exception with
    `exc_info` (it passed `exception=`, which logging refuses)."""
    if self._event_callbacks is False:
        self.log.debug("Event %r after %r ended: discarded", event, self, exc_info=event.exception)
        return
    for callback, is_interest in self._event_callbacks[:]:
        keep_calling = callback(event)
        if self._event_callbacks is False:
            return
        if not keep_calling:
            self._event_callbacks.remove((callback, is_interest))
    if not self._any_interest():
        self._end()


def _repair_pipe() -> None:
    current = aiocoap.pipe.Pipe._add_event
    if current is _add_event:
        return
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        return
    if "exception=event.exception" in source and "keep_calling" in source:
        aiocoap.pipe.Pipe._add_event = _add_event  # type: ignore[method-assign]
