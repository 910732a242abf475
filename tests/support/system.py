"""The system tests' one booted Debian 13 (systemd 257) with the package installed.

tests/test_unit_file.py and tests/test_package.py share it for the whole session (conftest's
`system` fixture); the unit file's read-only checks run first, the package's steps after them
(conftest orders them), since those change the system and end by purging the package.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import container
import pytest
import systemtest

from support.repo import REPO


def booted_system() -> Iterator[container.Container]:
    """Boot, install the package of the current sources, yield; skipped where not root."""
    reason = systemtest.root_required()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    deb = systemtest.built_deb()
    with systemtest.installed_system(deb) as booted:
        container.log(f"system test ready after {time.monotonic() - started:.0f} s")
        yield booted
    container.log(f"system test done after {time.monotonic() - started:.0f} s")


# --- what some steps need beside the booted system ------------------------------------------------


def copy_checkout(dest: Path) -> Path:
    """The checkout's sources (tracked and new files, as packaging/build-deb takes them) copied
    to `dest`: what a user has after `git clone`, without caches, dist/ or environments."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = Path(os.fsdecode(raw))
        source = REPO / rel
        if not (source.is_symlink() or source.is_file()):
            continue  # deleted in the work tree, not yet in the index
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / rel, follow_symlinks=False)
    return dest


#: `dch -n "Local rebuild."` run as root on a host named buildhost without DEBEMAIL, on this
#: native package: a +nmuN version, UNRELEASED, the "Non-maintainer upload." line, and the
#: user@host address dch makes up (checked against devscripts' dch).
NMU_ENTRY = """coap-fileserver ({version}) UNRELEASED; urgency=medium

  * Non-maintainer upload.
  * Local rebuild.

 -- root <root@buildhost>  {date}

"""
#: What the rebuilt package changes in its conffile (so that an upgrade to it replaces it).
CONFFILE_CHANGE = "\n# A local rebuild changed this file.\n"


def nmu_build(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start building, with packaging/build-deb --nocheck, the package of a copy of the checkout
    with a `dch -n` entry and a changed /etc/coap-fileserver.toml; the build's process and
    the .deb it will leave. The copy shares the packaging cache (the build root filesystem)."""
    source = copy_checkout(workdir / "source")
    changelog = source / "debian" / "changelog"
    old = changelog.read_text()
    version = old.split("(", 1)[1].split(")", 1)[0] + "+nmu1"
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    changelog.write_text(NMU_ENTRY.format(version=version, date=date) + old)
    conffile = source / "etc" / "coap-fileserver.toml"
    conffile.write_text(conffile.read_text() + CONFFILE_CHANGE)
    log = (workdir / "build.log").open("wb")
    process = subprocess.Popen(
        [str(source / "packaging" / "build-deb"), "--nocheck"],
        env=dict(os.environ, COAPFS_PACKAGING_CACHE=str(container.CACHE)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process, source / "dist" / f"coap-fileserver_{version}_all.deb"


def fetch_debs(system: container.Container, package: str) -> list[Path]:
    """The .deb files apt inside `system` would download to install `package` (with what it
    recommends, as apt-get install does), fetched on the host into the packaging cache and
    checked against apt's hashes: so the container's apt installs them offline, from its cache,
    exactly as it would after downloading them."""
    uris = system.run(["apt-get", "install", "--print-uris", "-qq", package]).stdout
    cache = container.CACHE / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for line in uris.splitlines():
        uri, name, _size, digest = line.split()
        algorithm, _, expected = digest.partition(":")
        target = cache / name
        if not target.exists():
            with urllib.request.urlopen(uri.strip("'"), timeout=60) as response:
                data = response.read()
            if hashlib.new(algorithm.lower().removesuffix("sum"), data).hexdigest() != expected:
                raise container.ContainerError(f"{uri}: not the file apt expects")
            target.with_suffix(".partial").write_bytes(data)
            target.with_suffix(".partial").rename(target)
        files.append(target)
    return files


def wheelhouse(requirements: list[str]) -> Path:
    """Wheels of `requirements` and their dependencies (all pure Python), made by pip on the
    host and cached: the stand-in for PyPI inside the container, which has no network."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    house = container.CACHE / f"wheelhouse-{key}"
    if not house.exists():
        partial = house.with_name(house.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
            + ["--wheel-dir", str(partial), *requirements],
            check=True,
            timeout=300,
        )
        partial.rename(house)
    return house
