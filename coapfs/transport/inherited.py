"""aiocoap serving on UDP sockets bound beforehand (by the supervisor: `daemon.sockets`), so that
every worker of one server shares them and a stranger cannot.

aiocoap's udp6 transport binds its own socket in `create_server_transport_endpoint` and then
wraps it with `_create_transport_endpoint` (the same classmethods in aiocoap 0.4.14 through
0.4.17). The replacement takes the socket registered for the bind address, when there is one,
and lets aiocoap wrap that; any other bind is aiocoap's own as before.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from aiocoap.numbers import COAP_PORT
from aiocoap.transports.udp6 import MessageInterfaceUDP6

log = logging.getLogger(__name__)

BindKey = tuple[str, int]  # (host as aiocoap is given it, "::" for none; port)

_registered: dict[BindKey, socket.socket] = {}
_stock = MessageInterfaceUDP6.__dict__["create_server_transport_endpoint"].__func__


def bind_key(bind: tuple[str | None, int | None] | None) -> BindKey:
    host, port = bind if bind is not None else (None, None)
    return (host or "::", COAP_PORT if port is None else port)


def register(bind: tuple[str | None, int | None] | None, sock: socket.socket) -> None:
    """Serve `bind` on `sock` from now on (until `unregister`)."""
    _install()
    _registered[bind_key(bind)] = sock


def unregister(bind: tuple[str | None, int | None] | None) -> None:
    _registered.pop(bind_key(bind), None)


async def _create_server_transport_endpoint(
    cls: type[MessageInterfaceUDP6],
    ctx: Any,
    log: logging.Logger,
    loop: Any,
    bind: Any,
    multicast: Any,
) -> Any:
    sock = _registered.get(bind_key(bind))
    if sock is None:
        return await _stock(cls, ctx, log, loop, bind, multicast)
    # A duplicate: aiocoap closes what it is given when its context shuts down.
    return await cls._create_transport_endpoint(sock.dup(), ctx, log, loop, multicast)


def _install() -> None:
    current = MessageInterfaceUDP6.__dict__["create_server_transport_endpoint"]
    if getattr(current, "__func__", None) is _create_server_transport_endpoint:
        return
    MessageInterfaceUDP6.create_server_transport_endpoint = classmethod(  # type: ignore[method-assign,assignment]
        _create_server_transport_endpoint
    )
