"""The program's lifecycle: open the root, bind, tell systemd, reload on SIGHUP, stop cleanly.

The resource (`protocol.resource.FileService`) is protocol behaviour only; this module owns
everything around it, as aiocoap's fileserver program does for its resource: the aiocoap
contexts (one per bind address), the resource-directory registration, sd_notify states,
the watchdog, signals and the reload of the configuration.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.resourcedirectory.client.register import Registerer

from ..config import Config, ConfigError, Loaded, Loader
from ..protocol.resource import FileService, Prepared
from ..transport.context import WireGuards
from . import journal
from .endpoint import Endpoint, StartupError, endpoints
from .gate import Gate
from .preflight import check_environment, root_error
from .service_manager import ServiceManager, watchdog_interval

log = logging.getLogger(__name__)

#: How long in-flight exchanges may take to finish once SIGTERM arrived.
STOP_GRACE = 2.0
#: Deregistering from the RD must not hold up a stop indefinitely.
DEREGISTER_TIMEOUT = 3.0
#: Seconds between STATUS= refreshes (sent only when the line changed).
STATUS_INTERVAL = 5.0
#: Registration lifetime, as aiocoap-fileserver.
REGISTER_LIFETIME = 60
#: The drop-in that lets the packaged service write its root, and where it goes.
WRITE_DROPIN = "/usr/share/doc/coap-fileserver/examples/write.conf"
UNIT_DROPIN_DIR = "/etc/systemd/system/coap-fileserver.service.d"


class Supervisor:
    """Runs the server for one process lifetime; `run()` returns the exit status."""

    def __init__(
        self,
        loader: Loader,
        loaded: Loaded,
        service: FileService,
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.loader = loader
        self.loaded = loaded
        self.service = service
        self.gate = Gate(service)
        self.guards = WireGuards(loaded.config.amplification, loaded.config.deduplication)
        self.manager = ServiceManager()
        self._on_ready = on_ready
        self._contexts: dict[Endpoint, aiocoap.Context] = {}
        self._registerer: Registerer | None = None
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._served = False

    @classmethod
    def open(
        cls, loader: Loader, loaded: Loaded, *, on_ready: Callable[[], None] | None = None
    ) -> Supervisor:
        """A supervisor with its file service built (the root opened; ConfigError if not)."""
        try:
            service = FileService(loaded.config.service)
        except OSError as e:
            raise root_error(loaded, e) from None
        return cls(loader, loaded, service, on_ready=on_ready)

    @property
    def config(self) -> Config:
        return self.loaded.config

    # --- start-up ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        try:
            await self._start()
            self._served = True
            self.manager.ready(self.status_line())
            log.info("Ready: %s", self.status_line())
            if self._on_ready is not None:
                self._on_ready()
            self._start_tasks()
            await self._serve()
        finally:
            try:
                await self._shutdown()
            finally:
                # Only now: a second SIGTERM (or a SIGHUP) during the grace period must not
                # kill the process by signal.
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        return 0

    async def _start(self) -> None:
        for endpoint in endpoints(self.config):
            self._contexts[endpoint] = await endpoint.bind_to(self.gate, self.loaded, self.guards)
        self.service.start()
        self._register(self.config)
        self._warn_if_unwritable()

    def _warn_if_unwritable(self) -> None:
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

    # --- running ----------------------------------------------------------------------------

    def _start_tasks(self) -> None:
        interval = watchdog_interval()
        if interval is not None:
            log.debug("Watchdog: pinging every %.3f s", interval)
            self._tasks.append(
                asyncio.create_task(self.manager.keep_watchdog_fed(interval), name="watchdog")
            )
        self._tasks.append(asyncio.create_task(self._refresh_status(), name="status"))

    async def _serve(self) -> None:
        """Wait for a stop, doing reloads in between (one at a time, in signal order)."""
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                reload = asyncio.create_task(self._reload_wanted.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                if self._reload_wanted.is_set() and not self._stop.is_set():
                    self._reload_wanted.clear()
                    await self.reload()
                reload.cancel()
        finally:
            stop.cancel()

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.manager.status(self.status_line())

    def status_line(self) -> str:
        """Root, binds, access, cache mode, traffic, what the floods' bounds hold (observers,
        deduplication entries, verified addresses); and a failed reload, if any."""
        service = self.service.service
        stats = self.service.stats()
        binds = ", ".join(str(e) for e in self._contexts) or "nothing bound"
        access = "read-write" if service.write else "read-only"
        errors = stats["client_errors"] + stats["server_errors"]
        traffic = f"{stats['requests']} requests, {errors} errors"
        if stats["server_errors"]:
            traffic += f" ({stats['server_errors']} server errors)"
        guards = self.guards.stats()
        held = (
            f"{stats['observers']} observers, {guards['stored']} deduplication entries "
            f"({guards['refused']} refused), {guards['verified']} verified addresses "
            f"({guards['limited']} answers limited)"
        )
        line = (
            f"Serving {service.root} on {binds}, {access}, cache {stats['mode']}; {traffic}; {held}"
        )
        if self._reload_error is not None:
            line += f"; RELOAD FAILED, old configuration kept: {self._reload_error}"
        return line

    # --- reload -----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the configuration and apply it live; a bad one leaves everything as it was.

        systemd (Type=notify-reload) waits for the READY=1 that ends this, so it is sent
        whether or not the new configuration could be applied.
        """
        self.manager.reloading()
        log.info("Reloading configuration")
        try:
            loaded = self.loader.load()
            check_environment(loaded)
            await self._apply(loaded)
        except (ConfigError, StartupError) as e:
            self._reload_error = str(e)
            log.error("Reload failed, keeping the running configuration: %s", e)
        except Exception as e:  # a bug must not leave systemd waiting for READY=1
            self._reload_error = f"{type(e).__name__}: {e}"
            log.error("Reload failed unexpectedly, keeping the running configuration", exc_info=e)
        else:
            self._reload_error = None
            log.info("Reloaded: %s", self.status_line())
        self.manager.ready(self.status_line())

    async def _apply(self, loaded: Loaded) -> None:
        """Apply a new configuration: first everything that can fail (the new root opened, the
        new binds bound), then the file service switched over, which cannot fail."""
        old, new = self.config, loaded.config
        prepared: Prepared | None = None
        if new.service != old.service:
            try:
                prepared = self.service.prepare(new.service)
            except OSError as e:
                raise root_error(loaded, e) from None
        # Deregister while the context that registered is still bound.
        rebinding = set(endpoints(new)) != set(self._contexts)
        reregister = new.register != old.register or (old.register is not False and rebinding)
        if reregister:
            await self._deregister()
        try:
            await self._rebind(endpoints(new), loaded)
        except (ConfigError, StartupError):
            if prepared is not None:
                prepared.discard()
            if reregister:
                self._register(old)
            raise
        if prepared is not None:
            self.service.apply(prepared)
        if reregister:
            self._register(new)
        journal.set_verbosity(new.verbosity)
        self.guards.configure(new.amplification, new.deduplication)
        self.loaded = loaded
        if new.write and (new.write, new.root) != (old.write, old.root):
            self._warn_if_unwritable()

    async def _rebind(self, wanted: list[Endpoint], loaded: Loaded) -> None:
        """Shut down contexts no longer wanted, bind new ones; on failure restore the old set."""
        current = self._contexts
        gone = [e for e in current if e not in wanted]
        added = [e for e in wanted if e not in current]
        if not gone and not added:
            return
        for endpoint in gone:
            log.info("Unbinding %s", endpoint)
            await current[endpoint].shutdown()
        new: dict[Endpoint, aiocoap.Context] = {}
        try:
            for endpoint in added:
                log.info("Binding %s", endpoint)
                new[endpoint] = await endpoint.bind_to(self.gate, loaded, self.guards)
        except (ConfigError, StartupError):
            for context in new.values():
                await context.shutdown()
            for endpoint in gone:
                try:
                    current[endpoint] = await endpoint.bind_to(self.gate, self.loaded, self.guards)
                except (ConfigError, StartupError) as e:
                    log.error("Could not restore %s: %s", endpoint, e)
                    del current[endpoint]
            raise
        keep = {e: current[e] for e in wanted if e in current}
        self._contexts = {e: keep.get(e) or new[e] for e in wanted}

    # --- stop -------------------------------------------------------------------------------

    async def _end_observations(self, deadline: float) -> None:
        """Tell every observer the service is going (5.03), rather than leaving them waiting
        for Max-Age; the notifications are given until `deadline` to go out."""
        if not self.service.end_observations(Code.SERVICE_UNAVAILABLE, "Shutting down"):
            return
        loop = asyncio.get_running_loop()
        while self.service.stats()["observers"] and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _shutdown(self) -> None:
        """STOPPING=1, refuse new requests, let in-flight ones finish, deregister, unbind."""
        self.manager.stopping()
        if self._served:
            log.info("Stopping")
        for task in self._tasks:
            task.cancel()
        deadline = asyncio.get_running_loop().time() + STOP_GRACE
        cut = await self.gate.close(STOP_GRACE)
        if cut:
            log.warning("Stopped with %d exchange(s) still in flight", cut)
        await self._end_observations(deadline)
        await self._deregister()
        contexts, self._contexts = list(self._contexts.values()), {}
        await asyncio.gather(*(c.shutdown() for c in contexts), return_exceptions=True)
        self.service.close()
