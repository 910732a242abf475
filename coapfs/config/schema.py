"""The configuration schema: frozen dataclasses that are the TOML file's tables, every field
carrying a `Setting` (parser + one line of help) in its metadata; a field whose type is another
dataclass is a TOML table. To add a table, write a dataclass and add it as a field of `Config`.

Parsers turn a raw TOML value into its typed value or raise `Invalid` saying what was expected;
`load` turns that into a one-line error naming the file and key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap.util import hostportsplit

from ..access.peer import BadNetwork, IPNetwork, parse_network
from ..access.rules import AccessRule, BadRule, parse_rules

MiB = 1024 * 1024


_WHOLE = object()


class Invalid(ValueError):
    """Raised by a key parser; the message says what was expected. For a value made of parts
    (an array of tables), `where` names the part (`[2].read`) and `value` its value."""

    def __init__(self, expected: str, where: str = "", value: Any = _WHOLE) -> None:
        super().__init__(expected)
        self.where, self.value = where, value

    def value_or(self, whole: Any) -> Any:
        return whole if self.value is _WHOLE else self.value


Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Setting:
    """Schema of one key: how to check and convert a TOML value, and what it is for."""

    parse: Parser
    help: str


def key(default: Any, parse: Parser, help: str) -> Any:
    """A dataclass field that is also a configuration key."""
    return field(default=default, metadata={"key": Setting(parse, help)})


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


def worker_processes(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
        raise Invalid('a number of processes from 1 to 256, or "auto" (one per CPU)')
    return v


class _Octal(int):
    """Permission bits shown in an error as they are written in TOML (0o4755), not 2541."""

    def __repr__(self) -> str:
        return oct(self)


def permission_bits(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        expected = "permission bits like 0o644 (TOML octal), without setuid/setgid/sticky"
        raise Invalid(expected, value=_Octal(v) if isinstance(v, int) else _WHOLE)
    return v


def network_list(v: Any) -> tuple[IPNetwork, ...]:
    expected = 'a list of networks like ["127.0.0.0/8", "::1/128", "192.168.0.0/16"]'
    if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
        raise Invalid(expected)
    networks = []
    for i, item in enumerate(v, start=1):
        try:
            networks.append(parse_network(item))
        except BadNetwork as e:
            hint = e.hint or 'a network like "192.0.2.0/24" or "fd00::/8"'
            raise Invalid(hint, f"[{i}]", item) from None
    return tuple(networks)


def factor(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
        raise Invalid("a number >= 0 (0: no limit)")
    return float(v)


#: Where amplification is no concern by default: loopback, private IPv4, IPv6 unique-local and
#: link-local (a LAN). Public addresses are limited until verified.
TRUSTED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def access_rules(v: Any) -> tuple[AccessRule, ...]:
    try:
        return parse_rules(v)
    except BadRule as e:
        raise Invalid(str(e), e.where, e.value) from None


# --- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadConfig:
    """[upload]: limits on writes over CoAP, and the permissions of what they create."""

    max_size: int = key(256 * MiB, integer(0), "largest upload in bytes (4.13 beyond, with Size1)")
    max_concurrent: int = key(
        32, integer(1), "block-wise uploads in progress at once (5.03 with Max-Age beyond)"
    )
    idle_timeout: float = key(
        60.0, positive_number, "seconds without a block after which an upload is dropped"
    )
    file_mode: int = key(0o644, permission_bits, "mode of new files (under the umask), e.g. 0o640")
    directory_mode: int = key(
        0o755, permission_bits, "mode of directories made by PUT dir/ (under the umask)"
    )


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
    max_per_peer: int = key(
        64, integer(0), "observations one endpoint may hold; beyond, GETs are not observed"
    )
    max_total: int = key(
        20_000, integer(0), "observations in all; beyond, GETs are answered without Observe"
    )


@dataclass(frozen=True)
class AmplificationConfig:
    """[amplification]: how much a peer whose source address is not verified can receive."""

    factor: float = key(3.0, factor, "a response is at most this times the request (0: no limit)")
    trusted: tuple[IPNetwork, ...] = key(
        TRUSTED_NETWORKS,
        network_list,
        "networks exempt from the limit (default: loopback, private, link-local: a LAN)",
    )
    unverified: str = key(
        "small-blocks",
        one_of("small-blocks", "echo"),
        'a GET too large to answer: "small-blocks" (any client) or "echo" (4.01 + Echo)',
    )
    verified_for: float = key(600.0, positive_number, "seconds a verified address stays so")
    max_verified: int = key(10_000, integer(1), "verified addresses remembered at most")


@dataclass(frozen=True)
class DeduplicationConfig:
    """[deduplication]: responses kept for retransmissions of requests that must not run twice."""

    max_entries: int = key(
        10_000, integer(1), "responses kept at most (beyond: new PUT/DELETE get 5.03)"
    )
    max_bytes: int = key(16 * MiB, integer(1), "bytes of kept responses at most")


@dataclass(frozen=True)
class Config:
    """Everything the program is configured with; frozen, so a reload builds a new one."""

    root: Path = key(Path("."), path, "directory to serve (relative: to this file's directory)")
    bind: tuple[Bind, ...] = key(
        (), bind_list, 'addresses to serve on, e.g. ["[::]:5683"]; [] = all addresses, port 5683'
    )
    write: bool = key(
        False, boolean, "allow PUT and DELETE by any client where no [[access]] rule says who"
    )
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
    workers: int | str = key(
        1, worker_processes, 'processes serving the binds: a number, or "auto" (one per usable CPU)'
    )
    access_log: bool = key(
        False, boolean, "log one line per request: peer, method, path, code, bytes, duration"
    )
    access: tuple[AccessRule, ...] = key(
        (), access_rules, "who may read and write what: [[access]] tables with path, read, write"
    )
    cache: CacheConfig = table(CacheConfig, "the in-memory file cache")
    observe: ObserveConfig = table(ObserveConfig, "CoAP Observe")
    upload: UploadConfig = table(UploadConfig, "writes over CoAP")
    amplification: AmplificationConfig = table(AmplificationConfig, "unverified source addresses")
    deduplication: DeduplicationConfig = table(DeduplicationConfig, "the message layer's memory")

    @property
    def service(self) -> ServiceConfig:
        """What the file service is made of; a reload applies it only when this changed."""
        return ServiceConfig(
            self.root,
            self.write,
            self.etag_length,
            self.access_log,
            self.access,
            self.cache,
            self.observe,
            self.upload,
        )


@dataclass(frozen=True)
class ServiceConfig:
    """The part of `Config` that the file service (resource and tree) is built from."""

    root: Path
    write: bool
    etag_length: int
    access_log: bool
    access: tuple[AccessRule, ...]
    cache: CacheConfig
    observe: ObserveConfig
    upload: UploadConfig


def iter_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: documents the schema, checks etc/."""
    out = []
    for f in dataclasses.fields(cls):
        if "table" in f.metadata:
            out += iter_keys(f.metadata["table"], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f.default, f.metadata["key"].help))
    return out
