"""Which store nodes exist, and which of them hold an inbox.

Each inbox lives on the R store nodes whose Kademlia keys (``kad_key(peer ID bytes)``) are
closest to the inbox key by XOR (`responsible_nodes`). The inbox key is already a SHA-256
output (of the owner's public key), so it is used as it is.

`StoreMembership` is what the node and the replicated client ask for the current list of store
nodes. `StaticMembership` is a fixed list (from configuration, or set by tests) whose changes
are counted in `version`, so a node notices and runs anti-entropy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from teia._native import kad_distance, kad_key
from teia.identity import Multiaddr, PeerId

__all__ = ["StaticMembership", "StoreMembership", "StoreNodeInfo", "responsible_nodes"]


@dataclass(frozen=True, slots=True)
class StoreNodeInfo:
    """A store node: its peer ID and where to dial it (multiaddrs without ``/p2p``)."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()

    @classmethod
    def from_multiaddr(cls, addr: Multiaddr | str) -> StoreNodeInfo:
        """From one ``…/quic-v1/p2p/<id>`` address; `ValueError` without ``/p2p``."""
        parsed = Multiaddr(addr) if isinstance(addr, str) else addr
        if parsed.peer_id is None:
            raise ValueError(f"{parsed} does not name the store node (…/p2p/<peer id>)")
        return cls(parsed.peer_id, (parsed.without_peer_id(),))


class StoreMembership(Protocol):
    """The current store nodes."""

    @property
    def version(self) -> int:
        """Changes whenever the list changes."""
        ...

    def store_nodes(self) -> Sequence[StoreNodeInfo]:
        """Every known store node (this node included, if it is one)."""
        ...


class StaticMembership:
    """A list of store nodes set by configuration or by hand."""

    def __init__(self, nodes: Iterable[StoreNodeInfo] = ()) -> None:
        self._nodes = _unique(nodes)
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def store_nodes(self) -> Sequence[StoreNodeInfo]:
        return self._nodes

    def set_nodes(self, nodes: Iterable[StoreNodeInfo]) -> None:
        """Replace the list (a node joined, left or died)."""
        self._nodes = _unique(nodes)
        self._version += 1


def _unique(nodes: Iterable[StoreNodeInfo]) -> tuple[StoreNodeInfo, ...]:
    seen: dict[PeerId, StoreNodeInfo] = {}
    for node in nodes:
        seen.setdefault(node.peer_id, node)
    return tuple(seen.values())


def node_key(peer_id: PeerId) -> bytes:
    """The Kademlia key of a store node."""
    return kad_key(peer_id.to_bytes())


def responsible_nodes(
    inbox: bytes, nodes: Sequence[StoreNodeInfo], replication: int
) -> list[StoreNodeInfo]:
    """The ``replication`` nodes closest to ``inbox`` by XOR, closest first."""
    return sorted(nodes, key=lambda node: kad_distance(node_key(node.peer_id), inbox))[:replication]
