"""The Debian package in a real systemd (issue 5): install, serve, sandbox, reload, watchdog, write,
purge, and an OSCORE-protected GET, all inside a booted Debian 13 container; and what an
administrator meets (issue 12): errors at err in the journal, a held port retried with back-off,
a warning for write = true on a read-only root, the access log's journal fields, debian/tests
run by autopkgtest, an upgrade to a locally rebuilt (`dch -n`) package with a changed conffile
that does not stop at dpkg's prompt, and the README's set-up on stock Debian.

The steps run in file order in the session's one container (conftest's `system`, shared with
tests/test_unit_file.py, whose checks run before them), each leaving the service running with a
valid configuration for the next. Everything talks over the container's own loopback
(--private-network): the service's port 5683 never meets the host's.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import container
import pytest
import systemtest

from support.polling import wait_until
from support.system import CONFFILE_CHANGE, copy_checkout, fetch_debs, nmu_build, wheelhouse

pytestmark = pytest.mark.system
UNIT = systemtest.UNIT
CONFIG = "/etc/coap-fileserver.toml"
CONFIG_DIR = "/etc/coap-fileserver.d"
# Where these steps put their settings: a drop-in, as the documentation tells administrators,
# so the conffile stays as shipped and upgrades never stop at dpkg's conffile prompt.
LOCAL = f"{CONFIG_DIR}/local.toml"
STATE = "/var/lib/coap-fileserver"
ROOT = "/srv/coap"
DROPIN_DIR = "/etc/systemd/system/coap-fileserver.service.d"
WRITE_EXAMPLE = "/usr/share/doc/coap-fileserver/examples/write.conf"
MAX_EXPOSURE = 1.5

# A real aiocoap client inside the container: GET (or PUT) a URI, optionally through OSCORE, and
# report what came back as one JSON line.
CLIENT = """
import asyncio, json, sys
import aiocoap
from coapfs.daemon.credentials import prepare_credentials

prepare_credentials(None)  # aiocoap's OSCORE transport imports lakers, which Debian lacks

async def main(uri, credentials, method="GET", payload=""):
    # Named transports: aiocoap 0.4.14 leaves OSCORE out of a client's defaults on Debian 13.
    context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    if credentials:
        with open(credentials) as f:
            context.client_credentials.load_from_dict(json.load(f))
    code = aiocoap.numbers.codes.Code[method]
    request = aiocoap.Message(code=code, uri=uri, payload=payload.encode())
    response = await asyncio.wait_for(context.request(request).response, 20)
    print(json.dumps({
        "code": str(response.code),
        "payload": response.payload.decode(errors="replace"),
        "etag": response.opt.etag.hex() if response.opt.etag is not None else None,
        "oscore": type(response.remote).__module__.endswith("oscore"),
    }))
    await context.shutdown()

asyncio.run(main(sys.argv[1], sys.argv[2] or None, *sys.argv[3:]) if len(sys.argv) > 2
            else main(sys.argv[1], None))
"""
CLIENT_PATH = "/root/coap-get.py"


@pytest.fixture(scope="module")
def system(system: container.Container) -> container.Container:
    """The session's booted system (conftest), with the aiocoap client script in place."""
    system.path(CLIENT_PATH).write_text(CLIENT)
    return system


@pytest.fixture(scope="module")
def nmu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A local rebuild (`dch -n`, a changed conffile), built while the first steps run."""
    workdir = tmp_path_factory.mktemp("nmu")
    process, deb = nmu_build(workdir)
    yield process, deb
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module", autouse=True)
def start_nmu_build(nmu: tuple[subprocess.Popen, Path]) -> None:
    """Start that build with the module's first step, so it overlaps the waiting ones."""


# --- helpers -------------------------------------------------------------------------------------


def systemctl(system: container.Container, *args: str) -> str:
    return system.run(["systemctl", *args, UNIT], timeout=90).stdout.strip()


