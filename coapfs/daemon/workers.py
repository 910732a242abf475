"""Several worker processes serving the same bind addresses (`workers` > 1), run by the
supervisor, which alone owns the lifecycle.

The supervisor claims each address's socket group once (`sockets`), starts the workers
(`worker`) and hands each its socket of every group. The kernel keeps a client on one worker
(the steering program: a hash of its address and port), so block-wise transfers, deduplication
and observations stay consistent. Worker 0 alone loads the OSCORE/EDHOC credentials and serves
TCP and TLS; the steering program sends it every OSCORE-protected datagram, so no security
context's sequence number or replay window is ever used by two processes. The workers are
started afresh (not forked), so none inherits another's state.

READY=1 once every worker serves; WATCHDOG=1 only while every worker answers its pings; a reload
is prepared by all, then committed by all (worker 0 first, the only one whose commit can fail)
or aborted by all; SIGTERM drains all; a worker that dies is started again, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import coapfs

from ..config import Config, ConfigError, Loaded
from .control import Channel, pair
from .cpus import usable_cpus
from .endpoint import Endpoint, StartupError, endpoints
from .serving import STOP_GRACE, claim_endpoints
from .sockets import Claims

log = logging.getLogger(__name__)

#: Seconds between pings (each answered with the worker's figures).
PING_INTERVAL = 1.0
#: A worker whose last answer is older than this is not responsive (the watchdog starves).
STALE_AFTER = 3.0
#: How long a worker may take to start, prepare or commit.
ANSWER_TIMEOUT = 30.0
#: Restarting a worker that keeps dying waits longer each time, up to this.
MAX_RESTART_DELAY = 30.0
#: Variables a worker must not see: only the supervisor speaks to systemd.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def worker_count(config: Config) -> int:
    """`workers`: a number, or "auto" for one per CPU this process may use (`cpus`)."""
    if config.workers == "auto":
        return usable_cpus()
    return int(config.workers)


def _environment() -> dict[str, str]:
    """The supervisor's environment, without systemd's service variables, and with the
    directory this very coapfs was imported from first on the path (`-P` keeps the working
    directory, which may be the served tree, off it)."""
    env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
    here = str(Path(coapfs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


class WorkerFailed(Exception):
    """A worker refused or did not answer; `error` is what the supervisor reports."""

    def __init__(self, error: ConfigError | StartupError) -> None:
        super().__init__(str(error))
        self.error = error


def _refusal(kind: str, line: str) -> ConfigError | StartupError:
    """A worker's refusal as the supervisor reports it: the same one line."""
    if kind == "config":
        source, _, message = line.partition(": ")
        return ConfigError(source, message)
    return StartupError(line)


class _Worker:
    """One worker process and its channel; answers to requests arrive in `answers`."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, channel: Channel) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.answers: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        self.last_answer = time.monotonic()
        self.stats: dict[str, Any] = {}

    async def ask(self, message: tuple[str, Any], fds: list[int] | None = None) -> Any:
        """Send a request; its answer's argument, or WorkerFailed."""
        try:
            self.channel.send(message, fds)
            answer = await asyncio.wait_for(self.answers.get(), ANSWER_TIMEOUT)
        except (ConnectionError, TimeoutError):
            answer = None
        if answer is None:
            raise WorkerFailed(StartupError(f"worker {self.index} did not answer {message[0]}"))
        kind, argument = answer
        if kind in ("error", "failed"):
            raise WorkerFailed(_refusal(*argument))
        return argument


