"""Running the program: in the foreground until SIGTERM/SIGINT, or detached (--daemon) once it
serves; the pid file (--pidfile); the exit statuses.

Exit status: 0 ok, 1 start-up failure (e.g. address in use), 2 usage, 78 configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import daemon
from aiocoap.error import ResolutionError
from daemon.pidfile import TimeoutPIDLockFile

from ..config import ConfigError, Loaded, Loader
from . import journal
from .endpoint import StartupError
from .supervisor import Supervisor

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78  # sysexits.h EX_CONFIG; the unit's RestartPreventExitStatus=

PROG = "coap-fileserver"


def fail(message: str, status: int) -> int:
    """Say why the program cannot run, in one line (at err priority for the journal)."""
    print(journal.fatal_line(f"{PROG}: {message}"), file=sys.stderr)
    return status


#: What a start can fail with, each said in one line: a configuration error, or a start-up
#: failure (a port in use, a bind host name that does not resolve: aiocoap's ResolutionError,
#: which is no OSError, used to end the program with a traceback).
START_FAILURES = (ConfigError, StartupError, OSError, ResolutionError)


def exit_status(error: Exception) -> int:
    return EX_CONFIG if isinstance(error, ConfigError) else EX_FAILURE


def reason(error: Exception) -> str:
    """The one line for a failed start."""
    if isinstance(error, ResolutionError):
        return f"cannot bind: {error}"
    return str(error)


def serve(loader: Loader, loaded: Loaded, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (in this process); raise for a failed start."""

    async def run() -> int:
        return await Supervisor.open(loader, loaded, on_ready=on_ready).run()

    return asyncio.run(run())


def run_foreground(loader: Loader, loaded: Loaded, pidfile: Path | None) -> int:
    try:
        with pid_lock(pidfile):
            return serve(loader, loaded)
    except START_FAILURES as e:
        return fail(reason(e), exit_status(e))


class PidfileInUse(StartupError):
    pass


@contextlib.contextmanager
def pid_lock(pidfile: Path | None) -> Iterator[None]:
    """Hold `pidfile` (python-daemon's lock file) while serving; a stale one is replaced."""
    if pidfile is None:
        yield
        return
    lock = TimeoutPIDLockFile(str(pidfile))
    check_pidfile(lock)
    with lock:
        yield


def check_pidfile(lock: TimeoutPIDLockFile) -> None:
    """Refuse to start twice; remove a pid file whose process is gone."""
    pid = lock.read_pid()
    if pid is None:
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        lock.break_lock()
        return
    except PermissionError:
        pass
    raise PidfileInUse(f"{lock.path}: already running as process {pid}")


def run_detached(loader: Loader, loaded: Loaded, pidfile: Path | None) -> int:
    """Detach with python-daemon's DaemonContext, but exit only once the daemon serves.

    The daemon reports over a pipe: "0" once every socket is bound (exit 0 here), or an
    exit status and the one-line error (printed here, and returned). So a bad root or a
    port in use is seen by whoever started us, as in the foreground. The daemon keeps
    stderr (the log stream); its sockets are bound in the daemon itself.
    """
    if pidfile is not None:
        try:
            check_pidfile(TimeoutPIDLockFile(str(pidfile)))
        except PidfileInUse as e:
            return fail(str(e), EX_FAILURE)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode("utf-8", "replace")
        os.waitpid(child, 0)
        status, _, message = report.partition(" ")
        if status == "0":
            return EX_OK
        if not status.isdigit():
            return fail("the daemon ended before it was ready (see its log)", EX_FAILURE)
        return fail(message.strip(), int(status))
    os.close(read_end)
    code = EX_FAILURE
    try:
        code = _daemon(loader, loaded, pidfile, os.fdopen(write_end, "w"))
    finally:
        os._exit(code)


def _daemon(loader: Loader, loaded: Loaded, pidfile: Path | None, report: TextIO) -> int:
    """Runs in the forked child: detach (DaemonContext forks again), then serve."""
    umask = os.umask(0o022)
    os.umask(umask)
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=umask,  # keep the caller's, as files written by PUT get it
        pidfile=TimeoutPIDLockFile(str(pidfile)) if pidfile is not None else None,
        files_preserve=[report.fileno()],
        stderr=sys.stderr,
    )

    def tell(text: str) -> None:
        if not report.closed:
            report.write(text)
            report.close()

    try:
        context.open()
    except Exception as e:
        tell(f"{EX_FAILURE} cannot detach: {e}")
        return EX_FAILURE
    try:
        status = serve(loader, loaded, on_ready=lambda: tell("0 ready"))
    except START_FAILURES as e:
        status = exit_status(e)
        if report.closed:
            logging.getLogger("coapfs").error("%s", reason(e))
        tell(f"{status} {reason(e)}")
    finally:
        tell(f"{EX_FAILURE} stopped before it was ready")
        context.close()
    return status
