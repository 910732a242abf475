"""The configuration: its schema (`schema`, typed frozen dataclasses) and where it comes from
(`load`: TOML files, drop-ins and the command line, with one-line errors naming file and key)."""

from .load import DEFAULT_CONFIG_FILE, ConfigError, Loaded, Loader, check_command_line, dropin_dir
from .schema import Bind, CacheConfig, Config, ObserveConfig, ServiceConfig

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "Bind",
    "CacheConfig",
    "Config",
    "ConfigError",
    "Loaded",
    "Loader",
    "ObserveConfig",
    "ServiceConfig",
    "check_command_line",
    "dropin_dir",
]
