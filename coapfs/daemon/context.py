"""The aiocoap server contexts the supervisor binds: aiocoap's own (`server_context_from_arguments`,
so --bind, --credentials and the TLS options mean what they mean there), with one hot-path cost
taken out and one way for a client to put a traceback in the log closed.

aiocoap names the task that renders each request `"Rendering for %r" % request`, formatting the
whole request — its remote address parsed with `ipaddress` and its interface name looked up —
for every datagram, even though nothing reads the name unless a task is being debugged. Measured
with `bench/` on small-file GETs, that formatting is about a fifth of the server's CPU per
request. The context here renders exactly as aiocoap's does but gives the task a fixed name.
Should a future aiocoap change that method's shape, the stock one stays in use.

aiocoap decodes string options (Uri-Path among them) strictly, and a datagram whose Uri-Path is
not UTF-8 ends in a UnicodeDecodeError traceback and no answer at all (aiocoap issues #176 and
#417, in 0.4.14 to 0.4.17). Decoded with surrogate escapes instead, such a path reaches
`resolve.parse_uri_path`, which answers it with 4.00.
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

log = logging.getLogger("coapfs")

_HAS_PIPE_HELPERS = hasattr(aiocoap.pipe, "run_driving_pipe") and hasattr(
    aiocoap.pipe, "error_to_message"
)


def _render_to_pipe(self: aiocoap.Context, pipe: Any) -> None:
    """aiocoap's Context.render_to_pipe, with a task name that costs nothing to make."""
    aiocoap.pipe.run_driving_pipe(
        aiocoap.pipe.error_to_message(pipe, self.log),
        self._render_to_pipe(pipe),
        name="Rendering a request",
    )


def _decode_string_option(self: aiocoap.optiontypes.StringOption, rawdata: bytes) -> None:
    self.value = rawdata.decode("utf-8", "surrogateescape")


async def server_context(site: Any, namespace: argparse.Namespace) -> aiocoap.Context:
    """A bound server context for `site`, as aiocoap's command line tools make it."""
    aiocoap.optiontypes.StringOption.decode = _decode_string_option
    context = await server_context_from_arguments(site, namespace)
    if _HAS_PIPE_HELPERS and hasattr(context, "_render_to_pipe"):
        context.render_to_pipe = types.MethodType(_render_to_pipe, context)
    else:
        log.debug("aiocoap's rendering internals differ; request tasks keep their full names")
    return context
