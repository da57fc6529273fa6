"""Connection manager: which connections a host holds, and the limits on them.

Pure bookkeeping, no I/O: the host asks `admit` before it keeps a connection (inbound or
outbound) and reports `add` / `remove`. A refused inbound connection is closed by the host; a
refused outbound one makes `connect` raise `ConnectionLimitExceeded`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from teia.errors import ConnectionLimitExceeded
from teia.identity import PeerId

__all__ = ["ConnectionLimits", "ConnectionManager", "Direction"]

C = TypeVar("C", bound=Hashable)


class Direction(Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Upper bounds a host enforces. Defaults suit a desktop peer; operator nodes raise them."""

    max_connections: int = 256
    """All connections, both directions."""
    max_inbound: int = 192
    """Connections peers opened to us; keeps room for our own dials."""
    max_per_peer: int = 2
    """Connections to one peer (two allow a simultaneous dial from both sides)."""

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_inbound, self.max_per_peer) < 1:
            raise ValueError("connection limits must be at least 1")


class ConnectionManager(Generic[C]):
    """Tracks connections by peer ID and direction, and enforces `ConnectionLimits`."""

    def __init__(self, limits: ConnectionLimits | None = None) -> None:
        self.limits = limits or ConnectionLimits()
        self._by_peer: dict[PeerId, list[C]] = {}
        self._direction: dict[C, tuple[PeerId, Direction]] = {}
        self._inbound = 0

    def __len__(self) -> int:
        return len(self._direction)

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._direction))

    def admit(self, peer_id: PeerId, direction: Direction) -> None:
        """Raise `ConnectionLimitExceeded` unless one more such connection fits."""
        limits = self.limits
        if len(self._direction) >= limits.max_connections:
            raise ConnectionLimitExceeded(
                f"already holding {limits.max_connections} connections (max_connections)"
            )
        if direction is Direction.INBOUND and self._inbound >= limits.max_inbound:
            raise ConnectionLimitExceeded(
                f"already holding {limits.max_inbound} inbound connections (max_inbound)"
            )
        if len(self._by_peer.get(peer_id, ())) >= limits.max_per_peer:
            raise ConnectionLimitExceeded(
                f"already holding {limits.max_per_peer} connections to this peer (max_per_peer)"
            )

    def add(self, peer_id: PeerId, direction: Direction, connection: C) -> None:
        """Admit and record ``connection`` in one step."""
        self.admit(peer_id, direction)
        self._by_peer.setdefault(peer_id, []).append(connection)
        self._direction[connection] = (peer_id, direction)
        if direction is Direction.INBOUND:
            self._inbound += 1

    def remove(self, connection: C) -> None:
        """Forget ``connection``; unknown ones are ignored (removal is idempotent)."""
        entry = self._direction.pop(connection, None)
        if entry is None:
            return
        peer_id, direction = entry
        if direction is Direction.INBOUND:
            self._inbound -= 1
        peers = self._by_peer[peer_id]
        peers.remove(connection)
        if not peers:
            del self._by_peer[peer_id]

    def connections_to(self, peer_id: PeerId) -> list[C]:
        """Connections to ``peer_id``, oldest first."""
        return list(self._by_peer.get(peer_id, ()))

    def peers(self) -> list[PeerId]:
        return list(self._by_peer)
