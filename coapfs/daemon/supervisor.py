"""The program's lifecycle, and its one owner: bind, tell systemd, reload on SIGHUP, feed the
watchdog, stop cleanly.

What is served lives in `serving.Server`; the supervisor drives it in its own process with one
worker (`serving.InProcess`), or in worker processes (`workers.WorkerPool`) with several. Either
way it sends READY=1 once everything serves, STATUS= with the figures of all, WATCHDOG=1 only
while everything is responsive, and RELOADING=1 ... READY=1 around a reload that every worker
applies or none does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any, Protocol

from ..access.rules import Rules
from ..config import Config, ConfigError, Loaded, Loader
from .endpoint import Endpoint, StartupError
from .preflight import check_environment
from .service_manager import ServiceManager, watchdog_interval
from .serving import InProcess
from .workers import WorkerPool, worker_count

log = logging.getLogger(__name__)

#: Seconds between STATUS= refreshes (sent only when the line changed).
STATUS_INTERVAL = 5.0


class Serving(Protocol):
    """What the supervisor drives: the in-process server, or the pool of worker processes."""

    async def start(self) -> None: ...

    async def reload(self, loaded: Loaded) -> None: ...

    async def stop(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def responsive(self) -> bool: ...

    def bound(self) -> list[Endpoint]: ...


class Supervisor:
    """Runs the server for one process lifetime; `run()` returns the exit status."""

    def __init__(
        self,
        loader: Loader,
        loaded: Loaded,
        serving: Serving,
        *,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.loader = loader
        self.loaded = loaded
        self.serving = serving
        self.manager = ServiceManager()
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._served = False

    @classmethod
    def open(
        cls, loader: Loader, loaded: Loaded, *, on_ready: Callable[[], None] | None = None
    ) -> Supervisor:
        """A supervisor with what it serves made: in this process (the root opened now;
        ConfigError if it cannot be), or by worker processes."""
        count = worker_count(loaded.config)
        serving: Serving = InProcess(loaded) if count == 1 else WorkerPool(loaded, count)
        return cls(loader, loaded, serving, on_ready=on_ready)

    @property
    def config(self) -> Config:
        return self.loaded.config

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        try:
            await self.serving.start()
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

    def _start_tasks(self) -> None:
        interval = watchdog_interval()
        if interval is not None:
            log.debug("Watchdog: pinging every %.3f s", interval)
            self._tasks.append(asyncio.create_task(self._feed_watchdog(interval), name="watchdog"))
        self._tasks.append(asyncio.create_task(self._refresh_status(), name="status"))

    async def _feed_watchdog(self, interval: float) -> None:
        """From this event loop, and only while every worker's loop answers too: a stalled
        process anywhere stops the pings, and systemd restarts the service."""
        while True:
            if self.serving.responsive():
                self.manager.watchdog()
            await asyncio.sleep(interval)

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
        config = self.config
        stats = self.serving.stats()
        binds = ", ".join(str(e) for e in self.serving.bound()) or "nothing bound"
        writable = Rules(config.access, write_by_anyone=config.write).writable_somewhere
        access = "read-write" if writable else "read-only"
        errors = stats.get("client_errors", 0) + stats.get("server_errors", 0)
        traffic = f"{stats.get('requests', 0)} requests, {errors} errors"
        if stats.get("server_errors"):
            traffic += f" ({stats['server_errors']} server errors)"
        held = (
            f"{stats.get('observers', 0)} observers, {stats.get('wire_stored', 0)} deduplication "
            f"entries ({stats.get('wire_refused', 0)} refused), {stats.get('wire_verified', 0)} "
            f"verified addresses ({stats.get('wire_limited', 0)} answers limited)"
        )
        workers = f", {stats['workers']} workers" if stats.get("workers", 1) > 1 else ""
        line = (
            f"Serving {config.root} on {binds}{workers}, {access}, "
            f"cache {stats.get('mode', config.cache.mode)}; {traffic}; {held}"
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
            if worker_count(loaded.config) != worker_count(self.config):
                log.warning("workers = %s takes effect at the next restart", loaded.config.workers)
            await self.serving.reload(loaded)
        except (ConfigError, StartupError) as e:
            self._reload_error = str(e)
            log.error("Reload failed, keeping the running configuration: %s", e)
        except Exception as e:  # a bug must not leave systemd waiting for READY=1
            self._reload_error = f"{type(e).__name__}: {e}"
            log.error("Reload failed unexpectedly, keeping the running configuration", exc_info=e)
        else:
            self.loaded = loaded
            self._reload_error = None
            log.info("Reloaded: %s", self.status_line())
        self.manager.ready(self.status_line())

    # --- stop -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """STOPPING=1, then let the serving side drain and unbind."""
        self.manager.stopping()
        if self._served:
            log.info("Stopping")
        for task in self._tasks:
            task.cancel()
        await self.serving.stop()
