"""The program's lifecycle: open the root, bind, tell systemd, reload on SIGHUP, stop cleanly.

The resource (coapfs.resource.FileServer) is protocol behaviour only; this module owns
everything around it, as aiocoap's fileserver program does for its resource: the aiocoap
contexts (one per bind address), the resource-directory registration, sd_notify states,
the watchdog, signals and the reload of the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.resourcedirectory.client.register import Registerer

from . import log as logsetup
from .config import Bind, Config, ConfigError, Loaded, Loader, check_environment, root_error
from .context import server_context
from .notify import Notifier, watchdog_interval
from .resource import FileServer

log = logging.getLogger(__name__)

#: How long in-flight exchanges may take to finish once SIGTERM arrived.
STOP_GRACE = 2.0
#: Deregistering from the RD must not hold up a stop indefinitely.
DEREGISTER_TIMEOUT = 3.0
#: Seconds between STATUS= refreshes (sent only when the line changed).
STATUS_INTERVAL = 5.0
#: Registration lifetime, as aiocoap-fileserver.
REGISTER_LIFETIME = 60


class StartupError(Exception):
    """Start-up failed for a reason that is not the configuration (e.g. port in use)."""


@dataclass(frozen=True)
class Endpoint:
    """What one aiocoap context is made of; a reload re-binds only endpoints that changed."""

    bind: Bind | None  # None: aiocoap's default, all addresses on the default ports
    credentials: Path | None
    tls_server_certificate: Path | None
    tls_server_key: Path | None

    def __str__(self) -> str:
        return str(self.bind) if self.bind is not None else "all addresses"

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


def endpoints(config: Config) -> list[Endpoint]:
    binds: tuple[Bind | None, ...] = config.bind or (None,)
    return [
        Endpoint(b, config.credentials, config.tls_server_certificate, config.tls_server_key)
        for b in binds
    ]


class Gate:
    """Site wrapper that lets a stop refuse new requests and wait for those in flight.

    Observations are long-lived by design and not waited for; every other exchange is
    counted until its rendering is done. Everything else is the wrapped site's.
    """

    def __init__(self, site: Any) -> None:
        self._site = site
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._site, name)

    async def render_to_pipe(self, pipe: Any) -> None:
        if not self._open:
            pipe.add_response(
                aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=b"Shutting down"),
                is_last=True,
            )
            return
        if pipe.request.opt.observe == 0:
            await self._site.render_to_pipe(pipe)
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._site.render_to_pipe(pipe)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def close(self, grace: float) -> int:
        """Refuse new requests; wait up to `grace` seconds; return how many were cut off."""
        self._open = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        return self._in_flight


class Supervisor:
    """Runs the server for one process lifetime; `run()` returns the exit status."""

    def __init__(
        self,
        loader: Loader,
        loaded: Loaded,
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.loader = loader
        self.loaded = loaded
        self.config = loaded.config
        self.notifier = Notifier()
        self._on_ready = on_ready
        self._contexts: dict[Endpoint, aiocoap.Context] = {}
        self._registerer: Registerer | None = None
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._served = False
        self.site: FileServer | None = None
        self.gate: Gate | None = None

    # --- start-up ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        try:
            await self._start()
            self._served = True
            self.notifier.ready(self.status_line())
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
        config = self.config
        check_environment(self.loaded)  # includes coapfs.credentials, before any binding
        try:
            self.site = FileServer(config.root, write=config.write, etag_length=config.etag_length)
        except OSError as e:
            raise root_error(self.loaded, e) from None
        self._tune(config)
        self.gate = Gate(self.site)
        for endpoint in endpoints(config):
            self._contexts[endpoint] = await self._bind(endpoint, self.loaded)
        self.site.start()
        self._register(config)

    async def _bind(self, endpoint: Endpoint, loaded: Loaded) -> aiocoap.Context:
        """One aiocoap server context; errors become one line naming what failed."""
        log.debug("Binding %s", endpoint)
        try:
            return await server_context(self.gate, endpoint.namespace())
        except ssl.SSLError as e:
            raise ConfigError.bad_value(
                loaded.origin("tls_server_certificate"),
                "tls_server_certificate",
                str(endpoint.tls_server_certificate),
                "a PEM certificate chain matching tls_server_key",
                e.reason or str(e),
            ) from None
        except OSError as e:
            raise StartupError(f"cannot bind {endpoint}: {e.strerror or e}") from None
        except Exception as e:
            if endpoint.credentials is None:
                raise
            # Anything else out of aiocoap's credentials loading is the file's content.
            raise ConfigError.bad_value(
                loaded.origin("credentials"),
                "credentials",
                str(endpoint.credentials),
                "a valid credentials file",
                f"{type(e).__name__}: {e}",
            ) from None

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

    def _tune(self, config: Config) -> None:
        """Hand [cache] and [observe] to the resource."""
        assert self.site is not None
        self.site.tune(cache=config.cache, observe=config.observe)

    # --- running ----------------------------------------------------------------------------

    def _start_tasks(self) -> None:
        interval = watchdog_interval()
        if interval is not None:
            log.debug("Watchdog: pinging every %.3f s", interval)
            self._tasks.append(
                asyncio.create_task(self.notifier.keep_watchdog_fed(interval), name="watchdog")
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
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """Root, binds, access, cache mode, traffic; and a failed reload, if any."""
        c = self.config
        binds = ", ".join(str(e) for e in self._contexts) or "nothing bound"
        access = "read-write" if c.write else "read-only"
        mode = self.site.cache_mode if self.site is not None else c.cache.mode
        traffic = ""
        if self.site is not None:
            counters = self.site.counters
            errors = counters.client_errors + counters.server_errors
            traffic = f"; {counters.requests} requests, {errors} errors"
            if counters.server_errors:
                traffic += f" ({counters.server_errors} server errors)"
        line = f"Serving {c.root} on {binds}, {access}, cache {mode}{traffic}"
        if self._reload_error is not None:
            line += f"; RELOAD FAILED, old configuration kept: {self._reload_error}"
        return line

    # --- reload -----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the configuration and apply it live; a bad one leaves everything as it was.

        systemd (Type=notify-reload) waits for the READY=1 that ends this, so it is sent
        whether or not the new configuration could be applied.
        """
        self.notifier.reloading()
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
        self.notifier.ready(self.status_line())

    async def _apply(self, loaded: Loaded) -> None:
        """Apply a new configuration, in an order that can be undone until the end."""
        old, new = self.config, loaded.config
        site = self.site
        assert site is not None
        changed_site = (old.root, old.write, old.etag_length) != (
            new.root,
            new.write,
            new.etag_length,
        )
        if changed_site:
            try:
                site.reconfigure(root=new.root, write=new.write, etag_length=new.etag_length)
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
            if changed_site:
                self._restore_site(old, new)
            if reregister:
                self._register(self.config)
            raise
        if reregister:
            self._register(new)
        self._tune(new)
        logsetup.set_verbosity(new.verbosity)
        self.config, self.loaded = new, loaded

    def _restore_site(self, old: Config, new: Config) -> None:
        """Put the resource back as it was; if the old root has gone meanwhile, keep serving
        the new one and say so (the status line then names what is really served)."""
        assert self.site is not None
        try:
            self.site.reconfigure(root=old.root, write=old.write, etag_length=old.etag_length)
        except OSError as e:
            log.error("Could not go back to root %s (%s); serving %s", old.root, e, new.root)
            self.config = dataclasses.replace(
                old, root=new.root, write=new.write, etag_length=new.etag_length
            )

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
                new[endpoint] = await self._bind(endpoint, loaded)
        except (ConfigError, StartupError):
            for context in new.values():
                await context.shutdown()
            for endpoint in gone:
                try:
                    current[endpoint] = await self._bind(endpoint, self.loaded)
                except (ConfigError, StartupError) as e:
                    log.error("Could not restore %s: %s", endpoint, e)
                    del current[endpoint]
            raise
        keep = {e: current[e] for e in wanted if e in current}
        self._contexts = {e: keep.get(e) or new[e] for e in wanted}

    # --- stop -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """STOPPING=1, refuse new requests, let in-flight ones finish, deregister, unbind."""
        self.notifier.stopping()
        if self._served:
            log.info("Stopping")
        for task in self._tasks:
            task.cancel()
        if self.gate is not None:
            cut = await self.gate.close(STOP_GRACE)
            if cut:
                log.warning("Stopped with %d exchange(s) still in flight", cut)
        await self._deregister()
        contexts, self._contexts = list(self._contexts.values()), {}
        await asyncio.gather(*(c.shutdown() for c in contexts), return_exceptions=True)
        if self.site is not None:
            self.site.close()
