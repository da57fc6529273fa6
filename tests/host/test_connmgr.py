"""Connection manager bookkeeping and limits."""

from __future__ import annotations

import pytest

from teia.errors import ConnectionLimitExceeded
from teia.host.connmgr import ConnectionLimits, ConnectionManager, Direction
from teia.identity import Identity

A, B, C = (Identity.generate().peer_id for _ in range(3))


def test_tracks_by_peer_and_forgets_idempotently() -> None:
    manager: ConnectionManager[str] = ConnectionManager()
    manager.add(A, Direction.OUTBOUND, "a1")
    manager.add(A, Direction.INBOUND, "a2")
    manager.add(B, Direction.INBOUND, "b1")
    assert manager.connections_to(A) == ["a1", "a2"]
    assert set(manager.peers()) == {A, B}
    assert len(manager) == 3
    manager.remove("a1")
    manager.remove("a1")
    manager.remove("unknown")
    assert manager.connections_to(A) == ["a2"]
    manager.remove("a2")
    assert manager.connections_to(A) == []
    assert manager.peers() == [B]
    assert list(manager) == ["b1"]


def test_limits() -> None:
    limits = ConnectionLimits(max_connections=3, max_inbound=2, max_per_peer=1)
    manager: ConnectionManager[str] = ConnectionManager(limits)
    manager.add(A, Direction.INBOUND, "a")
    with pytest.raises(ConnectionLimitExceeded, match="max_per_peer"):
        manager.add(A, Direction.OUTBOUND, "a-again")
    manager.add(B, Direction.INBOUND, "b")
    with pytest.raises(ConnectionLimitExceeded, match="max_inbound"):
        manager.add(C, Direction.INBOUND, "c")
    manager.add(C, Direction.OUTBOUND, "c")
    with pytest.raises(ConnectionLimitExceeded, match="max_connections"):
        manager.admit(b"peer-d", Direction.OUTBOUND)
    manager.remove("b")
    manager.add(b"peer-d", Direction.INBOUND, "d")
    assert len(manager) == 3


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionLimits(max_per_peer=0)
