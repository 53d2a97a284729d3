"""Fixtures shared by the contract tests of the HTTP clients (aiohttp, httpx)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.network_servers import ScriptedServer, scripted_servers


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """One scripted loopback HTTP server, stopped after the test."""
    with scripted_servers("s") as started:
        yield started["s"]
