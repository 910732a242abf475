"""Configuration: TOML files and command-line overrides -> one typed, frozen `Config`.

Sources, later winning key by key: built-in defaults, the main file (default
/etc/coap-fileserver.toml, absent = defaults; `--config FILE` must exist), the drop-ins
`<file stem>.d/*.toml` next to it in lexical order (so /etc/coap-fileserver.d/ for the
default, and `FILE`'s sibling `<stem>.d/` for `--config`), then the command line.

The schema *is* the dataclasses below: every field carries a `Key` (parser + one line of
help) in its metadata, and a field whose type is another dataclass is a TOML table. To add
a table, write a dataclass and add it as a field of `Config`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap.util import hostportsplit

DEFAULT_CONFIG_FILE = Path("/etc/coap-fileserver.toml")
COMMAND_LINE = "command line"
MiB = 1024 * 1024


class ConfigError(Exception):
    """A configuration problem; `str()` is one line naming the source and what is wrong."""

    def __init__(self, source: str | Path, message: str, key: str = "") -> None:
        self.source, self.key = str(source), key
        super().__init__(f"{source}: {message}".replace("\n", " "))

    @classmethod
    def bad_value(
        cls, source: str | Path, key: str, value: Any, expected: str, problem: str = ""
    ) -> ConfigError:
        """`file: table.key = value: [problem; ]expected what`."""
        problem = f"{problem}; " if problem else ""
        return cls(source, f"{key} = {_toml_repr(value)}: {problem}expected {expected}", key)


def _toml_repr(value: Any) -> str:
    """Show a value roughly as it was written in TOML, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Path):
        return _toml_repr(str(value))
    return repr(value)


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

    root: Path = key(Path("."), path, "directory to serve (relative: to the working directory)")
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
    cache: CacheConfig = table(CacheConfig, "the in-memory file cache")
    observe: ObserveConfig = table(ObserveConfig, "CoAP Observe")


# --- loading -------------------------------------------------------------------------------

Values = dict[str, Any]  # a validated partial config: key -> typed value, table -> Values


