"""Fixtures shared by the server test modules (each defines its own `server`)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def http(server):
    """An httpx client with the API key, for the module's `server`."""
    httpx = pytest.importorskip("httpx")
    from tests.entrypoints.test_openai_server import API_KEY

    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
