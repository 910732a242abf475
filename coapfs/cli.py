"""coap-fileserver: serve a directory over CoAP.

Every aiocoap-fileserver option with the same meaning, plus --config, --check-config,
--daemon and --pidfile. Options override /etc/coap-fileserver.toml and its drop-ins.
Exit status: 0 ok, 1 start-up failure (e.g. address in use), 2 usage, 78 configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import daemon
from daemon.pidfile import TimeoutPIDLockFile

from . import __version__
from . import log as logsetup
from .config import (
    DEFAULT_CONFIG_FILE,
    ConfigError,
    Loaded,
    Loader,
    check_command_line,
    check_environment,
    dropin_dir,
)
from .supervisor import StartupError, Supervisor

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78  # sysexits.h EX_CONFIG; the unit's RestartPreventExitStatus=

PROG = "coap-fileserver"

BIND_HELP = (
    "address to serve on, repeatable: HOST:PORT, [IPV6]:PORT, :PORT (all addresses) or HOST "
    "(default port); default: all addresses, port 5683 (and 5684 for (D)TLS)"
)


def build_parser() -> argparse.ArgumentParser:
    """Defaults are None throughout: only options actually given override the files."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        help="be more verbose (repeat to debug)",
        action="count",
        dest="verbosity",
        default=None,
    )
    p.add_argument(
        "--register",
        help="register with a resource directory (found by discovery unless RD-URI is given)",
        metavar="RD-URI",
        nargs="?",
        const=True,
        default=None,
    )
    p.add_argument(
        "--etag-length",
        help="ETag length 0..8 (0 disables, for servers where files are never modified)",
        metavar="0..8",
        type=int,
        default=None,
    )
    p.add_argument(
        "--write",
        help="allow writes (PUT, DELETE) by any client",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    p.add_argument("--bind", help=BIND_HELP, action="append", default=None)
    p.add_argument(
        "--credentials",
        help="JSON file pointing to credentials for the server's identity/ies",
        metavar="FILE",
    )
    p.add_argument(
        "--tls-server-certificate",
        help="TLS certificate (chain) to present to connecting clients (PEM)",
        metavar="CRT",
    )
    p.add_argument(
        "--tls-server-key",
        help="TLS key to load that supports the server certificate",
        metavar="KEY",
    )
    p.add_argument("path", help="root directory of the server (default: .)", nargs="?")
    p.add_argument(
        "--config",
        help=f"configuration file (default: {DEFAULT_CONFIG_FILE}, if it exists); "
        f"drop-ins are read from <stem>.d/*.toml beside it ({dropin_dir(DEFAULT_CONFIG_FILE)})",
        metavar="FILE",
        type=Path,
    )
    p.add_argument(
        "--check-config",
        help="only validate the configuration (including the root directory); exit 0 or 78",
        action="store_true",
    )
    p.add_argument(
        "--daemon",
        help="detach into the background once serving (default: stay in the foreground)",
        action="store_true",
    )
    p.add_argument("--pidfile", help="write the server's process id to FILE", metavar="FILE")
    return p


def command_line_values(opts: argparse.Namespace) -> dict[str, Any]:
    """The options given, keyed like the configuration file (validated by its schema)."""
    given = {
        "root": opts.path,
        "bind": opts.bind,
        "write": opts.write,
        "etag_length": opts.etag_length,
        "register": opts.register,
        "credentials": opts.credentials,
        "tls_server_certificate": opts.tls_server_certificate,
        "tls_server_key": opts.tls_server_key,
        "verbosity": min(opts.verbosity, 3) if opts.verbosity is not None else None,
    }
    return {k: v for k, v in given.items() if v is not None}


def fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        config_file = opts.config.absolute() if opts.config is not None else None
        loader = Loader(config_file, check_command_line(command_line_values(opts)))
        loaded = loader.load()
        check_environment(loaded)
    except ConfigError as e:
        return fail(str(e), EX_CONFIG)
    if opts.check_config:
        files = ", ".join(map(str, loaded.files)) or "no files, built-in defaults"
        print(f"{PROG}: configuration OK ({files}); serving {loaded.config.root}")
        return EX_OK
    pidfile = Path(opts.pidfile).absolute() if opts.pidfile else None
    logsetup.setup(loaded.config.verbosity)
    if opts.daemon:
        return run_detached(loader, loaded, pidfile)
    try:
        with pid_lock(pidfile):
            return serve(loader, loaded)
    except (ConfigError, StartupError, OSError) as e:
        return fail(str(e), exit_status(e))


def serve(loader: Loader, loaded: Loaded, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (in this process); raise for a failed start."""
    return asyncio.run(Supervisor(loader, loaded, on_ready=on_ready).run())


def exit_status(error: Exception) -> int:
    return EX_CONFIG if isinstance(error, ConfigError) else EX_FAILURE


# --- running without systemd: --pidfile, --daemon -------------------------------------------


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
    status = EX_FAILURE
    try:
        status = _daemon(loader, loaded, pidfile, os.fdopen(write_end, "w"))
    finally:
        os._exit(status)


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
    except (ConfigError, StartupError, OSError) as e:
        status = exit_status(e)
        if report.closed:
            logging.getLogger("coapfs").error("%s", e)
        tell(f"{status} {e}")
    finally:
        tell(f"{EX_FAILURE} stopped before it was ready")
        context.close()
    return status