def restart(system: container.Container, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`systemctl restart`, after clearing a failed state left by the step before (the unit has
    no start limit to reset: test_5b shows quick restarts work without this)."""
    system.run(["systemctl", "reset-failed", UNIT])
    return system.run(["systemctl", "restart", UNIT], check=check, timeout=90)


def is_active(system: container.Container) -> str:
    """`systemctl is-active`: active, activating, inactive or failed (exit 0 only if active)."""
    return system.run(["systemctl", "is-active", UNIT], check=False).stdout.strip()


def prop(system: container.Container, name: str) -> str:
    return systemctl(system, "show", f"--property={name}", "--value")


def diagnostics(system: container.Container) -> str:
    """What systemd and the journal say, for failure messages."""
    status = system.run(["systemctl", "status", "--no-pager", "--lines=0", UNIT], check=False)
    journal = system.run(["journalctl", "-u", UNIT, "--no-pager", "-n", "40"], check=False)
    return f"\n--- systemctl status\n{status.stdout}\n--- journal\n{journal.stdout}"


def coap_client(system: container.Container, *args: str) -> subprocess.CompletedProcess[str]:
    """libcoap's coap-client (an independent C implementation), waiting at most 10 s."""
    return system.run(["coap-client-notls", "-B", "10", *args], check=False, timeout=60)


def coap_client_get(system: container.Container, uri: str) -> str:
    """A GET with coap-client, the payload as received (-o: no newline added for the terminal)."""
    system.run(["rm", "-f", "/root/payload"])
    got = coap_client(system, "-m", "get", "-o", "/root/payload", uri)
    assert got.returncode == 0, got.stderr + diagnostics(system)
    out = system.path("/root/payload")
    assert out.exists(), f"no response to GET {uri}: {got.stderr}{diagnostics(system)}"
    return out.read_text()


def aiocoap_get(
    system: container.Container, uri: str, credentials: str | None = None, *, put: str | None = None
) -> dict:
    """A GET (or with `put`, a PUT of that text) from the aiocoap client in the container."""
    args = ["python3", CLIENT_PATH, uri, credentials or ""]
    if put is not None:
        args += ["PUT", put]
    result = system.run(args, check=False, timeout=60)
    assert result.returncode == 0, result.stderr + diagnostics(system)
    return json.loads(result.stdout)


def set_config(system: container.Container, key: str, value: str | None) -> None:
    """Set a top-level key in the drop-in LOCAL, or drop it from there."""
    local = system.path(LOCAL)
    lines = local.read_text().splitlines() if local.exists() else []
    lines = [line for line in lines if not line.startswith(f"{key} = ")]
    if value is not None:
        lines.append(f"{key} = {value}")
    local.write_text("".join(line + "\n" for line in lines))


def journal_cursor(system: container.Container) -> str:
    """Where the journal ends now: entries after it are the ones a step caused."""
    last = system.run(["journalctl", "-n", "1", "-o", "json", "--no-pager"]).stdout
    return json.loads(last)["__CURSOR"]


def journal(system: container.Container, cursor: str, *args: str) -> list[dict]:
    """The unit's journal entries after `cursor` (journalctl's own filters in `args`)."""
    out = system.run(
        ["journalctl", "-u", UNIT, f"--after-cursor={cursor}", "-o", "json", "--no-pager", *args]
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(entries: list[dict], identifier: str = "coap-fileserver") -> list[str]:
    """The MESSAGE of each entry our program wrote (not systemd's own about the unit)."""
    return [e["MESSAGE"] for e in entries if e.get("SYSLOG_IDENTIFIER") == identifier]


def package_state(system: container.Container) -> tuple[str, str]:
    """dpkg's status abbreviation ("ii" = installed and configured) and the version."""
    out = system.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Version}", "coap-fileserver"]
    ).stdout
    status, version = out.split("|")
    return status.strip(), version


def active_with_pid(system: container.Container) -> int:
    assert is_active(system) == "active", diagnostics(system)
    pid = int(prop(system, "MainPID"))
    assert pid > 0
    return pid


def oscore_contexts(
    system: container.Container, name: str, ids: tuple[str, str], secret: str
) -> tuple[str, str]:
    """An OSCORE security context pair: the server's in its StateDirectory (owned by the
    service, the only place the sandbox lets it write), the client's in /root. `ids` are the
    server's and the client's sender IDs (hex)."""
    server_ctx, client_ctx = f"{STATE}/{name}-server", f"/root/{name}-client"
    server_id, client_id = ids
    for path, sender, recipient in (
        (server_ctx, server_id, client_id),
        (client_ctx, client_id, server_id),
    ):
        settings = {"sender-id_hex": sender, "recipient-id_hex": recipient, "secret_ascii": secret}
        system.run(["mkdir", "-p", path])
        system.path(f"{path}/settings.json").write_text(json.dumps(settings))
    system.run(["chown", "-R", "coap-fileserver:coap-fileserver", server_ctx])
    return server_ctx, client_ctx


