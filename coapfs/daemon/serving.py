"""What one process serves: the file service behind its gate, an aiocoap context per endpoint on
the UDP sockets claimed for it (`sockets`, handed over through `transport.inherited`), and the
resource-directory registration. The supervisor drives it: in the same process with one
worker, or through `workers` in each worker process.

A reload is two steps, so that every worker of a server applies a configuration or none does:
`prepare` does what can fail without changing anything visible (the new root opened, new bind
addresses bound), then `commit` switches over (only re-binding an address whose credentials or
TLS files changed can still fail, and then restores the old state), or `abort` drops it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.resourcedirectory.client.register import Registerer

from ..access.peer import parse_ip
from ..config import Config, ConfigError, Loaded
from ..protocol.resource import FileService, Prepared
from ..transport import inherited
from ..transport.context import WireGuards
from . import journal
from .endpoint import Endpoint, StartupError, endpoints
from .gate import Gate
from .preflight import root_error
from .sockets import Claims

log = logging.getLogger(__name__)

#: How long in-flight exchanges may take to finish once SIGTERM arrived.
STOP_GRACE = 2.0
#: Deregistering from the RD must not hold up a stop indefinitely.
DEREGISTER_TIMEOUT = 3.0
#: Registration lifetime, as aiocoap-fileserver.
REGISTER_LIFETIME = 60
#: The drop-in that lets the packaged service write its root, and where it goes.
WRITE_DROPIN = "/usr/share/doc/coap-fileserver/examples/write.conf"
UNIT_DROPIN_DIR = "/etc/systemd/system/coap-fileserver.service.d"


@dataclass(frozen=True)
class Role:
    """Which worker this process is (of how many); the first holds the credentials, serves TCP
    and TLS, and registers with a resource directory."""

    index: int = 0
    workers: int = 1

    @property
    def primary(self) -> bool:
        return self.index == 0


@dataclass
class Change:
    """A prepared reload: what `commit` switches to, or `abort` drops."""

    loaded: Loaded
    service: Prepared | None
    added: dict[Endpoint, aiocoap.Context] = field(default_factory=dict)


class Server:
    """One process's serving, for one process lifetime."""

    def __init__(self, loaded: Loaded, role: Role = Role(), echo_key: bytes | None = None) -> None:
        try:
            self.service = FileService(loaded.config.service)
        except OSError as e:
            raise root_error(loaded, e) from None
        self.loaded = loaded
        self.role = role
        self.gate = Gate(self.service)
        config = loaded.config
        self.guards = WireGuards(config.amplification, config.deduplication, echo_key)
        self._contexts: dict[Endpoint, aiocoap.Context] = {}
        self._registerer: Registerer | None = None

    @property
    def config(self) -> Config:
        return self.loaded.config

    def endpoints(self, config: Config) -> list[Endpoint]:
        return endpoints(config, primary=self.role.primary)

    def bound(self) -> list[Endpoint]:
        return list(self._contexts)

    # --- start ------------------------------------------------------------------------------

    async def start(self, sockets: dict[Any, socket.socket]) -> None:
        """Bind every endpoint (on `sockets`, by aiocoap bind), start watching, register."""
        for bind, sock in sockets.items():
            inherited.register(bind, sock)
        for endpoint in self.endpoints(self.config):
            self._contexts[endpoint] = await endpoint.bind_to(self.gate, self.loaded, self.guards)
        self.service.start(sweep=self.role.primary)
        _settle_collector()
        if self.role.primary:
            self._register(self.config)
            self.warn_if_unwritable()
            self.warn_if_anyone_writes_beyond_loopback()

    def warn_if_unwritable(self) -> None:
        """`write = true` on a root this process cannot write: every PUT would get 4.03."""
        if not self.config.write:
            return
        reason = self.service.tree.unwritable_reason()
        if reason is None:
            return
        root = self.config.root
        log.warning(
            "write = true, but %s cannot be written: %s; PUT and DELETE will be refused. "
            "Under systemd, install the drop-in that opens it (cp %s %s/) and give the service "
            "the directory (chown coap-fileserver:coap-fileserver %s), then "
            "systemctl daemon-reload && systemctl restart coap-fileserver",
            root,
            reason,
            WRITE_DROPIN,
            UNIT_DROPIN_DIR,
            root,
        )

    def warn_if_anyone_writes_beyond_loopback(self) -> None:
        """`write = true` means anyone who reaches the port may write (aiocoap-fileserver's
        meaning), which beyond loopback is rarely what was meant once [[access]] rules exist."""
        if not (self.config.write and self.service.rules.anyone_writes_somewhere):
            return
        exposed = [str(e) for e in self._contexts if not _loopback_only(e)]
        if exposed:
            log.warning(
                "write = true and no [[access]] rule restricts writing: anyone who can reach %s "
                "may replace and delete files; name who may write in [[access]] rules "
                '(e.g. write = ":client-label" or a network)',
                ", ".join(exposed),
            )

    def _register(self, config: Config) -> None:
        if config.register is False or not self._contexts:
            return
        rd = None if config.register is True else config.register
        if rd is not None and rd.count("/") != 2:
            log.warning("Resource directory %s does not look like a host-only CoAP URI", rd)
        first = next(iter(self._contexts.values()))
        self._registerer = Registerer(first, rd=rd, lt=REGISTER_LIFETIME)

    async def _deregister(self) -> None:
        registerer, self._registerer = self._registerer, None
        if registerer is None:
            return
        try:
            await asyncio.wait_for(registerer.shutdown(), DEREGISTER_TIMEOUT)
        except TimeoutError:
            log.warning("Deregistering from the resource directory timed out")

    # --- reload -----------------------------------------------------------------------------

    async def prepare(self, loaded: Loaded, sockets: dict[Any, socket.socket]) -> Change:
        """Open the new root, bind the new bind addresses (on `sockets`); nothing else changes.
        Raises ConfigError or StartupError, having undone what it did."""
        old, new = self.config, loaded.config
        change = Change(loaded, None)
        try:
            if new.service != old.service:
                try:
                    change.service = self.service.prepare(new.service)
                except OSError as e:
                    raise root_error(loaded, e) from None
            for bind, sock in sockets.items():
                inherited.register(bind, sock)
            taken = {e.hostport for e in self._contexts}
            for endpoint in self.endpoints(new):
                if endpoint not in self._contexts and endpoint.hostport not in taken:
                    log.info("Binding %s", endpoint)
                    change.added[endpoint] = await endpoint.bind_to(self.gate, loaded, self.guards)
        except BaseException:
            await self.abort(change)
            raise
        return change

    async def abort(self, change: Change) -> None:
        for context in change.added.values():
            await context.shutdown()
        change.added.clear()
        if change.service is not None:
            change.service.discard()
            change.service = None

    async def commit(self, change: Change) -> None:
        """Switch to the prepared configuration. Re-binding an address whose other settings
        changed is the one step that can fail: then the old state is restored and the error
        raised (the caller aborts the change)."""
        old, new = self.config, change.loaded.config
        wanted = self.endpoints(new)
        rebinding = set(wanted) != set(self._contexts)
        reregister = self.role.primary and (
            new.register != old.register or (old.register is not False and rebinding)
        )
        if reregister:
            await self._deregister()  # while the context that registered is still bound
        try:
            await self._rebind(wanted, change)
        except (ConfigError, StartupError):
            if reregister:
                self._register(old)
            raise
        if change.service is not None:
            self.service.apply(change.service)
            change.service = None
        if reregister:
            self._register(new)
        journal.set_verbosity(new.verbosity)
        self.guards.configure(new.amplification, new.deduplication)
        self.loaded = change.loaded
        if self.role.primary:
            if new.write and (new.write, new.root) != (old.write, old.root):
                self.warn_if_unwritable()
            if (new.write, new.access, new.bind) != (old.write, old.access, old.bind):
                self.warn_if_anyone_writes_beyond_loopback()

    async def _rebind(self, wanted: list[Endpoint], change: Change) -> None:
        """Unbind what is no longer wanted; re-bind in place what changed but its address;
        take over what `prepare` bound. On failure, restore the old set."""
        current = self._contexts
        gone = [e for e in current if e not in wanted]
        replacing = [
            e for e in wanted if e not in current and e not in change.added
        ]  # same address, other credentials or TLS files
        for endpoint in gone:
            log.info("Unbinding %s", endpoint)
            await current[endpoint].shutdown()
        rebound: dict[Endpoint, aiocoap.Context] = {}
        try:
            for endpoint in replacing:
                log.info("Binding %s", endpoint)
                rebound[endpoint] = await endpoint.bind_to(self.gate, change.loaded, self.guards)
        except (ConfigError, StartupError):
            for context in rebound.values():
                await context.shutdown()
            for endpoint in gone:
                try:
                    current[endpoint] = await endpoint.bind_to(self.gate, self.loaded, self.guards)
                except (ConfigError, StartupError) as e:
                    log.error("Could not restore %s: %s", endpoint, e)
                    del current[endpoint]
            raise
        kept = {e: current[e] for e in wanted if e in current}
        self._contexts = {e: kept.get(e) or change.added.get(e) or rebound[e] for e in wanted}
        change.added.clear()
        for endpoint in gone:
            if endpoint.hostport not in {e.hostport for e in wanted}:
                inherited.unregister(endpoint.hostport)

    async def bind(self, endpoints: list[Endpoint], sockets: dict[Any, socket.socket]) -> None:
        """Serve these endpoints (again) on `sockets`."""
        for bind, sock in sockets.items():
            inherited.register(bind, sock)
        for endpoint in endpoints:
            self._contexts[endpoint] = await endpoint.bind_to(self.gate, self.loaded, self.guards)

    async def unbind(self, going: list[Endpoint]) -> None:
        """Stop serving these endpoints now (a reload gives their addresses up)."""
        for endpoint in going:
            log.info("Unbinding %s", endpoint)
            await self._contexts.pop(endpoint).shutdown()
            inherited.unregister(endpoint.hostport)

    # --- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Refuse new requests, let in-flight ones finish, tell observers (5.03), deregister,
        unbind, close."""
        deadline = asyncio.get_running_loop().time() + STOP_GRACE
        cut = await self.gate.close(STOP_GRACE)
        if cut:
            log.warning("Stopped with %d exchange(s) still in flight", cut)
        await self._end_observations(deadline)
        await self._deregister()
        contexts, self._contexts = list(self._contexts.values()), {}
        await asyncio.gather(*(c.shutdown() for c in contexts), return_exceptions=True)
        self.service.close()

    async def _end_observations(self, deadline: float) -> None:
        """Tell every observer the service is going (5.03), rather than leaving them waiting
        for Max-Age; the notifications are given until `deadline` to go out."""
        if not self.service.end_observations(Code.SERVICE_UNAVAILABLE, "Shutting down"):
            return
        loop = asyncio.get_running_loop()
        while self.service.stats()["observers"] and loop.time() < deadline:
            await asyncio.sleep(0.02)

    # --- figures ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The file service's figures and the wire guards' (summed by the supervisor)."""
        wire = {f"wire_{k}": v for k, v in self.guards.stats().items()}
        return {**self.service.stats(), **wire}


