"""Peer tests: profiles with a fast KDF, peers on loopback, on trio unless a test says so."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from teia.identity.keystore import KdfParams
from teia.peer import Peer, PeerConfig, Profile

PASSPHRASE = "correct horse battery staple"
FAST_KDF = KdfParams(memory_kib=8, iterations=1)
LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"
TIMEOUT = 30


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def make_profile(directory: Path, **settings: Any) -> Path:
    """A new profile directory with test-friendly settings (quick retries, few prekeys)."""
    settings.setdefault("retry_interval", 0.2)
    settings.setdefault("one_time_prekeys", 8)
    Profile.create(directory, PASSPHRASE, kdf=FAST_KDF, config=PeerConfig(**settings)).close()
    return directory


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def online(directory: Path, *, port: int = 0) -> AsyncIterator[Peer]:
    listen = [f"/ip4/127.0.0.1/udp/{port}/quic-v1"]
    async with Peer.open(directory, passphrase=PASSPHRASE, listen=listen, dial_timeout=1.0) as peer:
        yield peer


async def introduce(a: Peer, b: Peer, name: str | None = None) -> None:
    """``a`` learns where ``b`` is (as a contact with its addresses)."""
    await a.add_contact(b.peer_id, name, [str(addr) for addr in b.addrs])
