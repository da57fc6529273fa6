"""The address book: where each known peer can be dialed, with lifetimes and bounds.

Pure bookkeeping with explicit time (callers pass ``now`` in seconds on any monotonic clock).
Addresses come from three places, with different trust and lifetimes: ones the application
gave (`PERMANENT_TTL` unless told otherwise), ones that just worked for a dial (`CONNECTED_TTL`),
and ones a peer announced about itself through identify (`ANNOUNCED_TTL`). A later sighting of
the same address extends, never shortens, its lifetime.

Strangers choose what they announce, so everything is bounded: addresses per peer (the
longest-lived are kept) and peers overall (least recently updated evicted first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from teia.identity import Multiaddr, PeerId

__all__ = [
    "ANNOUNCED_TTL",
    "CONNECTED_TTL",
    "PERMANENT_TTL",
    "AddressBook",
]

PERMANENT_TTL = float("inf")
"""Addresses the application configured (bootstrap nodes, for example)."""
CONNECTED_TTL = 30 * 60.0
"""An address we connected to successfully."""
ANNOUNCED_TTL = 60 * 60.0
"""An address a peer announced for itself (identify); unverified until a dial succeeds."""


@dataclass(slots=True)
class _Entry:
    expires: float


class AddressBook:
    """Per-peer dialable addresses with expiry; bounded in peers and addresses per peer."""

    def __init__(self, *, max_peers: int = 10_000, max_addrs_per_peer: int = 16) -> None:
        if max_peers < 1 or max_addrs_per_peer < 1:
            raise ValueError("address book bounds must be at least 1")
        self.max_peers = max_peers
        self.max_addrs_per_peer = max_addrs_per_peer
        self._peers: OrderedDict[PeerId, dict[Multiaddr, _Entry]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def add(self, peer: PeerId, addrs: Iterable[Multiaddr], *, ttl: float, now: float) -> None:
        """Record ``addrs`` for ``peer`` (a ``/p2p/<id>`` suffix, if any, is dropped).

        Only dialable QUIC-v1 addresses are kept; an address with another peer's ``/p2p``
        suffix is ignored.
        """
        if ttl <= 0:
            return
        expires = now + ttl
        book = self._peers.get(peer)
        for addr in addrs:
            owner = addr.peer_id
            if owner is not None and owner != peer:
                continue
            bare = addr.without_peer_id()
            if not bare.is_quic_v1:
                continue
            if book is None:
                book = self._peers[peer] = {}
            entry = book.get(bare)
            if entry is None:
                book[bare] = _Entry(expires)
            elif entry.expires < expires:
                entry.expires = expires
        if book is None:
            return
        if len(book) > self.max_addrs_per_peer:
            keep = sorted(book.items(), key=lambda item: item[1].expires, reverse=True)
            book.clear()
            book.update(keep[: self.max_addrs_per_peer])
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def addrs(self, peer: PeerId, *, now: float) -> list[Multiaddr]:
        """Unexpired addresses of ``peer``, longest-lived first (expired ones are purged)."""
        book = self._peers.get(peer)
        if book is None:
            return []
        for addr in [a for a, entry in book.items() if entry.expires <= now]:
            del book[addr]
        if not book:
            del self._peers[peer]
            return []
        return [a for a, _ in sorted(book.items(), key=lambda item: -item[1].expires)]

    def remove(self, peer: PeerId, addr: Multiaddr | None = None) -> None:
        """Forget one address of ``peer``, or all of them."""
        book = self._peers.get(peer)
        if book is None:
            return
        if addr is not None:
            book.pop(addr.without_peer_id(), None)
        if addr is None or not book:
            del self._peers[peer]

    def peers(self) -> list[PeerId]:
        """Peers with at least one address recorded (possibly expired until next read)."""
        return list(self._peers)