# --- the steps -----------------------------------------------------------------------------------


def test_1_active_after_install_and_start_stop_restart(system: container.Container) -> None:
    assert system.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
    first = active_with_pid(system)
    assert "Serving" in prop(system, "StatusText"), diagnostics(system)

    systemctl(system, "stop")
    assert is_active(system) == "inactive"
    assert prop(system, "Result") == "success"

    systemctl(system, "start")
    second = active_with_pid(system)
    restart(system)
    third = active_with_pid(system)
    assert len({first, second, third}) == 3
    # The daemon runs as the system user from sysusers.d, not as root.
    uid = system.run(["id", "-u", "coap-fileserver"]).stdout.strip()
    status = system.run(["cat", f"/proc/{third}/status"]).stdout
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in status


def test_1b_check_config_from_anywhere_names_the_served_root(system: container.Container) -> None:
    """Issue 12.2: run from /root (or any directory), the check names what the service serves;
    and the package ships the drop-in directory, empty, for the administrator's settings."""
    for where in ("/root", "/tmp", "/"):
        checked = system.run(f"cd {where} && coap-fileserver --check-config")
        assert checked.stdout == (
            f"coap-fileserver: configuration OK ({CONFIG}); serving {ROOT}\n"
        ), checked.stdout
    listed = system.run(["dpkg-query", "-L", "coap-fileserver"]).stdout.splitlines()
    assert CONFIG_DIR in listed
    assert system.run(["ls", "-A", CONFIG_DIR]).stdout == ""


def test_2_coap_client_fetches_a_file_from_the_root(system: container.Container) -> None:
    system.path(f"{ROOT}/hello.txt").write_text("hello from the package\n")
    for host in ("[::1]", "127.0.0.1"):
        assert coap_client_get(system, f"coap://{host}/hello.txt") == "hello from the package\n"
    assert "</hello.txt>" in coap_client_get(system, "coap://[::1]/")


def test_2b_oscore_protected_get(system: container.Container) -> None:
    """OSCORE from Debian's packages alone (no lakers-python): the server's security context lives
    in its StateDirectory, the only place the sandbox lets it write."""
    server_ctx, client_ctx = oscore_contexts(system, "oscore", ("73", "63"), "package test secret")
    server_credentials = {"coap://*": {"oscore": {"contextfile": server_ctx + "/"}}}
    system.path(f"{STATE}/credentials.json").write_text(json.dumps(server_credentials))
    system.run(["mkdir", "-p", CONFIG_DIR])
    dropin = f"{CONFIG_DIR}/oscore.toml"
    system.path(dropin).write_text(f'credentials = "{STATE}/credentials.json"\n')
    try:
        restart(system)
        active_with_pid(system)
        client_credentials = {"coap://[::1]/*": {"oscore": {"contextfile": client_ctx + "/"}}}
        system.path("/root/client.json").write_text(json.dumps(client_credentials))
        got = aiocoap_get(system, "coap://[::1]/hello.txt", "/root/client.json")
        assert got == {
            "code": "2.05 Content",
            "payload": "hello from the package\n",
            "etag": got["etag"],
            "oscore": True,
        }, diagnostics(system)
    finally:
        system.run(["rm", "-f", dropin])
        restart(system)


def test_3_security_exposure(system: container.Container) -> None:
    out = system.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    last = out.strip().splitlines()[-1]
    # "→ Overall exposure level for coap-fileserver.service: 1.1 OK :-)"
    assert f"Overall exposure level for {UNIT}:" in last, out
    exposure = float(last.split(":")[1].split()[0])
    container.log(f"systemd-analyze security: {exposure}")
    assert exposure <= MAX_EXPOSURE, out


