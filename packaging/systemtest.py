"""What the package's system tests share: the built .deb, installed with apt in a booted trixie.

tests/test_package.py and tests/test_unit_file.py use it. The .deb comes from packaging/build-deb
(reused when dist/ already holds a build of exactly these sources), the system from
container.runtime_rootfs (cached; only its first creation needs Debian's archive).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import container

BUILD_DEB = container.PACKAGING / "build-deb"
IN_CI = os.environ.get("CI") == "true"
DEB_INSIDE = "/root/coap-fileserver.deb"
UNIT = "coap-fileserver.service"


def root_required() -> str | None:
    """Why the system test cannot run here, or None. Under CI it always runs (and fails if not
    root); elsewhere it needs root for mmdebstrap, mounts, cgroups and nspawn."""
    if os.geteuid() != 0 and not IN_CI:
        return "the system test needs root (mmdebstrap, overlay mounts, systemd-nspawn)"
    return None


def built_deb() -> Path:
    """The package of the current sources, from dist/ if it holds one, else built.

    Built with --nocheck: the unit tests are `make test`'s own job (and `make deb` runs them in
    trixie); here they would only couple the system test to every unit test.
    """
    result = subprocess.run(
        [str(BUILD_DEB), "--if-stale", "--nocheck"],
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise container.ContainerError(f"packaging/build-deb failed ({result.returncode})")
    return Path(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def installed_system(deb: Path) -> Iterator[container.Container]:
    """A booted trixie (loopback-only network) with `deb` installed by apt, offline."""
    with container.Container(container.runtime_rootfs()) as system:
        shutil.copyfile(deb, system.path(DEB_INSIDE))
        system.run(
            ["apt-get", "install", "-y", "-q", DEB_INSIDE],
            timeout=300,
        )
        yield system
