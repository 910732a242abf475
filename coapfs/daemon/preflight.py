"""What --check-config verifies beyond the schema, and what start-up and every reload verify
before binding anything: the paths the configuration names must be usable."""

from __future__ import annotations

import os

from ..access.rules import PERMISSIONS
from ..config import ConfigError, Loaded
from .credentials import CredentialsError, credential_labels, prepare_credentials


def root_error(loaded: Loaded, error: OSError) -> ConfigError:
    """A root that cannot be opened is a configuration problem: say where it was set."""
    return loaded.error("root", "a readable directory", error.strerror or str(error))


def check_environment(loaded: Loaded) -> None:
    """The root is a readable directory, the credentials usable, the TLS files readable."""
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
            raise loaded.error(name, "a readable file", problem)


def check_credentials(loaded: Loaded) -> None:
    """Make aiocoap's OSCORE importable (also without lakers) and check the credentials file.

    The one place the credentials file is checked: before any server context is created (at
    start and on every reload, via check_environment) and by --check-config.
    """
    try:
        prepare_credentials(loaded.config.credentials)
        labels = credential_labels(loaded.config.credentials)
    except CredentialsError as e:
        raise loaded.error("credentials", "a usable file", e.problem) from None
    check_rule_labels(loaded, labels)


def check_rule_labels(loaded: Loaded, labels: set[str]) -> None:
    """Every credential label an access rule names must be one of the credentials file."""
    credentials = loaded.config.credentials
    known = ", ".join(f'"{label}"' for label in sorted(labels)) or "none: no credentials file"
    for i, rule in enumerate(loaded.config.access, start=1):
        for permission in PERMISSIONS:
            for principal in getattr(rule, permission) or ():
                if principal.kind == "label" and principal.text not in labels:
                    raise ConfigError.bad_value(
                        loaded.origin("access"),
                        f"access[{i}].{permission}",
                        principal.text,
                        f"a label of the credentials file {credentials or ''} ({known})".replace(
                            "  ", " "
                        ),
                        "unknown credential label",
                    )
