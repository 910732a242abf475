"""Configuration sources -> one typed, frozen `Config`, and the one-line errors about them.

Sources, later winning key by key: built-in defaults, the main file (default
/etc/coap-fileserver.toml, absent = defaults; `--config FILE` must exist), the drop-ins
`<file stem>.d/*.toml` next to it in lexical order (so /etc/coap-fileserver.d/ for the
default, and `FILE`'s sibling `<stem>.d/` for `--config`), then the command line.

A relative path means the same whoever reads the configuration: in a file it is taken against
that file's directory, on the command line (and for the built-in default root ".") against
the working directory at start-up. So `--check-config` run from any directory checks what the
service will serve.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import Config, Invalid

DEFAULT_CONFIG_FILE = Path("/etc/coap-fileserver.toml")
COMMAND_LINE = "command line"
BUILT_IN = "built-in default"

Values = dict[str, Any]  # a validated partial config: key -> typed value, table -> Values


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
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


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
            raise ConfigError.bad_value(
                source, dotted + e.where, e.value_or(value), str(e)
            ) from None
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
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(file, f"not valid TOML: not UTF-8 (line {line})") from None
    except OSError as e:
        raise ConfigError(file, f"cannot read: {e.strerror}") from None
    return _anchored(_check(Config, raw, file), file.absolute().parent)


def _anchored(values: Values, base: Path) -> Values:
    """`values` with every relative path taken against `base`."""
    out: Values = {}
    for name, value in values.items():
        if isinstance(value, dict):
            out[name] = _anchored(value, base)
        elif isinstance(value, Path):
            out[name] = Path(os.path.normpath(base / value))
        else:
            out[name] = value
    return out


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
    """A configuration together with where each of its non-default keys came from, so that
    any problem found with a value later is worded naming the file that set it."""

    config: Config
    origins: Mapping[str, str]
    files: tuple[Path, ...]

    def origin(self, dotted_key: str) -> str:
        return self.origins.get(dotted_key, BUILT_IN)

    def value(self, dotted_key: str) -> Any:
        value: Any = self.config
        for part in dotted_key.split("."):
            value = getattr(value, part)
        return value

    def error(self, dotted_key: str, expected: str, problem: str = "") -> ConfigError:
        """`file: key = value: problem; expected ...` for the value this configuration has."""
        value = self.value(dotted_key)
        return ConfigError.bad_value(self.origin(dotted_key), dotted_key, value, expected, problem)


@dataclass(frozen=True)
class Loader:
    """Knows where the configuration comes from, so a reload reads the same sources again.

    `overrides` are the command-line values (validated, keyed like the files); their relative
    paths, and the default root, are taken against `cwd`, recorded at start-up (a daemon later
    runs in /).
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
        """Every path key still relative (the command line's, the default root) taken
        against `cwd`."""
        paths: dict[str, Any] = {
            f.name: Path(os.path.normpath(self.cwd / value))
            for f in dataclasses.fields(config)
            if isinstance(value := getattr(config, f.name), Path)
        }
        return dataclasses.replace(config, **paths)


def check_command_line(overrides: Mapping[str, Any]) -> Values:
    """Validate command-line values with the same schema as the files."""
    return _check(Config, overrides, COMMAND_LINE)
