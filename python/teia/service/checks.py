"""Validators shared by the services' settings (``setting(..., check=...)``).

Each returns None when the value is fine, else the reason it is not.
"""

from __future__ import annotations

from typing import Any

from teia.errors import InvalidMultiaddr
from teia.identity import Multiaddr

__all__ = ["non_negative", "positive", "quic_listen_address"]


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
