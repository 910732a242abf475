"""Tools a test needs from the host, and what their absence means: under CI (CI=true) every
test must run, so a missing tool fails it; elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI") == "true"


def missing(reason: str) -> NoReturn:
    """A tool the test needs is not there: fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def require(program: str, package: str) -> str:
    """The path of `program`, or `missing` naming the Debian package that has it."""
    path = shutil.which(program)
    if path is None:
        missing(f"{program} is not installed ({package})")
    return path


def libcoap_client() -> str:
    """libcoap's command line client (Debian libcoap3-bin), under any of its names."""
    for name in ("coap-client", "coap-client-notls", "coap-client-gnutls", "coap-client-openssl"):
        path = shutil.which(name)
        if path:
            return path
    missing("libcoap's coap-client is not installed (apt-get install libcoap3-bin)")