def test_4_reload_good_and_bad_edits(system: container.Container) -> None:
    pid = active_with_pid(system)
    before = aiocoap_get(system, "coap://[::1]/hello.txt")
    assert len(bytes.fromhex(before["etag"])) == 8

    set_config(system, "etag_length", "2")
    systemctl(system, "reload")
    assert active_with_pid(system) == pid
    after = aiocoap_get(system, "coap://[::1]/hello.txt")
    assert len(bytes.fromhex(after["etag"])) == 2, after

    since = system.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    set_config(system, "etag_length", "99")
    try:
        reload = system.run(["systemctl", "reload", UNIT], check=False, timeout=90)
        assert reload.returncode == 0, reload.stderr  # the daemon answers READY=1 regardless
        assert active_with_pid(system) == pid
        still = aiocoap_get(system, "coap://[::1]/hello.txt")
        assert len(bytes.fromhex(still["etag"])) == 2, "the old configuration must stay in force"
        status = system.run(["systemctl", "status", "--no-pager", UNIT], check=False).stdout
        assert "etag_length" in status, status
        errors = system.run(
            ["journalctl", "-u", UNIT, "-p", "err", "--since", since, "--no-pager", "-o", "cat"]
        ).stdout
        assert LOCAL in errors and "etag_length" in errors and "99" in errors, errors
    finally:
        set_config(system, "etag_length", "2")
        systemctl(system, "reload")
    assert active_with_pid(system) == pid
    assert "etag_length" not in prop(system, "StatusText")


def test_4b_invalid_config_at_start_fails_once_with_78(system: container.Container) -> None:
    """A configuration error is not cured by restarting: exit 78, failed, no restart loop."""
    restarts = int(prop(system, "NRestarts"))
    set_config(system, "etag_length", "99")
    try:
        start = restart(system, check=False)
        assert start.returncode != 0
        time.sleep(3)  # RestartSec=1s: a restart would have happened by now
        assert is_active(system) == "failed", diagnostics(system)
        assert prop(system, "ExecMainStatus") == "78", diagnostics(system)
        assert int(prop(system, "NRestarts")) == restarts, diagnostics(system)
        errors = system.run(["journalctl", "-u", UNIT, "-n", "20", "--no-pager", "-o", "cat"])
        assert f"{LOCAL}: etag_length = 99" in errors.stdout, errors.stdout
    finally:
        set_config(system, "etag_length", "2")
        system.run(["systemctl", "reset-failed", UNIT])
        systemctl(system, "start")
    active_with_pid(system)


def test_4c_every_fatal_reason_at_err(system: container.Container) -> None:
    """Issue 12.4: `journalctl -u coap-fileserver -p err` shows why a start failed, not only
    systemd's "Failed to start", in one line and without a traceback: a bind that is not an
    address (configuration, exit 78), a host name that does not resolve and an address that is
    not on this machine (exit 1, retried). The port in use is the next step's. (The container
    has loopback only: the name lookup sends nothing anywhere.)"""
    cases = [
        ('["5683"]', "78", f'{LOCAL}: bind = ["5683"]: expected ":5683"'),
        ('["no.such.host.invalid"]', "1", "coap-fileserver: cannot bind no.such.host.invalid: "),
        ('["192.0.2.1:5683"]', "1", "coap-fileserver: cannot bind 192.0.2.1:5683: "),
    ]
    try:
        for value, status, reason in cases:
            set_config(system, "bind", value)
            cursor = journal_cursor(system)
            assert restart(system, check=False).returncode != 0
            assert prop(system, "ExecMainStatus") == status, diagnostics(system)
            errors = messages(journal(system, cursor, "-p", "err"))
            assert any(reason in m for m in errors), (errors, diagnostics(system))
            # The reason is ours, at err; systemd's own "Failed to start" is there besides.
            assert all(m.startswith("coap-fileserver: ") for m in errors), errors
            everything = messages(journal(system, cursor))
            assert not any("Traceback" in m for m in everything), everything
    finally:
        set_config(system, "bind", None)
        restart(system)
    active_with_pid(system)


def test_5_watchdog_restarts_a_stopped_daemon(system: container.Container) -> None:
    pid = active_with_pid(system)
    restarts = int(prop(system, "NRestarts"))
    system.run(f"kill -STOP {pid}")  # the shell's kill: procps is not installed
    started = time.monotonic()

    def restarted() -> bool:
        return (
            int(prop(system, "NRestarts")) > restarts
            and is_active(system) == "active"
            and int(prop(system, "MainPID")) not in (0, pid)
        )

    wait_until(
        restarted,
        60,
        what="the watchdog restarts the daemon",
        interval=0.5,
        details=lambda: diagnostics(system),
    )
    container.log(f"watchdog restart after {time.monotonic() - started:.1f} s")
    assert coap_client_get(system, "coap://[::1]/hello.txt") == "hello from the package\n"


HOLDER = "coapfs-port-holder.service"
# A process of another user (root) holding the service's port on every address, as a second
# server started by hand would.
HOLD_PORT = (
    "import socket, time\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.bind(('::', 5683))\n"
    "time.sleep(600)\n"
)
BACKOFF_WATCH = 15.0


