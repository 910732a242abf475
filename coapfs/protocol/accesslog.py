"""What happened, one line each: every request when the access log is on (`access_log = true`),
and every change made over CoAP (a write or a delete), always. Each line also carries its
parts as journal fields (REMOTE, IDENTITY, METHOD, PATH, CODE, BYTES, ...) where the journal
takes the log, so `journalctl -u coap-fileserver CODE=4.03` finds refusals."""

from __future__ import annotations

import logging
import time

import aiocoap

from ..access.peer import Peer, peer_of

#: The log record attribute that carries a record's journal fields (`extra={FIELDS: {...}}`).
FIELDS = "journal_fields"

_requests = logging.getLogger("coapfs.access")
_changes = logging.getLogger("coapfs.changes")


def request_path(request: aiocoap.Message) -> str:
    return "/" + "/".join(request.opt.uri_path)


def _peer_fields(peer: Peer) -> dict[str, object]:
    fields: dict[str, object] = {"REMOTE": str(peer.address), "REMOTE_PORT": peer.port}
    if peer.claims:
        fields["IDENTITY"] = " ".join(peer.claims)
    return fields


def log_request(request: aiocoap.Message, response: aiocoap.Message, started: float) -> None:
    """One access log line: peer, method, path, response code, payload bytes, duration."""
    peer = peer_of(request.remote)
    path = request_path(request)
    duration_ms = (time.perf_counter() - started) * 1000
    code = response.code.dotted
    size = len(response.payload)
    fields = {
        **_peer_fields(peer),
        "METHOD": str(request.code),
        "PATH": path,
        "CODE": code,
        "BYTES": size,
        "DURATION_MS": f"{duration_ms:.3f}",
    }
    _requests.info(
        "%s %s %s %s %d B %.1f ms",
        peer,
        request.code,
        path,
        code,
        size,
        duration_ms,
        extra={FIELDS: fields},
    )


def log_change(request: aiocoap.Message, action: str, size: int | None, etag: bytes | None) -> None:
    """One line per successful write or delete: who, what, where, how large, the new ETag."""
    peer = peer_of(request.remote)
    path = request_path(request)
    fields = {**_peer_fields(peer), "METHOD": str(request.code), "PATH": path, "ACTION": action}
    text = f"{peer} {action} {path}"
    if size is not None:
        fields["BYTES"] = size
        text += f" {size} B"
    if etag is not None:
        fields["ETAG"] = etag.hex()
        text += f" ETag {etag.hex()}"
    _changes.info("%s", text, extra={FIELDS: fields})
