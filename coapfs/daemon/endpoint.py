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
    #: CoAP over UDP alone: a worker other than the first (which alone holds the credentials,
    #: and serves TCP and TLS).
    udp_only: bool = False

    def __str__(self) -> str:
        return str(self.bind) if self.bind is not None else "all addresses"

    @property
    def hostport(self) -> tuple[str | None, int | None] | None:
        """The bind as aiocoap takes it (None: all addresses, default port)."""
        return self.bind.hostport if self.bind is not None else None

    @property
    def port(self) -> int:
        """The UDP port bound (aiocoap's default where none is given)."""
        if self.bind is not None and self.bind.port is not None:
            return self.bind.port
        return COAP_PORT

    def namespace(self) -> argparse.Namespace:
        """The shape aiocoap's server_context_from_arguments expects (argparse output)."""
        return argparse.Namespace(
            bind=self.hostport,
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
            return await server_context(site, self.namespace(), guards, udp_only=self.udp_only)
        except ssl.SSLError as e:
            raise loaded.error(
                "tls_server_certificate",
                "a PEM certificate chain matching tls_server_key",
                e.reason or str(e),
            ) from None
        except OSError as e:
            raise self.bind_error(e) from None
        except ConfigError:
            raise
        except Exception as e:
            if self.credentials is None:
                raise
            # Anything else out of aiocoap's credentials loading is the file's content.
            raise loaded.error(
                "credentials", "a valid credentials file", f"{type(e).__name__}: {e}"
            ) from None

    def bind_error(self, error: OSError) -> StartupError:
        """`cannot bind ADDRESS: PROBLEM`, naming who holds the port where that is visible."""
        problem = error.strerror or str(error)
        if error.errno == errno.EADDRINUSE:
            held_by = port.holder(self.port)
            if held_by is not None:
                problem += f" (held by {held_by})"
        return StartupError(f"cannot bind {self}: {problem}")


def endpoints(config: Config, *, primary: bool = True) -> list[Endpoint]:
    """The endpoints of a configuration; a worker other than the first serves plain UDP only."""
    binds: tuple[Bind | None, ...] = config.bind or (None,)
    if not primary:
        return [Endpoint(b, None, None, None, udp_only=True) for b in binds]
    return [
        Endpoint(b, config.credentials, config.tls_server_certificate, config.tls_server_key)
        for b in binds
    ]
