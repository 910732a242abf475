"""coap-fileserver: serve a directory over CoAP.

Every aiocoap-fileserver option with the same meaning, plus --config, --check-config,
--daemon and --pidfile. Options override /etc/coap-fileserver.toml and its drop-ins.
Exit status: 0 ok, 1 start-up failure (e.g. address in use), 2 usage, 78 configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_CONFIG_FILE, ConfigError, Loader, check_command_line, dropin_dir
from .daemon import journal
from .daemon.preflight import check_environment
from .daemon.program import EX_CONFIG, EX_OK, PROG, fail, run_detached, run_foreground

BIND_HELP = (
    "address to serve on, repeatable: HOST:PORT, [IPV6]:PORT, :PORT (all addresses) or HOST "
    "(default port); default: all addresses, port 5683 (and 5684 for (D)TLS)"
)


def _workers(value: str) -> int | str:
    """A number as a number; anything else as written, for the schema to accept ("auto") or
    refuse in its one line."""
    return int(value) if value.isdigit() else value


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
        "--workers",
        help='worker processes serving the binds: N, or "auto" (one per CPU); default 1',
        metavar="N|auto",
        type=_workers,
        default=None,
    )
    p.add_argument(
        "--access-log",
        help="log one line per request (peer, method, path, code, bytes, duration)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
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
        "access_log": opts.access_log,
        "workers": opts.workers,
    }
    return {k: v for k, v in given.items() if v is not None}


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
    journal.setup(loaded.config.verbosity)
    if opts.daemon:
        return run_detached(loader, loaded, pidfile)
    return run_foreground(loader, loaded, pidfile)
