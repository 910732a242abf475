"""Command line: every aiocoap-fileserver option, same meaning. (Minimal first version.)"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiocoap.cli.common import (
    add_server_arguments,
    extract_server_arguments,
    server_context_from_arguments,
)

from . import __version__
from .resource import FileServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coap-fileserver", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", dest="verbosity", default=0)
    p.add_argument("--register", metavar="RD-URI", nargs="?", default=False)
    p.add_argument("--etag-length", type=int, choices=range(0, 9), default=8, metavar="0..8")
    p.add_argument("--write", action="store_true")
    p.add_argument("path", nargs="?", default=".", type=Path)
    add_server_arguments(p)
    return p


async def _serve(opts: argparse.Namespace, server_opts: argparse.Namespace) -> None:
    site = FileServer(opts.path, write=opts.write, etag_length=opts.etag_length)
    context = await server_context_from_arguments(site, server_opts)
    try:
        await asyncio.Event().wait()
    finally:
        await context.shutdown()


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    server_opts = extract_server_arguments(opts)
    logging.basicConfig(level=logging.WARNING - 10 * min(opts.verbosity, 2))
    try:
        asyncio.run(_serve(opts, server_opts))
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"coap-fileserver: {e}", file=sys.stderr)
        return 1
    return 0
