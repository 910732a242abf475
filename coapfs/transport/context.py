"""The aiocoap server contexts the supervisor binds: aiocoap's own (`server_context_from_arguments`,
so --bind, --credentials and the TLS options mean what they mean there), with the wire guards of
this package installed on each, one hot-path cost taken out, and one way for a client to put a
traceback in the log closed.

aiocoap names the task that renders each request `"Rendering for %r" % request`, formatting the
whole request — its remote address parsed with `ipaddress` and its interface name looked up —
for every datagram, even though nothing reads the name unless a task is being debugged. Measured
with `bench/` on small-file GETs, that formatting is about a fifth of the server's CPU per
request. The context here renders exactly as aiocoap's does but gives the task a fixed name, and
hands each request's pipe to the amplification check first. Should a future aiocoap change that
method's shape, the stock one stays in use (and amplification is not limited: logged).

aiocoap decodes string options (Uri-Path among them) strictly, and a datagram whose Uri-Path is
not UTF-8 ends in a UnicodeDecodeError traceback and no answer at all (aiocoap issues #176 and
#417, in 0.4.14 to 0.4.17). Decoded with surrogate escapes instead, such a path reaches
`tree.path.parse_uri_path`, which answers it with 4.00; encoded the same way, such a request
can be measured (`amplification.wire_size`) and logged like any other.
"""

from __future__ import annotations

import argparse
import logging
import types
from typing import Any

import aiocoap
import aiocoap.optiontypes
import aiocoap.pipe
from aiocoap.cli.common import server_context_from_arguments

from ..config.schema import AmplificationConfig, DeduplicationConfig
from . import datagrams, dedup, fastpath
from .amplification import AddressCheck, Settings

log = logging.getLogger(__name__)

_HAS_PIPE_HELPERS = hasattr(aiocoap.pipe, "run_driving_pipe") and hasattr(
    aiocoap.pipe, "error_to_message"
)


class WireGuards:
    """What every context of the program shares: the amplification check (its verified
    addresses and Echo key) and the deduplication limits; `configure` applies a reload."""

    def __init__(
        self,
        amplification: AmplificationConfig,
        deduplication: DeduplicationConfig,
        echo_key: bytes | None = None,
    ) -> None:
        self.address_check = AddressCheck(_settings(amplification), echo_key)
        self.limits = dedup.Limits(deduplication.max_entries, deduplication.max_bytes)
        self._deduplications: list[dedup.Deduplication] = []

    def configure(
        self, amplification: AmplificationConfig, deduplication: DeduplicationConfig
    ) -> None:
        self.address_check.settings = _settings(amplification)
        self.limits.max_entries = deduplication.max_entries
        self.limits.max_bytes = deduplication.max_bytes

    def install(self, context: aiocoap.Context) -> None:
        self._deduplications += dedup.install(context, self.limits, self.address_check.fitted)
        datagrams.install(context)

    def stats(self) -> dict[str, int]:
        totals = {"stored": 0, "stored_bytes": 0, "refused": 0}
        for deduplication in self._deduplications:
            for name, value in deduplication.stats().items():
                if name in totals:
                    totals[name] += value
        return {**totals, **self.address_check.stats()}


def _settings(config: AmplificationConfig) -> Settings:
    return Settings(
        config.factor,
        config.trusted,
        config.unverified,
        config.verified_for,
        config.max_verified,
    )


def _render_to_pipe(self: aiocoap.Context, pipe: Any) -> None:
    """aiocoap's Context.render_to_pipe (with its pipe.run_driving_pipe written out), each
    response fitted to what the peer's address may receive, and the rendering task made by the
    context's own loop under a fixed name (asyncio.create_task looks the running loop up, which
    on CPython 3.11 is a getpid() system call per request)."""
    gated = self._coapfs_address_check.gate(pipe)
    driven = aiocoap.pipe.error_to_message(gated, self.log)
    rendering = self._render_to_pipe(gated)

    async def render() -> None:
        try:
            await rendering
        except Exception as e:
            driven.add_exception(e)

    task = self.loop.create_task(render(), name="Rendering a request")
    driven.on_interest_end(task.cancel)


def use_lenient_string_options() -> None:
    """String options (Uri-Path) decoded and encoded with surrogate escapes, process-wide."""
    aiocoap.optiontypes.StringOption.decode = _decode_string_option
    aiocoap.optiontypes.StringOption.encode = _encode_string_option


def _decode_string_option(self: aiocoap.optiontypes.StringOption, rawdata: bytes) -> None:
    self.value = rawdata.decode("utf-8", "surrogateescape")


def _encode_string_option(self: aiocoap.optiontypes.StringOption) -> bytes:
    return self.value.encode("utf-8", "surrogateescape")  # type: ignore[no-any-return]


async def server_context(
    site: Any, namespace: argparse.Namespace, guards: WireGuards, *, udp_only: bool = False
) -> aiocoap.Context:
    """A bound server context for `site`, as aiocoap's command line tools make it (with
    `udp_only`, CoAP over UDP alone: no TCP, TLS or WebSockets listeners)."""
    use_lenient_string_options()
    fastpath.install()
    extra: dict[str, Any] = {"transports": ["udp6"]} if udp_only else {}
    context = await server_context_from_arguments(site, namespace, **extra)
    guards.install(context)
    if _HAS_PIPE_HELPERS and hasattr(context, "_render_to_pipe"):
        context._coapfs_address_check = guards.address_check
        context.render_to_pipe = types.MethodType(_render_to_pipe, context)
    else:
        log.warning("aiocoap's rendering internals differ: responses are not limited in size")
    return context
