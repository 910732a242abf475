"""The configuration schema: frozen dataclasses that are the TOML file's tables, every field
carrying a `Key` (parser + one line of help) in its metadata; a field whose type is another
dataclass is a TOML table. To add a table, write a dataclass and add it as a field of `Config`.

Parsers turn a raw TOML value into its typed value or raise `Invalid` saying what was expected;
`load` turns that into a one-line error naming the file and key.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap.util import hostportsplit

MiB = 1024 * 1024


class Invalid(ValueError):
    """Raised by a key parser; the message says what was expected."""


Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """Schema of one key: how to check and convert a TOML value, and what it is for."""

    parse: Parser
    help: str


def key(default: Any, parse: Parser, help: str) -> Any:
    """A dataclass field that is also a configuration key."""
    return field(default=default, metadata={"key": Key(parse, help)})


def table(cls: type, help: str) -> Any:
    """A dataclass field that is a TOML table holding another configuration dataclass."""
    return field(default_factory=cls, metadata={"table": cls, "help": help})


# --- parsers: raw TOML value -> typed value, or Invalid("what was expected") ---------------


def integer(lo: int, hi: int | None = None) -> Parser:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise Invalid(expected)
        return v

    return parse


def positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or v == float("inf"):
        raise Invalid("a number of seconds > 0")
    return float(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid("true or false")
    return v


def one_of(*choices: str) -> Parser:
    expected = " or ".join(f'"{c}"' for c in choices)

    def parse(v: Any) -> str:
        if v not in choices or not isinstance(v, str):
            raise Invalid(expected)
        return v

    return parse


def path(v: Any) -> Path:
    if not isinstance(v, str) or not v or "\0" in v:
        raise Invalid("a non-empty path string")
    return Path(v)


def optional_path(v: Any) -> Path | None:
    if not isinstance(v, str) or "\0" in v:
        raise Invalid('a path string ("" for none)')
    return Path(v) if v else None


@dataclass(frozen=True)
class Bind:
    """One address to serve on, as written (`[::]:5683`, `:5683`, `127.0.0.1`)."""

    text: str
    host: str | None
    port: int | None

    @property
    def hostport(self) -> tuple[str | None, int | None]:
        """The form aiocoap's `server_context_from_arguments` takes as `bind`."""
        return (self.host, self.port)

    def __str__(self) -> str:
        return self.text


def bind_address(v: Any) -> Bind:
    expected = 'an address like "[::]:5683", ":5683", "127.0.0.1:5683" or "[::1]"'
    if not isinstance(v, str) or not v:
        raise Invalid(expected)
    if v.isdigit():
        raise Invalid(f'":{v}" (a port alone needs a leading colon)')
    try:
        host, port = hostportsplit(v)
    except ValueError:
        if v.count(":") >= 2 and "[" not in v:
            raise Invalid(f'"[{v}]" (IPv6 addresses go in square brackets)') from None
        raise Invalid(expected) from None
    return Bind(v, host, port)


def bind_list(v: Any) -> tuple[Bind, ...]:
    if not isinstance(v, list):
        raise Invalid('a list of addresses like ["[::]:5683"] ([] = all addresses, port 5683)')
    binds = tuple(bind_address(item) for item in v)
    if len({b.hostport for b in binds}) != len(binds):
        raise Invalid("each address only once")
    return binds


RD_SCHEMES = ("coap", "coaps", "coap+tcp", "coaps+tcp", "coap+ws", "coaps+ws")


def register(v: Any) -> bool | str:
    expected = 'false, true (find a resource directory) or an RD URI like "coap://rd.example"'
    if isinstance(v, bool):
        return v
    if not isinstance(v, str):
        raise Invalid(expected)
    try:
        uri = urllib.parse.urlsplit(v)
        uri.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise Invalid(expected) from None
    if uri.scheme not in RD_SCHEMES or not uri.hostname:
        raise Invalid(expected)
    return v


# --- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    """[cache]: what the file cache may hold and how it learns about changes."""

    byte_budget: int = key(64 * MiB, integer(0), "bytes of file content kept in memory")
    watch_budget: int = key(1024, integer(1), "directories watched with inotify at most")
    mode: str = key(
        "auto",
        one_of("auto", "inotify", "poll"),
        'change detection: "inotify", "poll", or "auto" (inotify where it works)',
    )
    poll_interval: float = key(2.0, positive_number, "seconds between checks in poll mode")


@dataclass(frozen=True)
class ObserveConfig:
    """[observe]: how changes reach observers."""

    coalesce_ms: int = key(
        100, integer(0, 60_000), "at most one notification per resource in this many milliseconds"
    )


@dataclass(frozen=True)
class Config:
    """Everything the program is configured with; frozen, so a reload builds a new one."""

    root: Path = key(Path("."), path, "directory to serve (relative: to this file's directory)")
    bind: tuple[Bind, ...] = key(
        (), bind_list, 'addresses to serve on, e.g. ["[::]:5683"]; [] = all addresses, port 5683'
    )
    write: bool = key(False, boolean, "allow PUT and DELETE by any client")
    etag_length: int = key(8, integer(0, 8), "ETag length in bytes, 0 disables ETags")
    register: bool | str = key(
        False, register, "register with a resource directory: false, true (discover) or its URI"
    )
    credentials: Path | None = key(
        None, optional_path, "JSON/EDN file with the server's OSCORE/EDHOC credentials"
    )
    tls_server_certificate: Path | None = key(
        None, optional_path, "TLS certificate chain (PEM) for CoAP over TLS"
    )
    tls_server_key: Path | None = key(None, optional_path, "TLS key (PEM) for that certificate")
    verbosity: int = key(0, integer(0, 3), "0 warnings, 1 info, 2 debug (+aiocoap info), 3 all")
    access_log: bool = key(
        False, boolean, "log one line per request: peer, method, path, code, bytes, duration"
    )
    cache: CacheConfig = table(CacheConfig, "the in-memory file cache")
    observe: ObserveConfig = table(ObserveConfig, "CoAP Observe")

    @property
    def service(self) -> ServiceConfig:
        """What the file service is made of; a reload applies it only when this changed."""
        return ServiceConfig(
            self.root, self.write, self.etag_length, self.access_log, self.cache, self.observe
        )


@dataclass(frozen=True)
class ServiceConfig:
    """The part of `Config` that the file service (resource and tree) is built from."""

    root: Path
    write: bool
    etag_length: int
    access_log: bool
    cache: CacheConfig
    observe: ObserveConfig


def iter_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: documents the schema, checks etc/."""
    out = []
    for f in dataclasses.fields(cls):
        if "table" in f.metadata:
            out += iter_keys(f.metadata["table"], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f.default, f.metadata["key"].help))
    return out
