"""A support module run as a program of its own (`python -m support.NAME`), e.g. a client that
must run in another network namespace or must not share the test's threads."""

from __future__ import annotations

import sys

from support.repo import REPO, environment


def command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"support.{name}", *args]


def child_environment() -> dict[str, str]:
    """What such a child needs on its path: the checkout, tests/ (support) and bench/ (coapmsg)."""
    paths = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]
    return environment({"PYTHONPATH": ":".join(paths)})
