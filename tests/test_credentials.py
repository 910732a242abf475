"""OSCORE without lakers (coapfs.daemon.credentials): real aiocoap, real OSCORE on loopback.

The lakers-less cases run in a subprocess whose import system refuses `lakers`, exactly as on a
stock Debian 13 where lakers-python is not packaged; the in-process cases use whatever is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coapfs.daemon.credentials import CredentialsError, lakers_available, prepare_credentials

from support.ports import free_udp_port
from support.repo import REPO, environment
from support.tools import missing

# Refuses `lakers` the way a missing installation does, then runs the given test body.
NO_LAKERS_PRELUDE = """
import sys

class RefuseLakers:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "lakers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, RefuseLakers())
sys.modules.pop("lakers", None)
"""


def oscore_pair(tmp: Path, client_secret: str = "correct horse battery") -> tuple[Path, Path]:
    """A server and a client OSCORE security context directory (aiocoap's filesystem format)."""
    contexts = []
    for name, sender, recipient, secret in (
        ("server", "73", "63", "correct horse battery"),
        ("client", "63", "73", client_secret),
    ):
        d = tmp / name
        d.mkdir()
        settings = {"sender-id_hex": sender, "recipient-id_hex": recipient, "secret_ascii": secret}
        (d / "settings.json").write_text(json.dumps(settings))
        contexts.append(d)
    return contexts[0], contexts[1]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def run_without_lakers(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = NO_LAKERS_PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(),
        cwd=REPO,
    )


OSCORE_GET = """
import argparse, asyncio, json, sys
from pathlib import Path

try:
    import aiocoap.transports.oscore  # noqa: F401
except ModuleNotFoundError as e:
    print("before prepare:", e.name)
else:
    sys.exit("aiocoap.transports.oscore imported although lakers is refused")

from coapfs.daemon.credentials import EdhocUnavailableError, lakers_available, prepare_credentials

tmp, port = Path(sys.argv[1]), int(sys.argv[2])
prepare_credentials(tmp / "server.json")
assert not lakers_available()

import aiocoap
import aiocoap.oscore_sitewrapper  # noqa: F401
import aiocoap.transports.oscore  # noqa: F401
import lakers
from aiocoap.cli.common import server_context_from_arguments
from coapfs.config import Config
from coapfs.protocol.resource import FileService

try:
    lakers.EdhocResponder
except EdhocUnavailableError as e:
    print("placeholder:", e)
else:
    sys.exit("the lakers placeholder let EdhocResponder through")


async def get(client, uri):
    request = aiocoap.Message(code=aiocoap.GET, uri=uri)
    return await asyncio.wait_for(client.request(request).response, 30)


async def main():
    ns = argparse.Namespace(
        bind=("127.0.0.1", port),
        tls_server_certificate=None,
        tls_server_key=None,
        credentials=tmp / "server.json",
    )
    site = FileService(Config(root=tmp / "root").service)
    server = await server_context_from_arguments(site, ns)
    base = f"coap://127.0.0.1:{port}"
    try:
        for name in ("client", "wrong-client"):
            # Named transports: aiocoap 0.4.14 (Debian 13) leaves OSCORE out of a client's
            # defaults unless ge25519 (group OSCORE, not packaged) is installed too.
            client = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
            client.client_credentials.load_from_dict(
                {base + "/*": {"oscore": {"contextfile": str(tmp / name)}}}
            )
            context = client.client_credentials[base + "/*"]
            try:
                response = await get(client, base + "/hello.txt")
            except aiocoap.oscore.NotAProtectedMessage as e:
                # The server could not verify the request and answered with a plain error.
                print(name, "refused:", e.args[0])
            else:
                print(name, response.code, response.payload, context.sender_sequence_number)
            await client.shutdown()
    finally:
        await server.shutdown()
        site.close()


asyncio.run(main())
"""


def test_oscore_get_works_without_lakers(tmp_path: Path) -> None:
    """Plain OSCORE end to end with lakers refused: protected GET answered, wrong key refused."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "hello.txt").write_text("hello over OSCORE\n")
    server_ctx, client_ctx = oscore_pair(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _, wrong_ctx = oscore_pair(wrong, client_secret="not the secret")
    wrong_ctx.rename(tmp_path / "wrong-client")
    write_json(tmp_path / "server.json", {"coap://*": {"oscore": {"contextfile": str(server_ctx)}}})

    result = run_without_lakers(OSCORE_GET, str(tmp_path), str(free_udp_port()))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "before prepare: lakers"
    assert lines[1].startswith("placeholder: EDHOC is unavailable: lakers-python is not installed")
    # The correct key is answered with the file, and the client's sender sequence number moved:
    # the request really went through OSCORE.
    assert lines[2] == "client 2.05 Content b'hello over OSCORE\\n' 1"
    # A client with the wrong secret gets an unprotected error instead of the file.
    assert lines[3] == "wrong-client refused: No Object-Security option present"


EDHOC_CHECK = """
from pathlib import Path
from coapfs.daemon.credentials import CredentialsError, prepare_credentials

try:
    prepare_credentials(Path(sys.argv[1]))
except CredentialsError as e:
    print(e)
else:
    print("accepted")
"""


def edhoc_credentials(tmp_path: Path) -> Path:
    """A credentials file with an EDHOC entry next to a plain OSCORE one, nested in any-of."""
    server_ctx, _ = oscore_pair(tmp_path)
    edhoc = {"edhoc-oscore": {"suite": 2, "method": 3, "own_cred_style": "by-key-id"}}
    return write_json(
        tmp_path / "edhoc.json",
        {
            "coap://*": {"oscore": {"contextfile": str(server_ctx)}},
            "coap://[::1]/*": {"any-of": [edhoc]},
        },
    )


def test_edhoc_without_lakers_is_one_clear_error(tmp_path: Path) -> None:
    path = edhoc_credentials(tmp_path)
    result = run_without_lakers(EDHOC_CHECK, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{path}: entry 'coap://[::1]/*' configures EDHOC (edhoc-oscore), which needs"
        " lakers-python; it is not installed (plain OSCORE works without it)\n"
    )


def require_lakers() -> None:
    """The EDHOC-present cases need lakers-python; under CI its absence is a failure."""
    if not lakers_available():
        missing("lakers-python is not installed (needed to test EDHOC with lakers)")


def test_edhoc_accepted_and_lakers_untouched_where_installed(tmp_path: Path) -> None:
    require_lakers()
    prepare_credentials(edhoc_credentials(tmp_path))
    import aiocoap.edhoc
    import lakers

    assert not getattr(lakers, "placeholder", False)
    assert aiocoap.edhoc.lakers is lakers
    assert callable(lakers.EdhocResponder)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON or EDN"),
        ('["coap://*"]', "expected a map of URI patterns to credentials"),
        ("\udcff", "not text"),
    ],
)
def test_unusable_file_is_one_line_naming_it(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CredentialsError) as info:
        prepare_credentials(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"missing\.json: cannot read: No such file"):
        prepare_credentials(tmp_path / "missing.json")


def test_no_credentials_only_fixes_imports() -> None:
    prepare_credentials(None)
    import aiocoap.oscore_sitewrapper  # noqa: F401
    import aiocoap.transports.oscore  # noqa: F401