#: Allocations between young-generation collections (CPython's default: 700). Each request makes
#: a few hundred short-lived objects; collecting that often was a sixth of the CPU per request.
_YOUNG_THRESHOLD = 10_000


def _settle_collector() -> None:
    """Once serving: what start-up made moves out of the cyclic collector's way (gc.freeze),
    so that full collections, which every observer's state makes longer, stay short, and young
    collections run less often."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_THRESHOLD, middle, old)


def _loopback_only(endpoint: Endpoint) -> bool:
    """Whether only this host can reach the endpoint (a bind to loopback addresses alone)."""
    host = endpoint.bind.host if endpoint.bind is not None else None
    if not host:
        return False  # all addresses
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)}
    except OSError:
        return False
    addresses = [parse_ip(str(a)) for a in found]
    return bool(addresses) and all(a is not None and a.is_loopback for a in addresses)


async def claim_endpoints(claims: Claims, wanted: list[Endpoint]) -> list[Any]:
    """Claim the sockets of endpoints whose address is not claimed yet; a failure is the one
    line `cannot bind ADDRESS: PROBLEM` (StartupError). Which addresses were new."""
    try:
        return await claims.claim([e.hostport for e in wanted])
    except OSError as e:
        failed = next((w for w in wanted if w.hostport == getattr(e, "bind", None)), wanted[0])
        raise failed.bind_error(e) from None


class InProcess:
    """One worker: the supervisor's own process serves."""

    def __init__(self, loaded: Loaded) -> None:
        self.server = Server(loaded)
        self._claims = Claims(1)

    async def start(self) -> None:
        wanted = self.server.endpoints(self.server.config)
        await claim_endpoints(self._claims, wanted)
        sockets = {e.hostport: self._claims.socket(e.hostport, 0) for e in wanted}
        await self.server.start(sockets)

    async def reload(self, loaded: Loaded) -> None:
        wanted = self.server.endpoints(loaded.config)
        try:
            new = await claim_endpoints(self._claims, wanted)
        except StartupError:
            # Perhaps an address that overlaps one being given up ("all addresses" for
            # 127.0.0.1 on the same port): give those up first, as the reload will.
            going = await self._unbind_going(wanted)
            if not going:
                raise
            try:
                new = await claim_endpoints(self._claims, wanted)
            except StartupError:
                await self._bind_again(going)
                raise
        try:
            sockets = {bind: self._claims.socket(bind, 0) for bind in new}
            change = await self.server.prepare(loaded, sockets)
            try:
                await self.server.commit(change)
            except BaseException:
                await self.server.abort(change)
                raise
        except BaseException:
            self._claims.release(new)
            raise
        self._claims.keep_only([e.hostport for e in wanted])

    async def _unbind_going(self, wanted: list[Endpoint]) -> list[Endpoint]:
        """Unbind the addresses `wanted` gives up and release their sockets; which."""
        keep = {e.hostport for e in wanted}
        going = [e for e in self.server.bound() if e.hostport not in keep]
        if going:
            await self.server.unbind(going)
            self._claims.release([e.hostport for e in going])
        return going

    async def _bind_again(self, endpoints: list[Endpoint]) -> None:
        """Serve what `_unbind_going` gave up again (the reload failed)."""
        try:
            await claim_endpoints(self._claims, endpoints)
            sockets = {e.hostport: self._claims.socket(e.hostport, 0) for e in endpoints}
            await self.server.bind(endpoints, sockets)
        except (ConfigError, StartupError) as e:
            log.error("Could not serve %s again: %s", ", ".join(map(str, endpoints)), e)

    async def stop(self) -> None:
        try:
            await self.server.stop()
        finally:
            self._claims.close()

    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    def responsive(self) -> bool:
        return True  # this very loop feeds the watchdog

    def bound(self) -> list[Endpoint]:
        return self.server.bound()

    @property
    def service(self) -> FileService:
        return self.server.service
