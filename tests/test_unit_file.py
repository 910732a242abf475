"""The systemd unit, checked by the systemd it is written for.

The host has systemd 252, which does not know Type=notify-reload; so the unit is verified inside
a booted Debian 13 (systemd 257) with the package installed: `systemd-analyze verify` there also
checks that the programs it runs and the man pages it names exist.
"""

from __future__ import annotations

import container
import pytest
import systemtest

pytestmark = pytest.mark.system

UNIT = systemtest.UNIT
DROPIN_DIR = "/etc/systemd/system/coap-fileserver.service.d"
WRITE_EXAMPLE = "/usr/share/doc/coap-fileserver/examples/write.conf"


def verify(system: container.Container) -> str:
    result = system.run(["systemd-analyze", "verify", UNIT], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_verify_is_clean(system: container.Container) -> None:
    """No error and no warning: syntax, ExecStart programs, Documentation= man pages."""
    assert verify(system) == ""


def test_verify_with_the_write_dropin(system: container.Container) -> None:
    system.run(f"mkdir -p {DROPIN_DIR} && cp {WRITE_EXAMPLE} {DROPIN_DIR}/")
    try:
        assert verify(system) == ""
        system.run(["systemctl", "daemon-reload"])
        shown = system.run(["systemctl", "show", "-P", "ReadWritePaths", UNIT]).stdout
        assert shown.split() == ["/srv/coap"]
    finally:
        system.run(f"rm -r {DROPIN_DIR} && systemctl daemon-reload")


def test_unit_as_systemd_reads_it(system: container.Container) -> None:
    """The properties issue 4 asks for, as systemd parsed them (not as the file spells them)."""
    names = [
        "Type",
        "WatchdogUSec",
        "Restart",
        "RestartUSec",
        "RestartSteps",
        "RestartMaxDelayUSec",
        "RestartPreventExitStatus",
        "StartLimitIntervalUSec",
        "ExecStartPre",
        "User",
        "StateDirectory",
        "Documentation",
        "ProtectSystem",
        "ReadWritePaths",
        "UnitFileState",
    ]
    shown = system.run(["systemctl", "show", UNIT, *(f"--property={n}" for n in names)]).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert props["Type"] == "notify-reload"
    assert props["WatchdogUSec"] == "10s"
    assert props["Restart"] == "on-failure"
    # Issue 12.5: a failure that persists is retried from 1 s up to a minute, in 8 steps.
    assert (props["RestartUSec"], props["RestartSteps"], props["RestartMaxDelayUSec"]) == (
        "1s",
        "8",
        "1min",
    )
    assert props["StartLimitIntervalUSec"] == "0"  # no start limit: manual restarts always work
    assert props["RestartPreventExitStatus"] == "78"
    assert (
        "path=/usr/bin/coap-fileserver ; argv[]=/usr/bin/coap-fileserver --check-config ;"
        " ignore_errors=yes" in props["ExecStartPre"]
    )
    assert props["User"] == "coap-fileserver"
    assert props["StateDirectory"] == "coap-fileserver"
    assert props["Documentation"].split() == [
        '"man:coap-fileserver(8)"',
        '"man:coap-fileserver.toml(5)"',
    ]
    assert props["ProtectSystem"] == "strict"
    assert props["ReadWritePaths"] == ""  # read-only unless the write drop-in is installed
    assert props["UnitFileState"] == "enabled"


def test_sysusers_made_a_system_user(system: container.Container) -> None:
    entry = system.run(["getent", "passwd", "coap-fileserver"]).stdout.strip().split(":")
    uid, shell = int(entry[2]), entry[6]
    assert uid < 1000
    assert shell == "/usr/sbin/nologin"