def port_5683_bound(system: container.Container) -> bool:
    table = system.run(["cat", "/proc/net/udp6", "/proc/net/udp"]).stdout
    return ":1633 " in table  # 5683 in hex


def test_5b_port_in_use_is_retried_with_backoff_and_comes_up_when_free(
    system: container.Container,
) -> None:
    """Issue 12.5: a held port is retried ever more slowly (RestartSteps=), never reaching the
    start limit; the err line says who holds the port; a manual restart works meanwhile; once
    the port is free the service comes up by itself."""
    systemctl(system, "stop")
    system.run(["systemd-run", f"--unit={HOLDER}", "python3", "-c", HOLD_PORT])
    try:
        wait_until(lambda: port_5683_bound(system), 20, what="the holder binds port 5683")
        cursor = journal_cursor(system)
        # No reset-failed here: the start limit is what this step is about.
        start = system.run(["systemctl", "restart", UNIT], check=False, timeout=90)
        assert start.returncode != 0
        seen = []
        deadline = time.monotonic() + BACKOFF_WATCH
        while time.monotonic() < deadline:
            state = [prop(system, n) for n in ("ActiveState", "SubState", "Result", "NRestarts")]
            seen.append(tuple(state))
            time.sleep(0.5)
        assert all(s[0] == "activating" for s in seen), seen
        assert all(s[2] != "start-limit-hit" for s in seen), seen
        restarts = int(seen[-1][3])
        # At a fixed RestartSec=1s it would be 7 or so, and the start limit (5 in 10 s) hit.
        assert 2 <= restarts <= 5, seen
        errors = messages(journal(system, cursor, "-p", "err"))
        held = (
            "coap-fileserver: cannot bind all addresses: Address already in use (held by a"
            " process of user root, not visible here; ss -ulpn names it)"
        )
        # One per start: the first, and each restart (one more may have begun meanwhile).
        assert restarts + 1 <= errors.count(held) <= restarts + 2, errors
        assert set(errors) == {held}, errors

        # A manual restart is never refused as "repeated too quickly".
        again = system.run(["systemctl", "restart", UNIT], check=False, timeout=90)
        assert again.returncode != 0 and "too quickly" not in again.stderr, again.stderr
        assert prop(system, "ActiveState") == "activating"
    finally:
        system.run(["systemctl", "stop", HOLDER], check=False)
    released = time.monotonic()
    wait_until(
        lambda: is_active(system) == "active",
        70,
        what="the service comes up by itself once the port is free",
        interval=0.5,
        details=lambda: diagnostics(system),
    )
    container.log(f"up {time.monotonic() - released:.1f} s after the port was freed")
    # Quick manual restarts, more than a start limit would allow (5 in 10 s), all work.
    for _ in range(6):
        assert system.run(["systemctl", "restart", UNIT], timeout=90).returncode == 0
    assert prop(system, "Result") == "success"
    assert coap_client_get(system, "coap://[::1]/hello.txt") == "hello from the package\n"


def test_5c_autopkgtest_runs_debian_tests(system: container.Container) -> None:
    """Issue 12.11: debian/tests as Debian's CI runs them, by autopkgtest from the unpacked
    source against the installed package. The booted container is the isolation the test's
    `isolation-container` restriction asks for; the null runner cannot know that, so it is told
    (--ignore-restrictions) rather than the restriction dropped for Debian's CI."""
    source = "/root/source"
    system.run(["rm", "-rf", source])
    copy_checkout(system.path(source))
    got = system.run(
        [
            "autopkgtest",
            "--no-built-binaries",
            "--ignore-restrictions=isolation-container",
            source,
            "--",
            "null",
        ],
        check=False,
        timeout=300,
    )
    report = got.stdout + got.stderr
    assert got.returncode == 0, report
    assert re.search(r"^service +PASS$", report, re.MULTILINE), report
    assert "ok: served 'autopkgtest " in report, report
    assert "logged it (coapfs.access: [::1]:" in report, report
    active_with_pid(system)


UNWRITABLE = f"write = true, but {ROOT} cannot be written: "


def unwritable_warnings(system: container.Container, cursor: str) -> list[dict]:
    entries = journal(system, cursor)
    return [e for e in entries if UNWRITABLE in e.get("MESSAGE", "")]


