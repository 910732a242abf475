"""Request options the file service checks before doing anything: critical options it does not
act on, proxying, Accept, and the preconditions If-Match and If-None-Match."""

from __future__ import annotations

import aiocoap
from aiocoap.numbers import ContentFormat, OptionNumber

from . import errors

#: The critical options (RFC 7252 5.4.1) this service acts on (Uri-Host, Uri-Port and Uri-Query
#: by serving the one tree whatever they say); any other critical option is a 4.02.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        OptionNumber.IF_MATCH,
        OptionNumber.URI_HOST,
        OptionNumber.IF_NONE_MATCH,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
    }
)
_PROXY_OPTIONS = frozenset({OptionNumber.PROXY_URI, OptionNumber.PROXY_SCHEME})


#: Options whose value is a Content-Format number: at most 2 bytes (RFC 7252 12.3).
_FORMAT_OPTIONS = frozenset({OptionNumber.CONTENT_FORMAT, OptionNumber.ACCEPT})


def check_options(request: aiocoap.Message) -> None:
    """Refuse what this server cannot honour: proxying (5.05, RFC 7252 5.7.2), any critical
    option it does not act on (4.02), and a Content-Format or Accept longer than its 2 bytes
    (4.02: it would be stored or compared as a number no format has), rather than serving
    something the client did not ask for."""
    for option in request.opt.option_list():
        number = option.number
        if number in _PROXY_OPTIONS:
            raise errors.NotAProxy()
        if number.is_critical() and number not in _UNDERSTOOD_CRITICAL:
            raise errors.UnsupportedOption(f"Unsupported critical option {int(number)}")
        if number in _FORMAT_OPTIONS and not 0 <= int(option.value) <= 0xFFFF:
            raise errors.UnsupportedOption(
                f"Option {int(number)} longer than 2 bytes: no Content-Format is"
            )


def check_accept(request: aiocoap.Message, content_format: ContentFormat | None) -> None:
    """4.06 unless Accept names what would be sent (octet-stream where no format is known)."""
    accept = request.opt.accept
    if accept is not None and accept != (content_format or ContentFormat.OCTETSTREAM):
        raise errors.NotAcceptable()


def check_conditions(request: aiocoap.Message, etag: bytes | None, *, exists: bool) -> None:
    """If-Match (an empty one: "exists") and If-None-Match (RFC 7252 5.10.8), for any method."""
    wanted = request.opt.if_match
    if wanted:
        if not exists:
            raise errors.PreconditionFailed("The file does not exist (If-Match)")
        if b"" not in wanted and etag is None:
            raise errors.PreconditionFailed(
                "No ETag to match: ETags are disabled here (an empty If-Match means 'exists')"
            )
        if b"" not in wanted and etag not in wanted:
            raise errors.PreconditionFailed("The file has changed (If-Match)")
    if exists and request.opt.if_none_match:
        raise errors.PreconditionFailed("The file exists (If-None-Match)")