class WorkerPool:
    """`count` worker processes on the same binds."""

    def __init__(self, loaded: Loaded, count: int) -> None:
        self.loaded = loaded
        self.count = count
        self._claims = Claims(count)
        self._echo_key = os.urandom(32)  # one Echo key for all: a value from one verifies at all
        self._workers: dict[int, _Worker] = {}
        self._restarting: dict[int, float] = {}  # index -> since when
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def _endpoints(self) -> list[Endpoint]:
        return endpoints(self.loaded.config)

    def _binds(self) -> list[Any]:
        return [e.hostport for e in self._endpoints()]

    # --- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        await claim_endpoints(self._claims, self._endpoints())
        results = await asyncio.gather(
            *(self._start_worker(i) for i in range(self.count)), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            error = failed[0]
            raise error.error if isinstance(error, WorkerFailed) else error
        self._spawn(self._ping_forever())

    async def _start_worker(self, index: int) -> None:
        ours, theirs = pair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "coapfs.daemon.worker",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                env=_environment(),
            )
        finally:
            theirs.close()
        worker = _Worker(index, process, Channel(ours))
        self._spawn(self._listen(worker))
        binds = self._binds()
        start = {
            "index": index,
            "workers": self.count,
            "loaded": self.loaded,
            "echo_key": self._echo_key,
            "binds": binds,
        }
        fds = [self._claims.socket(b, index).fileno() for b in binds]
        try:
            await worker.ask(("start", start), fds)
            if start["loaded"] is not self.loaded:
                # A reload was applied while this worker started (one being started again
                # after a crash): it would serve the old configuration, old access rules too.
                raise WorkerFailed(
                    StartupError(f"worker {index} started on a configuration reloaded since")
                )
        except WorkerFailed:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        self._workers[index] = worker
        log.debug("Worker %d (pid %d) serves", index, process.pid)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, worker: _Worker) -> None:
        """A worker's messages: pongs update its figures, answers go to `answers`; its end
        (the channel closed) is a death to report and repair."""
        while True:
            received = await worker.channel.receive()
            if received is None:
                break
            (kind, argument), _fds = received
            worker.last_answer = time.monotonic()
            if kind == "pong":
                worker.stats = argument[1]
            else:
                worker.answers.put_nowait((kind, argument))
        worker.answers.put_nowait(None)
        status = await worker.process.wait()
        worker.channel.close()
        if self._stopping or self._workers.get(worker.index) is not worker:
            return
        del self._workers[worker.index]
        log.error(
            "Worker %d (pid %d) ended with status %s; starting it again",
            worker.index,
            worker.process.pid,
            status,
        )
        self._spawn(self._restart(worker.index))

    async def _restart(self, index: int) -> None:
        self._restarting[index] = time.monotonic()
        delay = 0.2
        while not self._stopping:
            try:
                await self._start_worker(index)
                log.info("Worker %d serves again", index)
                break
            except WorkerFailed as e:
                log.error("Worker %d could not start again: %s", index, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY)
        self._restarting.pop(index, None)

    async def _ping_forever(self) -> None:
        n = 0
        while True:
            n += 1
            for worker in list(self._workers.values()):
                with contextlib.suppress(ConnectionError):
                    worker.channel.send(("ping", n))
            await asyncio.sleep(PING_INTERVAL)

    # --- figures ----------------------------------------------------------------------------

    def responsive(self) -> bool:
        """Every worker answered lately (one being started again gets `STALE_AFTER` too)."""
        now = time.monotonic()
        for index in range(self.count):
            worker = self._workers.get(index)
            if worker is None:
                since = self._restarting.get(index)
                if since is None or now - since > ANSWER_TIMEOUT:
                    return False
            elif now - worker.last_answer > STALE_AFTER:
                return False
        return True

    def stats(self) -> dict[str, Any]:
        """The workers' figures summed (and worker 0's cache mode)."""
        total: dict[str, Any] = {"workers": self.count}
        for worker in self._workers.values():
            for name, value in worker.stats.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[name] = total.get(name, 0) + value
        first = self._workers.get(0)
        if first is not None and "mode" in first.stats:
            total["mode"] = first.stats["mode"]
        return total

    def bound(self) -> list[Endpoint]:
        return self._endpoints()

    # --- reload -----------------------------------------------------------------------------

    async def reload(self, loaded: Loaded) -> None:
        """Every worker applies `loaded`, or none does."""
        wanted = endpoints(loaded.config)
        workers = [self._workers[i] for i in sorted(self._workers)]
        if not workers:
            raise StartupError("no worker serves now (all are being started again); reload later")
        new = await claim_endpoints(self._claims, wanted)
        try:
            prepared: list[_Worker] = []
            try:
                for worker in workers:
                    fds = [self._claims.socket(b, worker.index).fileno() for b in new]
                    await worker.ask(("prepare", (loaded, new)), fds)
                    prepared.append(worker)
                await workers[0].ask(("commit", None))  # worker 0's commit alone can fail
            except WorkerFailed as e:
                await self._abort(prepared[1:] if prepared[:1] == workers[:1] else prepared)
                raise e.error from None
            for worker in workers[1:]:
                await worker.ask(("commit", None))
        except BaseException:
            self._claims.release(new)
            raise
        self._claims.keep_only([e.hostport for e in wanted])
        self.loaded = loaded
        for worker in list(self._workers.values()):
            if worker not in workers:  # started again meanwhile, on the old configuration
                log.info("Worker %d started during the reload; starting it again", worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    async def _abort(self, workers: list[_Worker]) -> None:
        for worker in workers:
            with contextlib.suppress(WorkerFailed):
                await worker.ask(("abort", None))

    # --- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Every worker drains and stops (they stop at once if the supervisor dies)."""
        self._stopping = True
        workers = list(self._workers.values())
        for worker in workers:
            with contextlib.suppress(ConnectionError):
                worker.channel.send(("stop", None))
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_GRACE + 5)
            except TimeoutError:
                log.warning("Worker %d did not stop in time; killed", worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for task in self._tasks:
            task.cancel()
        self._claims.close()
