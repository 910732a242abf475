"""Guess a file's CoAP Content-Format from its name."""

from __future__ import annotations

import functools
import mimetypes

from aiocoap.numbers import ContentFormat


@functools.lru_cache(maxsize=1024)
def guess_content_format(name: str) -> ContentFormat | None:
    """The registered Content-Format for the name's media type; text/* without a CoAP number
    becomes text/plain;charset=utf-8; anything else gets none."""
    media_type, _encoding = mimetypes.guess_type(name, strict=False)
    if media_type is None:
        return None
    try:
        return ContentFormat.by_media_type(media_type)
    except KeyError:
        return ContentFormat.TEXT if media_type.startswith("text/") else None
