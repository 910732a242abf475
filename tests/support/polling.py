"""Waiting for a condition: the one helper every test uses for it (and its twin for code that
runs on an event loop). A condition that does not come true in time fails the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")


def _rounds(timeout: float, what: str, details: Callable[[], str] | None) -> Iterator[None]:
    """One round per check until the deadline, one more after it; then the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        yield
    yield
    message = f"not within {timeout:g} s: {what}"
    pytest.fail(f"{message}\n{details()}" if details is not None else message)


def wait_until(
    check: Callable[[], T],
    timeout: float = 5.0,
    *,
    what: str,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Call `check` every `interval` seconds until it returns something true, and return that.
    If `timeout` seconds pass first, fail the test, saying `what` was awaited and `details()`."""
    for _ in _rounds(timeout, what, details):
        if result := check():
            return result
        time.sleep(interval)
    raise AssertionError("unreachable")


async def wait_until_async(
    check: Callable[[], T],
    timeout: float = 5.0,
    *,
    what: str,
    interval: float = 0.01,
    details: Callable[[], str] | None = None,
) -> T:
    """`wait_until` for a coroutine: the event loop runs while it waits."""
    for _ in _rounds(timeout, what, details):
        if result := check():
            return result
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")
