"""Relay tests run on trio (anyio's pytest plugin); the aioice ones choose asyncio."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