def test_6_write_needs_the_documented_dropin(system: container.Container) -> None:
    """write = true (in a drop-in) takes the write drop-in of the unit and the root's owner;
    issue 12.6: each missing one is named in one warning, with what to run."""
    put = ["-m", "put", "-e", "written over CoAP"]
    cursor = journal_cursor(system)
    set_config(system, "write", "true")
    systemctl(system, "reload")

    # write = true alone: the sandbox keeps the root read-only, and the journal says so once.
    coap_client(system, *put, "coap://[::1]/refused.txt")
    assert not system.path(f"{ROOT}/refused.txt").exists()
    (warning,) = unwritable_warnings(system, cursor)
    assert warning["PRIORITY"] == "4", warning
    text = warning["MESSAGE"]
    assert f"{UNWRITABLE}it is on a read-only mount" in text, text
    assert f"cp {WRITE_EXAMPLE} {DROPIN_DIR}/" in text, text
    assert f"chown coap-fileserver:coap-fileserver {ROOT}" in text, text

    # The unit's drop-in, but the root still root's: the missing permission is named.
    system.run(f"mkdir -p {DROPIN_DIR} && cp {WRITE_EXAMPLE} {DROPIN_DIR}/")
    system.run(["systemctl", "daemon-reload"])
    cursor = journal_cursor(system)
    restart(system)
    (warning,) = unwritable_warnings(system, cursor)
    assert f"{UNWRITABLE}user coap-fileserver lacks write permission" in warning["MESSAGE"]

    system.run(["chown", "coap-fileserver:coap-fileserver", ROOT])
    cursor = journal_cursor(system)
    restart(system)
    active_with_pid(system)
    got = coap_client(system, *put, "coap://[::1]/uploaded.txt")
    assert got.returncode == 0, got.stderr + diagnostics(system)
    assert system.path(f"{ROOT}/uploaded.txt").read_text() == "written over CoAP"
    owner = system.run(["stat", "-c", "%U", f"{ROOT}/uploaded.txt"]).stdout.strip()
    assert owner == "coap-fileserver"
    assert coap_client_get(system, "coap://[::1]/uploaded.txt") == "written over CoAP"
    assert unwritable_warnings(system, cursor) == []


def test_6b_access_log_fields_in_the_journal(system: container.Container) -> None:
    """Issue 12.9: access_log = true, and each request is one journal entry whose fields say
    who asked what and what came back; `journalctl -u coap-fileserver CODE=4.04` finds it."""
    set_config(system, "access_log", "true")
    systemctl(system, "reload")
    cursor = journal_cursor(system)
    try:
        assert coap_client_get(system, "coap://[::1]/hello.txt") == "hello from the package\n"
        coap_client(system, "-m", "get", "coap://127.0.0.1/missing.txt")
        entries = journal(system, cursor, "SYSLOG_IDENTIFIER=coap-fileserver", "METHOD=GET")
        by_path = {e["PATH"]: e for e in entries}
        hello, missing = by_path["/hello.txt"], by_path["/missing.txt"]
        assert (hello["CODE"], hello["BYTES"], hello["REMOTE"]) == ("2.05", "23", "::1"), hello
        assert (missing["CODE"], missing["REMOTE"]) == ("4.04", "127.0.0.1"), missing
        for entry in (hello, missing):
            assert entry["PRIORITY"] == "6" and entry["_SYSTEMD_UNIT"] == UNIT, entry
            assert float(entry["DURATION_MS"]) >= 0 and int(entry["REMOTE_PORT"]) > 0, entry
            assert "IDENTITY" not in entry  # no OSCORE: nobody authenticated
            assert entry["MESSAGE"].startswith("coapfs.access: "), entry
        found = journal(system, cursor, "CODE=4.04")
        assert [e["PATH"] for e in found] == ["/missing.txt"], found
    finally:
        set_config(system, "access_log", None)
        systemctl(system, "reload")


