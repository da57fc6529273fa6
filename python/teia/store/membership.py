"""Which store nodes exist, and which of them hold an inbox.

Each inbox lives on the R store nodes whose Kademlia keys (``kad_key(peer ID bytes)``) are
closest to the inbox key by XOR (`responsible_nodes`). The inbox key is already a SHA-256
output (of the owner's public key), so it is used as it is.

`StoreMembership` is what the node and the replicated client ask for the current list of store
nodes. `StaticMembership` is a fixed list (from configuration, or set by tests) whose changes
are counted in `version`, so a node notices and runs anti-entropy. `DhtMembership` is the list
of store nodes met in the DHT: peers whose signed records advertise the store protocol.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc

from teia._native import kad_distance, kad_key
from teia.dht.records import SignedPeerRecord, unix_ms
from teia.identity import Multiaddr, PeerId
from teia.store.messages import PROTOCOL

if TYPE_CHECKING:
    from teia.dht.node import DhtNode

__all__ = [
    "DhtMembership",
    "StaticMembership",
    "StoreMembership",
    "StoreNodeInfo",
    "responsible_nodes",
]

_log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class _Checked:
    """What a peer's record said: a store node (``info``) or not (None), until ``until_ms``;
    asked again from ``recheck_ms`` on (half-way through a record's life: its owner re-publishes
    it before then, so a live node does not drop out between two checks)."""

    info: StoreNodeInfo | None
    until_ms: int
    recheck_ms: int


class DhtMembership:
    """The store nodes found in the DHT: peers whose signed records list ``protocol``.

    Store nodes are learned by looking: `nodes_for` looks up the DHT peers closest to an inbox key,
    `refresh` (run every ``refresh_interval`` by `run`) re-checks the routing table, a lookup
    of this node's own key and the known store nodes. Each peer's record is fetched with
    `DhtNode.get_record` and kept for the record's TTL, asked again half-way through (a peer
    whose record does not list the store is asked again after ``negative_ttl_s``, or when
    that record expires; one without a record, perhaps a node that joined and has yet to
    publish, after ``missing_ttl_s``, by default the same). A node whose record expired and
    was not renewed drops out, and `version` changes.

    Every participant orders the same way (`responsible_nodes` over `store_nodes`), so a
    client and the nodes agree on an inbox's holders once they have met the same store nodes.
    `nodes_for` looks up the DHT servers closest to the inbox key itself
    (`DhtNode.closest_peers`: the key is the Kademlia target, not hashed), so the store nodes
    around an inbox are met where placement puts its holders; the answer is the R store nodes
    XOR-closest to the inbox key among all those known (the lookup's and earlier ones).

    Bounds: at most ``max_peers`` peers remembered (least recently checked dropped first),
    ``concurrency`` record fetches at a time, each under ``record_timeout`` seconds, and every
    lookup under ``lookup_timeout`` seconds.
    """

    def __init__(
        self,
        dht: DhtNode,
        *,
        protocol: str = PROTOCOL,
        max_peers: int = 4096,
        concurrency: int = 8,
        record_timeout: float = 10.0,
        lookup_timeout: float = 30.0,
        negative_ttl_s: int = 300,
        missing_ttl_s: int | None = None,
        refresh_interval: float = 300.0,
        clock: Callable[[], int] = unix_ms,
    ) -> None:
        if max_peers < 1 or concurrency < 1:
            raise ValueError("max_peers and concurrency must be at least 1")
        self.dht = dht
        self.protocol = protocol
        self.max_peers = max_peers
        self.record_timeout = record_timeout
        self.lookup_timeout = lookup_timeout
        self.negative_ttl_s = negative_ttl_s
        self.missing_ttl_s = negative_ttl_s if missing_ttl_s is None else missing_ttl_s
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._checked: OrderedDict[PeerId, _Checked] = OrderedDict()
        self._nodes: tuple[StoreNodeInfo, ...] = ()
        self._serving = False
        self._version = 0

    @property
    def version(self) -> int:
        self._update_self()
        return self._version

    def store_nodes(self) -> Sequence[StoreNodeInfo]:
        self._update_self()
        return self._nodes

    async def nodes_for(self, inbox: bytes, replication: int) -> list[StoreNodeInfo]:
        """Look up the DHT servers closest to the point ``inbox`` and check which serve the
        store; then the ``replication`` store nodes closest to ``inbox``, closest first."""
        peers: list[PeerId] = []
        with anyio.move_on_after(self.lookup_timeout):
            peers = [peer for peer, _ in await self.dht.closest_peers(inbox)]
        await self.check(peers)
        return responsible_nodes(inbox, self.store_nodes(), replication)

    async def refresh(self) -> Sequence[StoreNodeInfo]:
        """Check the peers in the routing table and near this node, re-check known store nodes
        half-way through their records' lives, drop what expired. Returns the store nodes."""
        me = self.dht.host.peer_id
        peers = [peer for peer, _ in self.dht.routing_table()]
        with anyio.move_on_after(self.lookup_timeout):
            peers += [peer for peer, _ in await self.dht.get_closest_peers(me.to_bytes())]
        peers += [peer for peer, checked in self._checked.items() if checked.info is not None]
        await self.check(peers)
        return self.store_nodes()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """`refresh` now and every ``refresh_interval`` seconds, until cancelled."""
        await self.refresh()
        task_status.started()
        while True:
            await anyio.sleep(self.refresh_interval)
            await self.refresh()

    async def check(self, peers: Iterable[PeerId]) -> None:
        """Fetch the records of those ``peers`` not checked recently; update the list."""
        now = self._clock()
        me = self.dht.host.peer_id
        due: dict[PeerId, None] = {}
        for peer in peers:
            checked = self._checked.get(peer)
            if peer != me and (checked is None or checked.recheck_ms <= now):
                due[peer] = None
        async with anyio.create_task_group() as tg:
            for peer in list(due)[: self.max_peers]:
                tg.start_soon(self._check_one, peer)
        self._update()

    async def _check_one(self, peer: PeerId) -> None:
        signed: SignedPeerRecord | None = None
        async with self._limiter:
            with anyio.move_on_after(self.record_timeout):
                signed = await self.dht.get_record(peer)
        now = self._clock()
        record = signed.record if signed is not None else None
        if record is None or record.peer_id != peer or record.expires_at_ms <= now:
            previous = self._checked.get(peer)
            if previous is not None and previous.info is not None and previous.until_ms > now:
                # A record not found (lookups can miss): the one known holds until it expires.
                recheck = min(previous.until_ms, now + self.negative_ttl_s * 1000)
                checked = _Checked(previous.info, previous.until_ms, recheck)
            else:
                until = now + self.missing_ttl_s * 1000
                checked = _Checked(None, until, until)
        elif self.protocol in record.protocols:
            info = StoreNodeInfo(peer, tuple(a.without_peer_id() for a in record.addrs))
            expires = record.expires_at_ms
            checked = _Checked(info, expires, now + (expires - now) // 2)
        else:
            until = min(now + self.negative_ttl_s * 1000, record.expires_at_ms)
            checked = _Checked(None, until, until)
        self._checked[peer] = checked
        self._checked.move_to_end(peer)
        while len(self._checked) > self.max_peers:
            self._checked.popitem(last=False)

    def _update_self(self) -> None:
        if self._serving != (self.protocol in self.dht.host.protocols):
            self._update()

    def _update(self) -> None:
        now = self._clock()
        for peer in [p for p, c in self._checked.items() if c.until_ms <= now]:
            del self._checked[peer]
        nodes = [c.info for c in self._checked.values() if c.info is not None and c.until_ms > now]
        self._serving = self.protocol in self.dht.host.protocols
        if self._serving:
            host = self.dht.host
            nodes.append(StoreNodeInfo(host.peer_id, tuple(host.listen_addrs)))
        ordered = tuple(sorted(nodes, key=lambda node: node.peer_id.to_bytes()))
        if ordered != self._nodes:
            self._nodes = ordered
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