def _check(cls: type, raw: Mapping[str, Any], source: str | Path, prefix: str = "") -> Values:
    """Validate one source's raw mapping against dataclass `cls`; return the typed values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: Values = {}
    for name, value in raw.items():
        dotted = prefix + name
        f = fields.get(name)
        if f is None:
            known = ", ".join(prefix + n for n in fields)
            raise ConfigError.bad_value(source, dotted, value, f"one of {known}", "unknown key")
        if "table" in f.metadata:
            if not isinstance(value, dict):
                raise ConfigError.bad_value(source, dotted, value, f"a table [{dotted}]")
            out[name] = _check(f.metadata["table"], value, source, dotted + ".")
            continue
        try:
            out[name] = f.metadata["key"].parse(value)
        except Invalid as e:
            raise ConfigError.bad_value(source, dotted, value, str(e)) from None
    return out


def _merge(base: Values, over: Values) -> Values:
    """Later wins, key by key; tables merge."""
    merged = dict(base)
    for name, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _build(cls: type, values: Values) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            kwargs[f.name] = _build(f.metadata["table"], v) if "table" in f.metadata else v
    return cls(**kwargs)


def read_file(file: Path) -> Values:
    """Parse and validate one TOML file."""
    try:
        with open(file, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, f"not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(file, f"cannot read: {e.strerror}") from None
    return _check(Config, raw, file)


def dropin_dir(config_file: Path) -> Path:
    """`/etc/coap-fileserver.toml` -> `/etc/coap-fileserver.d`."""
    return config_file.with_name(config_file.stem + ".d")


def config_files(config_file: Path | None) -> list[Path]:
    """The files to read, in order. Only `*.toml` drop-ins count (not `.dpkg-old`, `~`)."""
    main = config_file if config_file is not None else DEFAULT_CONFIG_FILE
    files = [main] if config_file is not None or main.exists() else []
    ddir = dropin_dir(main)
    try:
        names = sorted(os.listdir(ddir))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise ConfigError(ddir, f"cannot read drop-in directory: {e.strerror}") from None
    files += [ddir / n for n in names if n.endswith(".toml") and not n.startswith(".")]
    return files


def _origins(values: Values, source: str, prefix: str = "") -> dict[str, str]:
    """dotted key -> the source that set it."""
    out = {}
    for name, value in values.items():
        if isinstance(value, dict):
            out.update(_origins(value, source, prefix + name + "."))
        else:
            out[prefix + name] = source
    return out


@dataclass(frozen=True)
class Loaded:
    """A configuration together with where each of its non-default keys came from."""

    config: Config
    origins: Mapping[str, str]
    files: tuple[Path, ...]

    def origin(self, dotted_key: str) -> str:
        return self.origins.get(dotted_key, "built-in default")


@dataclass(frozen=True)
class Loader:
    """Knows where the configuration comes from, so a reload reads the same sources again.

    `overrides` are the command-line values (validated, keyed like the files); relative
    paths are taken against `cwd`, recorded at start-up (a daemon later runs in /).
    """

    config_file: Path | None = None
    overrides: Values = field(default_factory=dict)
    cwd: Path = field(default_factory=Path.cwd)

    def load(self) -> Loaded:
        """Read every source now; raise ConfigError for the first problem."""
        values: Values = {}
        origins: dict[str, str] = {}
        files = tuple(config_files(self.config_file))
        for file in files:
            v = read_file(file)
            values = _merge(values, v)
            origins.update(_origins(v, str(file)))
        values = _merge(values, self.overrides)
        origins.update(_origins(self.overrides, COMMAND_LINE))
        config = _build(Config, values)
        return Loaded(self._absolute(config), origins, files)

    def _absolute(self, config: Config) -> Config:
        def absolute(p: Path | None) -> Path | None:
            return None if p is None else Path(os.path.normpath(self.cwd / p))

        return dataclasses.replace(
            config,
            root=Path(os.path.normpath(self.cwd / config.root)),
            credentials=absolute(config.credentials),
            tls_server_certificate=absolute(config.tls_server_certificate),
            tls_server_key=absolute(config.tls_server_key),
        )


def check_command_line(overrides: Mapping[str, Any]) -> Values:
    """Validate command-line values with the same schema as the files."""
    return _check(Config, overrides, COMMAND_LINE)


def root_error(loaded: Loaded, error: OSError) -> ConfigError:
    """A root that cannot be opened is a configuration problem: say where it was set."""
    root = loaded.config.root
    problem = error.strerror or str(error)
    return ConfigError.bad_value(
        loaded.origin("root"), "root", str(root), "a readable directory", problem
    )


def check_environment(loaded: Loaded) -> None:
    """What --check-config verifies beyond the schema: the paths named must be usable."""
    config = loaded.config
    try:
        with os.scandir(config.root):
            pass
    except OSError as e:
        raise root_error(loaded, e) from None
    check_credentials(loaded)
    for name in ("tls_server_certificate", "tls_server_key"):
        p = getattr(config, name)
        if p is not None and not os.access(p, os.R_OK):
            problem = "no such file" if not p.exists() else "not readable"
            raise ConfigError.bad_value(
                loaded.origin(name), name, str(p), "a readable file", problem
            )


def check_credentials(loaded: Loaded) -> None:
    """Make aiocoap's OSCORE importable (also without lakers) and check the credentials file.

    The one place coapfs.credentials is called: before any server context is created (at
    start and on every reload, via check_environment) and by --check-config.
    """
    from .credentials import CredentialsError, prepare_credentials

    path = loaded.config.credentials
    try:
        prepare_credentials(path)
    except CredentialsError as e:
        raise ConfigError.bad_value(
            loaded.origin("credentials"), "credentials", str(path), "a usable file", e.problem
        ) from None


def iter_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: documents the schema, checks etc/."""
    out = []
    for f in dataclasses.fields(cls):
        if "table" in f.metadata:
            out += iter_keys(f.metadata["table"], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f.default, f.metadata["key"].help))
    return out
