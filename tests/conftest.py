"""Shared fixtures; what they are made of lives in tests/support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.client import Client
from support.server import Servers
from support.system import booted_system
from support.tools import libcoap_client


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """The real aiocoap client."""
    c = Client()
    yield c
    c.close()


@pytest.fixture
def start_server(tmp_path: Path, client: Client) -> Iterator[Servers]:
    """Starts real servers for this test, logging into tmp_path."""
    servers = Servers(tmp_path, client)
    yield servers
    servers.close_all()


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory, client: Client) -> Iterator[Servers]:
    """Starts real servers shared by this module's tests."""
    servers = Servers(tmp_path_factory.mktemp("logs"), client)
    yield servers
    servers.close_all()


@pytest.fixture(scope="session")
def coap_client() -> str:
    """libcoap's coap-client, an independent peer."""
    return libcoap_client()


@pytest.fixture(scope="session")
def system():
    """The booted Debian 13 with the package installed, shared by every system test."""
    yield from booted_system()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_package.py's steps change the shared system (the last one purges the package):
    they run after every other test, so the unit file's checks see it as installed."""
    items.sort(key=lambda item: item.path.name == "test_package.py")
