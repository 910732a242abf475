"""The system tests' one booted Debian 13 (systemd 257) with the package installed.

tests/test_unit_file.py and tests/test_package.py share it for the whole session (conftest's
`system` fixture); the unit file's read-only checks run first, the package's steps after them
(conftest orders them), since those change the system and end by purging the package.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import container
import pytest
import systemtest


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
