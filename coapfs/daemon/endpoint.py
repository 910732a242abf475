"""The aiocoap server contexts the program binds: one per bind address, each made of the same
credentials and TLS files; a reload re-binds only the endpoints that changed."""

from __future__ import annotations

import argparse
import errno
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap

from ..config import Bind, Config, ConfigError, Loaded
from ..transport.context import WireGuards, server_context
from . import port

COAP_PORT = 5683

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up failed for a reason that is not the configuration (e.g. port in use)."""


@dataclass(frozen=True)
class Endpoint:
    """What one aiocoap context is made of."""

    bind: Bind | None  # None: aiocoap's default, all addresses on the default ports
    credentials: Path | None
    tls_server_certificate: Path | None
    tls_server_key: Path | None

    def __str__(self) -> str:
        return str(self.bind) if self.bind is not None else "all addresses"

    @property
    def port(self) -> int:
        """The UDP port bound (aiocoap's default where none is given)."""
        if self.bind is not None and self.bind.port is not None:
            return self.bind.port
        return COAP_PORT

    def namespace(self) -> argparse.Namespace:
        """The shape aiocoap's server_context_from_arguments expects (argparse output)."""
        return argparse.Namespace(
            bind=self.bind.hostport if self.bind is not None else None,
            credentials=self.credentials,
            tls_server_certificate=(
                str(self.tls_server_certificate) if self.tls_server_certificate else None
            ),
            tls_server_key=str(self.tls_server_key) if self.tls_server_key else None,
        )

    async def bind_to(self, site: Any, loaded: Loaded, guards: WireGuards) -> aiocoap.Context:
        """A bound server context for `site`; errors become one line naming what failed."""
        log.debug("Binding %s", self)
        try:
            return await server_context(site, self.namespace(), guards)
        except ssl.SSLError as e:
            raise loaded.error(
                "tls_server_certificate",
                "a PEM certificate chain matching tls_server_key",
                e.reason or str(e),
            ) from None
        except OSError as e:
            problem = e.strerror or str(e)
            if e.errno == errno.EADDRINUSE:
                held_by = port.holder(self.port)
                if held_by is not None:
                    problem += f" (held by {held_by})"
            raise StartupError(f"cannot bind {self}: {problem}") from None
        except ConfigError:
            raise
        except Exception as e:
            if self.credentials is None:
                raise
            # Anything else out of aiocoap's credentials loading is the file's content.
            raise loaded.error(
                "credentials", "a valid credentials file", f"{type(e).__name__}: {e}"
            ) from None


def endpoints(config: Config) -> list[Endpoint]:
    binds: tuple[Bind | None, ...] = config.bind or (None,)
    return [
        Endpoint(b, config.credentials, config.tls_server_certificate, config.tls_server_key)
        for b in binds
    ]
