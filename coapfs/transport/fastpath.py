"""Per-datagram work aiocoap (0.4.14 through 0.4.17) repeats without need, taken out.

Each replacement computes what the stock code computes (the same answers, the same bytes on the
wire) and is installed only where the stock function still has the source it has in those
versions (`_KNOWN`, sha256 of the source); otherwise the stock one stays in use. Measured with
cProfile and py-spy under the benchmark's small-file GETs (then bench/loadgen.py):

* UDP6EndpointAddress.is_multicast_locally / is_multicast: stock unpacks the packet info into
  an ipaddress object, renders it to a string and parses that again, for every response, to
  test one byte (about 5 % of the server's CPU). Here: the same test on the 16 address bytes;
  the remote's answer remembered per address string.
* UDP6EndpointAddress.__hash__: a tuple slice on every dict operation (deduplication, tokens,
  piggy-backing); cached per address object (its sockaddr never changes).
* RecvmsgSelectorDatagramTransport._read_ready: every wake-up first tries to read the socket's
  error queue (a failing system call and a Python exception, ~2 µs) before the datagram. Here
  the datagram is read first, and the error queue when no datagram is waiting (epoll reports a
  non-empty error queue as readable) or after 64 datagrams in a row: no ICMP error waits behind
  more than 64 datagrams.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import textwrap
from typing import Any

from aiocoap.transports import udp6
from aiocoap.util import socknumbers
from aiocoap.util.asyncio import recvmsg

log = logging.getLogger(__name__)

_KNOWN = {
    "UDP6EndpointAddress.is_multicast_locally": {"f9c6be68aae9bb78"},
    "UDP6EndpointAddress.is_multicast": {"d050d37d10e164a4"},
    "UDP6EndpointAddress.__hash__": {"2c4f61d8279c0739"},
    "RecvmsgSelectorDatagramTransport._read_ready": {"09d3f73e85d2c266"},
}
_ERRQUEUE_EVERY = 64
_V4MAPPED = b"\0" * 10 + b"\xff\xff"
_Address = udp6.UDP6EndpointAddress
_Transport = recvmsg.RecvmsgSelectorDatagramTransport
_stock_local = _Address.is_multicast_locally.fget
_stock_remote = _Address.is_multicast.fget
_stock_hash = _Address.__hash__
_stock_read_ready = _Transport._read_ready
_remote_multicast: dict[str, bool] = {}


def _shape(function: Any) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _known(name: str, function: Any) -> bool:
    if _shape(function) in _KNOWN[name]:
        return True
    log.debug("aiocoap's %s differs from 0.4.14-0.4.17: kept as it is", name)
    return False


def _multicast(address: bytes) -> bool:
    if address[:12] == _V4MAPPED:
        return 224 <= address[12] <= 239  # 224.0.0.0/4
    return address[0] == 0xFF  # ff00::/8


def _is_multicast_locally(self: Any) -> bool:
    pktinfo = self.pktinfo
    if not isinstance(pktinfo, bytes):
        return bool(_stock_local(self))  # None: fails as the stock code does
    return _multicast(pktinfo[:16])


def _is_multicast(self: Any) -> bool:
    host = self.sockaddr[0]
    known = _remote_multicast.get(host)
    if known is None:
        known = bool(_stock_remote(self))
        if len(_remote_multicast) > 4096:
            _remote_multicast.clear()
        _remote_multicast[host] = known
    return known


def _hash(self: Any) -> int:
    cached: int | None = self.__dict__.get("_coapfs_hash")
    if cached is None:
        cached = self.__dict__["_coapfs_hash"] = hash(self.sockaddr[:-1])
    return cached


def _read_ready(self: Any) -> None:
    if not socknumbers.HAS_RECVERR:
        return _stock_read_ready(self)  # type: ignore[no-any-return]
    read_in_a_row = self.__dict__.get("_coapfs_in_a_row", 0)
    if read_in_a_row < _ERRQUEUE_EVERY:
        sock = self._RecvmsgSelectorDatagramTransport__sock
        try:
            data, ancdata, flags, address = sock.recvmsg(self.max_size, 1024)
        except (BlockingIOError, InterruptedError):
            pass  # no datagram: the wake-up is for the error queue
        except OSError as exc:
            self._protocol.error_received(exc)
            return None
        except Exception as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
            return None
        else:
            self.__dict__["_coapfs_in_a_row"] = read_in_a_row + 1
            self._protocol.datagram_msg_received(data, ancdata, flags, address)
            return None
    self.__dict__["_coapfs_in_a_row"] = 0
    return _stock_read_ready(self)  # type: ignore[no-any-return]


def install() -> list[str]:
    """Apply each replacement whose stock counterpart has the known source (once); which."""
    applied: list[str] = []
    if _Address.__dict__.get("_coapfs_fast"):
        return applied
    _Address._coapfs_fast = True  # type: ignore[attr-defined]
    if _known("UDP6EndpointAddress.is_multicast_locally", _stock_local):
        _Address.is_multicast_locally = property(_is_multicast_locally)  # type: ignore[method-assign,assignment]
        applied.append("is_multicast_locally")
    if _known("UDP6EndpointAddress.is_multicast", _stock_remote):
        _Address.is_multicast = property(_is_multicast)  # type: ignore[method-assign,assignment]
        applied.append("is_multicast")
    if _known("UDP6EndpointAddress.__hash__", _stock_hash):
        _Address.__hash__ = _hash  # type: ignore[method-assign,assignment]
        applied.append("__hash__")
    if _known("RecvmsgSelectorDatagramTransport._read_ready", _stock_read_ready):
        _Transport._read_ready = _read_ready  # type: ignore[method-assign]
        applied.append("_read_ready")
    return applied