def test_6d_writes_by_an_oscore_identity_only(system: container.Container) -> None:
    """Issue 9: an [[access]] rule lets only the OSCORE identity ":uploader" write; its PUT is
    2.01 and logged with the identity, an unauthenticated PUT is 4.01 and writes nothing."""
    server_ctx, client_ctx = oscore_contexts(system, "uploader", ("75", "55"), "uploader's secret")
    server_credentials = {":uploader": {"oscore": {"contextfile": server_ctx + "/"}}}
    system.path(f"{STATE}/uploader.json").write_text(json.dumps(server_credentials))
    dropin = f"{CONFIG_DIR}/access.toml"
    system.path(dropin).write_text(
        f'credentials = "{STATE}/uploader.json"\n\n[[access]]\npath = "/"\nwrite = ":uploader"\n'
    )
    client_credentials = {"coap://[::1]/*": {"oscore": {"contextfile": client_ctx + "/"}}}
    system.path("/root/uploader.json").write_text(json.dumps(client_credentials))
    cursor = journal_cursor(system)
    try:
        check = system.run(["coap-fileserver", "--check-config"], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        systemctl(system, "reload")
        active_with_pid(system)
        refused = coap_client(system, "-m", "put", "-e", "anonymous", "coap://[::1]/by-oscore.txt")
        assert "4.01" in refused.stdout + refused.stderr, refused
        assert not system.path(f"{ROOT}/by-oscore.txt").exists()
        got = aiocoap_get(system, "coap://[::1]/by-oscore.txt", "/root/uploader.json", put="signed")
        assert (got["code"], got["oscore"]) == ("2.01 Created", True), got
        assert system.path(f"{ROOT}/by-oscore.txt").read_text() == "signed"
        changes = [m for m in messages(journal(system, cursor)) if m.startswith("coapfs.changes")]
        assert any(":uploader@" in m and "/by-oscore.txt" in m for m in changes), changes
    finally:
        system.run(["rm", "-f", dropin, f"{ROOT}/by-oscore.txt"])
        systemctl(system, "reload")


def test_6c_upgrade_to_a_local_rebuild_with_a_changed_conffile(
    system: container.Container, nmu: tuple[subprocess.Popen, Path]
) -> None:
    """Issues 12.7 and 12.11: a rebuild with a `dch -n` version builds (build-deb's version
    check and lintian accept it), and upgrading to it, whose /etc/coap-fileserver.toml changed,
    completes unattended (apt-get -y, no --force-conf*): the settings are in a drop-in, so dpkg
    has no edited conffile to ask about. Had the conffile been edited, it would stop there."""
    process, deb = nmu
    status = process.wait(timeout=900)
    log = deb.parents[2] / "build.log"
    assert status == 0 and deb.exists(), log.read_text()[-5000:]
    assert "lintian clean" in log.read_text()
    version = deb.name.split("_")[1]
    inside = "/root/rebuilt.deb"
    shutil.copyfile(deb, system.path(inside))
    assert package_state(system)[0] == "ii"

    upgrade = system.run(["apt-get", "install", "-y", "-q", inside], check=False, timeout=300)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert package_state(system) == ("ii", version)
    assert system.path(CONFIG).read_text().endswith(CONFFILE_CHANGE)
    leftovers = system.run(f"ls -d {CONFIG}.* {LOCAL}.* 2>/dev/null || true").stdout
    assert leftovers == "", leftovers
    # The drop-in still decides: writes on, after the upgrade's restart.
    active_with_pid(system)
    assert "read-write" in prop(system, "StatusText"), diagnostics(system)

    # The contrast: an edited conffile and another shipped one stop dpkg at its prompt, which
    # an unattended upgrade (no terminal) cannot answer.
    with system.path(CONFIG).open("a") as conffile:
        conffile.write("write = true\n")
    downgrade = system.run(
        ["apt-get", "install", "-y", "-q", "--allow-downgrades", systemtest.DEB_INSIDE],
        check=False,
        timeout=300,
    )
    assert downgrade.returncode != 0
    assert "end of file on stdin at conffile prompt" in downgrade.stdout + downgrade.stderr
    assert package_state(system)[0] != "ii"
    system.run(["dpkg", "--configure", "--force-confnew", "coap-fileserver"], timeout=300)
    system.run(["rm", "-f", f"{CONFIG}.dpkg-old"])
    assert package_state(system)[0] == "ii"
    active_with_pid(system)


def test_7_purge_removes_the_package_and_keeps_served_files(system: container.Container) -> None:
    system.run(["apt-get", "purge", "-y", "-q", "coap-fileserver"], timeout=300)
    gone = [
        "/usr/bin/coap-fileserver",
        "/usr/lib/systemd/system/coap-fileserver.service",
        "/etc/systemd/system/multi-user.target.wants/coap-fileserver.service",
        DROPIN_DIR,
        CONFIG,
        CONFIG_DIR,
        STATE,
        "/usr/lib/sysusers.d/coap-fileserver.conf",
        "/usr/share/man/man8/coap-fileserver.8.gz",
        "/usr/share/man/man5/coap-fileserver.toml.5.gz",
        "/usr/share/doc/coap-fileserver",
    ]
    left = [p for p in gone if system.path(p).exists() or system.path(p).is_symlink()]
    assert left == []
    state = system.run(["systemctl", "show", "--property=LoadState", "--value", UNIT]).stdout
    assert state.strip() == "not-found"
    served = system.run(["sh", "-c", f"cat {shlex.quote(ROOT)}/*.txt"]).stdout
    assert served == "hello from the package\nwritten over CoAP"
    dpkg = system.run(["dpkg-query", "-W", "coap-fileserver"], check=False)
    assert dpkg.returncode != 0, dpkg.stdout


CHECKOUT = "/root/coap-fileserver"
README_SERVER = "coapfs-readme.service"
SITE_DIRS = "/usr/lib/python3/dist-packages /usr/local/lib /usr/lib/python3.13 /root/.local"


def site_packages(system: container.Container) -> list[str]:
    """Every file in the system Python's site-packages and dist-packages directories."""
    found = system.run(
        f"find {SITE_DIRS} -type f 2>/dev/null | grep -E '/(site|dist)-packages/' | sort || true"
    ).stdout
    return found.splitlines()


# The README's first command, as proposed for issue 12.3 (README.md is the lead's to change).
def readme_first_command() -> str:
    """The README's first line of commands, without its comment: what a newcomer runs."""
    for line in (container.PACKAGING.parent / "README.md").read_text().splitlines():
        if line.startswith("    "):
            return line.split("#", 1)[0].strip()
    raise AssertionError("README.md has no command")


README_SETUP = readme_first_command()


def test_8_readme_setup_on_stock_debian(system: container.Container) -> None:
    """Issue 12.3: the README's first command on a stock Debian 13 as root, from a checkout:
    packaging/venv installs python3-venv with apt, makes .venv, installs the project there, and
    leaves the system Python and the checkout as they were; the server it starts serves the
    checkout. The container has no network: apt takes python3-venv's packages from its cache
    (fetched on the host, as apt would have), pip takes the same wheels from a wheelhouse."""
    setup, serve = README_SETUP.split(" && ")
    for deb in fetch_debs(system, "python3-venv"):
        shutil.copyfile(deb, system.path(f"/var/cache/apt/archives/{deb.name}"))
    project = tomllib.loads((container.PACKAGING.parent / "pyproject.toml").read_text())
    requirements = [r.split(";")[0] for r in project["project"]["dependencies"]]
    house = wheelhouse([*project["build-system"]["requires"], *requirements])
    system.run(["rm", "-rf", CHECKOUT, "/root/wheels"])
    copy_checkout(system.path(CHECKOUT))
    shutil.copytree(house, system.path("/root/wheels"))
    assert system.run(["python3", "-c", "import ensurepip"], check=False).returncode != 0
    before = site_packages(system)

    made = system.run(
        f"cd {CHECKOUT} && PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels {setup}",
        check=False,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "installing python3-venv" in made.stderr, made.stderr
    assert site_packages(system) == before
    left = system.run(f"cd {CHECKOUT} && ls -d build *.egg-info 2>/dev/null || true").stdout
    assert left == "", left
    where = system.run([f"{CHECKOUT}/.venv/bin/python", "-c", "import coapfs; print(coapfs)"])
    assert f"from '{CHECKOUT}/.venv/lib/python3" in where.stdout, where.stdout

    # The server as the README starts it, from the checkout: it serves the checkout (on the
    # default port, free since the package was purged).
    assert is_active(system) != "active"
    system.run(
        ["systemd-run", f"--unit={README_SERVER}", f"--working-directory={CHECKOUT}"]
        + ["/bin/sh", "-c", f"exec {serve}"]
    )
    try:
        wait_until(
            lambda: (
                system.run(["systemctl", "is-active", README_SERVER], check=False).returncode == 0
                and coap_client(system, "-m", "get", "coap://[::1]/.well-known/core").returncode
                == 0
            ),
            30,
            what="the README's server answers",
        )
        listing = coap_client_get(system, "coap://[::1]/")
        assert "</README.md>" in listing and "</packaging/>;ct=40" in listing, listing
        assert "build" not in listing and "egg-info" not in listing and ".venv" not in listing
    finally:
        system.run(["systemctl", "stop", README_SERVER], check=False)
