"""Validators shared by the services' settings (``setting(..., check=...)``).

Each returns None when the value is fine, else the reason it is not.
"""

from __future__ import annotations

from typing import Any

from teia.errors import InvalidMultiaddr
from teia.identity import Multiaddr

__all__ = [
    "announce_address",
    "dht_node_address",
    "non_negative",
    "positive",
    "quic_listen_address",
]


def positive(value: Any) -> str | None:
    """A number above zero."""
    return None if value > 0 else "must be positive"


def non_negative(value: Any) -> str | None:
    """A number of zero or more."""
    return None if value >= 0 else "must not be negative"


def quic_listen_address(value: Any) -> str | None:
    """A QUIC-v1 listen multiaddr without ``/p2p``."""
    try:
        addr = Multiaddr(value)
    except InvalidMultiaddr as exc:
        return str(exc)
    if not addr.is_quic_v1 or addr.peer_id is not None:
        return "must be /ip4|ip6/<address>/udp/<port>/quic-v1"
    return None


def dht_node_address(value: Any) -> str | None:
    """A full QUIC-v1 address of a DHT node, ``…/udp/<port>/quic-v1/p2p/<peer-id>``."""
    try:
        addr = Multiaddr(value)
    except InvalidMultiaddr as exc:
        return str(exc)
    if not addr.is_quic_v1 or addr.peer_id is None:
        return "must be a full address …/udp/<port>/quic-v1/p2p/<peer-id> of a DHT node"
    return None


def announce_address(value: Any) -> str | None:
    """An address to announce for ourselves: any multiaddr without ``/p2p`` (we add ours)."""
    try:
        addr = Multiaddr(value)
    except InvalidMultiaddr as exc:
        return str(exc)
    return None if addr.peer_id is None else "must not carry /p2p (the node adds its own)"
