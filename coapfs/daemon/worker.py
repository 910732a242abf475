"""A worker process: `python -P -m coapfs.daemon.worker FD`, started by `workers.WorkerPool`,
serves what the supervisor tells it over the channel FD (`control`), on the sockets it is handed.

It is told its place (index, of how many), the configuration and the sockets; it answers
"ready", then each ping with its figures, and carries out prepare/commit/abort (a reload) and
stop. SIGTERM and SIGINT stop it as "stop" does; when the supervisor goes away, so does it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Any

from ..config import ConfigError
from ..protocol.accesslog import FIELDS
from ..transport import steering
from . import journal
from .control import Channel
from .credentials import prepare_credentials
from .endpoint import StartupError
from .serving import Change, Role, Server

log = logging.getLogger(__name__)


def failure(error: BaseException) -> tuple[str, str]:
    """How a refusal travels to the supervisor: its kind and its one line."""
    kind = "config" if isinstance(error, ConfigError) else "startup"
    return kind, str(error)


def _sockets(binds: list[Any], fds: list[int]) -> dict[Any, socket.socket]:
    return {
        bind: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, fileno=fd)
        for bind, fd in zip(binds, fds, strict=True)
    }


class _Tag(logging.Filter):
    """Every record of a worker says which it is: a WORKER field in the journal (the message
    stays as a single process writes it), a `[worker N]` prefix on a terminal or in a file."""

    def __init__(self, index: int, in_journal: bool) -> None:
        super().__init__()
        self.index = index
        self.in_journal = in_journal
        self.prefix = f"[worker {index}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if self.in_journal:
            fields = dict(getattr(record, FIELDS, None) or {})
            fields["WORKER"] = self.index
            setattr(record, FIELDS, fields)
        elif not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


async def serve(channel: Channel) -> int:
    first = await channel.receive()
    if first is None:
        return 1
    (command, start), fds = first
    assert command == "start"
    role = Role(start["index"], start["workers"])
    journal.setup(start["loaded"].config.verbosity)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Tag(role.index, isinstance(handler, journal.JournalHandler)))
    prepare_credentials(None)  # aiocoap's OSCORE imports lakers, which Debian does not package
    steering.partition_message_ids(role.index, role.workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor orchestrates reloads
    try:
        server = Server(start["loaded"], role, start["echo_key"])
        await server.start(_sockets(start["binds"], fds))
    except (ConfigError, StartupError, OSError) as e:
        channel.send(("failed", failure(e)))
        return 1
    channel.send(("ready", None))
    await _obey(channel, server, stop)
    await server.stop()
    if not channel.closed:
        channel.send(("stopped", None))
    return 0


async def _obey(channel: Channel, server: Server, stop: asyncio.Event) -> None:
    change: Change | None = None
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            receiving = asyncio.ensure_future(channel.receive())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                return
            received = receiving.result()
            if received is None:
                return  # the supervisor has gone
            (command, argument), fds = received
            if command == "ping":
                channel.send(("pong", (argument, server.stats())))
            elif command == "prepare":
                loaded, binds = argument
                try:
                    change = await server.prepare(loaded, _sockets(binds, fds))
                except (ConfigError, StartupError) as e:
                    channel.send(("error", failure(e)))
                else:
                    channel.send(("prepared", None))
            elif command == "commit" and change is not None:
                try:
                    await server.commit(change)
                except (ConfigError, StartupError) as e:
                    await server.abort(change)
                    channel.send(("error", failure(e)))
                else:
                    channel.send(("committed", None))
                change = None
            elif command == "abort":
                if change is not None:
                    await server.abort(change)
                change = None
                channel.send(("aborted", None))
            elif command == "stop":
                return
    finally:
        stopping.cancel()


def main() -> int:
    fd = int(sys.argv[1])

    async def run() -> int:
        channel = Channel(socket.socket(fileno=fd))
        try:
            return await serve(channel)
        finally:
            channel.close()

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
