"""OSCORE identities for the tests: a security context per peer on each side, the server's
credentials file naming each peer by its label (what access rules call `":alice"`), and a
client credentials file per peer (aiocoap's format, as --credentials takes it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_context(directory: Path, sender: str, recipient: str, secret: str) -> None:
    """One side of an OSCORE security context (aiocoap's settings.json in its own directory)."""
    directory.mkdir(parents=True)
    (directory / "settings.json").write_text(
        json.dumps(
            {"sender-id_ascii": sender, "recipient-id_ascii": recipient, "secret_ascii": secret}
        )
    )


class Identities:
    """Peers known by label (without the leading colon), each with its own key; `server` is
    the server's credentials file."""

    def __init__(self, directory: Path, *names: str) -> None:
        self.directory = directory
        server_map = {}
        for name in names:
            assert len(name) < 7, "OSCORE sender and recipient IDs are 7 bytes at most here"
            secret = f"the secret of {name}, not shared with anyone else"
            write_context(directory / f"server-{name}", f"s{name}", name, secret)
            write_context(directory / f"client-{name}", name, f"s{name}", secret)
            server_map[f":{name}"] = {"oscore": {"basedir": f"{directory}/server-{name}/"}}
        self.server = directory / "server.json"
        self.server.write_text(json.dumps(server_map))

    def client(self, name: str, port: int, host: str = "127.0.0.1") -> Path:
        """The credentials file with which `name` talks to the server at host:port."""
        path = self.directory / f"client-{name}-{port}.json"
        uri = f"coap://{host}:{port}/*"
        basedir = f"{self.directory}/client-{name}/"
        path.write_text(json.dumps({uri: {"oscore": {"basedir": basedir}}}))
        return path
