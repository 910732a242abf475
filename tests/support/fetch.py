"""`python -m support.fetch URI [CREDENTIALS]`: one GET by the real aiocoap client (OSCORE with
the credentials file, if given), its payload to stdout and its code to stderr; exit 0 on 2.05.
For a client that must run as a process of its own, e.g. inside a network namespace."""

from __future__ import annotations

import sys
from pathlib import Path

import aiocoap

from support.client import Client


def main(uri: str, credentials: str | None = None) -> int:
    client = Client(Path(credentials) if credentials else None)
    try:
        response = client.request(aiocoap.Message(code=aiocoap.GET, uri=uri), timeout=120)
    finally:
        client.close()
    print(response.code, type(response.remote).__module__, file=sys.stderr)
    sys.stdout.buffer.write(response.payload)
    return 0 if response.code == aiocoap.CONTENT else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
