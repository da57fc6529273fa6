"""The DHT node on a `teia.host.host.Host`: the I/O around the sans-IO `teia.dht.core`.

``async with DhtNode(host) as dht:`` serves ``/ipfs/kad/1.0.0`` (server mode), then
``await dht.bootstrap([...])`` joins through any live bootstrap node (a self-lookup, then a
lookup into every stale bucket), and the node keeps itself healthy in the background: stale
buckets refreshed, a self-lookup, expired records purged, its own record re-published before
half its TTL, stored records replicated to the k closest peers it knows, snapshots saved.

- `DhtNode.find_peer` → addresses of a peer (routing table, a held record, a GET_VALUE lookup
  for its signed record, then a FIND_NODE lookup).
- `DhtNode.publish_record` signs this peer's record and stores it on the k closest nodes.
- `DhtNode.get_closest_peers` → the k closest DHT servers to ``sha256(key)``;
  `DhtNode.closest_peers` → the k closest to a 32-byte point used as it is (an inbox key).

One request per stream on the client side (as libp2p implementations do, the server also
answers several on one stream); connections are the host's, shared with everything else.
Every peer learned from an answer gets its addresses into ``host.peerstore``. Bounds: a
timeout on every request and stream, at most `DhtTiming.max_inbound_per_peer` concurrent
inbound streams per peer and `DhtTiming.max_inbound` overall, message limits from
`teia.dht.messages`.

Persistence: the core keeps records in memory; with a `teia.dht.storage.DhtStore`, the node
loads the routing table and the records (re-validated) when it starts, and saves new records
and the table every `DhtTiming.persist_interval_s` and when it stops (through worker threads).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from teia.dht.core import (
    DEFAULT_POINT_PREFIX_BITS,
    DhtConfig,
    DhtCore,
    LookupDriver,
    LookupResult,
    Mode,
    PingRequest,
    SendRequest,
    point_request_key,
)
from teia.dht.messages import (
    KAD_PROTOCOL,
    Message,
    MessageType,
    Record,
    receive_message,
    send_message,
)
from teia.dht.records import (
    DEFAULT_TTL_S,
    DhtValue,
    PeerRecord,
    SignedPeerRecord,
    record_key,
    unix_ms,
)
from teia.dht.storage import DhtStore, RoutingEntry
from teia.errors import (
    DhtError,
    DhtQuotaExceeded,
    InvalidDhtMessage,
    InvalidRecord,
    StaleRecord,
    TeiaError,
)
from teia.host.host import Host
from teia.host.peerstore import ANNOUNCED_TTL
from teia.host.streams import NegotiatedStream
from teia.identity import Multiaddr, PeerId

__all__ = ["DhtMetrics", "DhtNode", "DhtTiming"]

_log = logging.getLogger(__name__)

_POINT_KEYS_KEPT = 1024

# What a failed request to a peer can raise: transport and protocol errors, a stream that
# ended, a timeout, a bad answer.
_REQUEST_ERRORS = (
    TeiaError,
    OSError,
    TimeoutError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


@dataclass(frozen=True, slots=True)
class DhtTiming:
    """Timeouts, intervals and inbound bounds of a node (seconds)."""

    request_timeout_s: float = 10.0
    """One request: connect, open a stream, send, read the answer."""
    lookup_timeout_s: float = 60.0
    """A whole lookup (each request has its own timeout as well)."""
    stream_idle_s: float = 10.0
    """An inbound stream that sends no request for this long is closed."""
    max_requests_per_stream: int = 32
    max_inbound_per_peer: int = 32
    """Concurrent inbound streams one peer may have; more are reset."""
    max_inbound: int = 512
    """Concurrent inbound streams overall."""
    maintenance_interval_s: float = 60.0
    """How often the background upkeep wakes (purge, republish, refresh when due)."""
    refresh_interval_s: float = 10 * 60.0
    """Self-lookup and refresh of buckets not looked into for this long."""
    max_refreshes: int = 16
    """Bucket refresh lookups per round."""
    replicate_interval_s: float = 60 * 60.0
    max_replications: int = 1000
    """Records re-sent per replication round."""
    persist_interval_s: float = 5 * 60.0
    failed_peer_backoff_s: float = 30.0
    """A peer whose request failed is not asked again by lookups for this long (a dead peer
    that others still name would otherwise cost every lookup a full request timeout)."""
    record_ttl_s: int = DEFAULT_TTL_S
    """TTL of this node's own record; it is re-published after half of it."""


@dataclass(slots=True)
class DhtMetrics:
    """Counters for the service's metrics (metadata only). Read them; the node writes them."""

    requests: Counter[str] = field(default_factory=Counter)
    """Inbound requests answered, by message type."""
    refused: Counter[str] = field(default_factory=Counter)
    """Inbound requests refused, by reason (``malformed``, ``bad-signature``, ``busy`` …)."""
    outbound_failures: int = 0
    lookups: int = 0
    lookups_empty: int = 0
    """Lookups that found no peer at all."""
    lookup_seconds_total: float = 0.0
    lookup_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    """The latest lookup durations."""
    records_published: int = 0
    on_lookup: Callable[[float, LookupResult], None] | None = None
    """Called after every lookup with its duration (a Prometheus histogram can observe it)."""


def _ip_of(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    try:
        return str(ipaddress.ip_address(address[0]))
    except ValueError:
        return None


class DhtNode:
    """A Kademlia DHT node on ``host``; see the module docstring."""

    def __init__(
        self,
        host: Host,
        *,
        mode: Mode = Mode.SERVER,
        config: DhtConfig | None = None,
        timing: DhtTiming | None = None,
        store: DhtStore | None = None,
        metrics: DhtMetrics | None = None,
        clock: Callable[[], int] = unix_ms,
    ) -> None:
        self.host = host
        self.core = DhtCore(host.peer_id, mode=mode, config=config)
        self.timing = timing or DhtTiming()
        self.store = store
        self.metrics = metrics or DhtMetrics()
        self._clock = clock
        self._own_record: SignedPeerRecord | None = None
        self._own_addrs: list[Multiaddr] | None = None
        self._own_protocols: list[str] | None = None
        self._inbound: Counter[PeerId] = Counter()
        self._inbound_total = 0
        self._identify_waiting: set[PeerId] = set()
        self._pinging: set[PeerId] = set()
        self._failed: OrderedDict[PeerId, float] = OrderedDict()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._last_refresh = -math.inf
        self._last_replicate = time.monotonic()
        self._last_persist = time.monotonic()
        self._point_keys: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self.core.mode

    async def __aenter__(self) -> Self:
        if self.store is not None:
            await self._restore()
        self.core.local_addrs = [a.without_peer_id().to_bytes() for a in self.host.addrs]
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self.mode is Mode.SERVER:
            self.host.set_handler(KAD_PROTOCOL, self._serve)
        self._task_group.start_soon(self._maintain)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self.host.remove_handler(KAD_PROTOCOL)
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, traceback)
        finally:
            self._task_group = None
            if self.store is not None:
                with anyio.CancelScope(shield=True):
                    await self.persist()

    # --- what the service reads -----------------------------------------------------------

    @property
    def routing_table_size(self) -> int:
        return len(self.core.table)

    @property
    def stored_records(self) -> int:
        return len(self.core.store)

    def routing_table(self) -> list[tuple[PeerId, list[Multiaddr]]]:
        """The table's entries (peer, addresses)."""
        out = []
        for peer_id, addrs, _ in self.core.table.entries():
            with contextlib.suppress(ValueError):
                out.append((PeerId.from_bytes(peer_id), _multiaddrs(addrs)))
        return out

    # --- joining and upkeep ---------------------------------------------------------------

    async def bootstrap(self, addrs: Sequence[Multiaddr | str]) -> int:
        """Join through the bootstrap nodes at ``addrs`` (``…/p2p/<id>``): connect to every one
        that answers, then a self-lookup and a refresh of every stale bucket.

        Returns how many bootstrap nodes were reached. Raises `DhtError` when none was and
        the routing table is empty (nothing to join through).
        """
        reached: list[PeerId] = []

        async def dial(target: Multiaddr) -> None:
            try:
                with anyio.fail_after(self.timing.request_timeout_s):
                    connection = await self.host.connect(target)
            except _REQUEST_ERRORS as exc:
                _log.info("bootstrap node %s unreachable: %s", target, exc)
                return
            peer = connection.remote_peer.peer_id
            reached.append(peer)
            # Configured nodes are exempt from the prefix limits (ip None).
            self._note_ping(self.core.add_contact(peer, [target], self._clock()))

        async with anyio.create_task_group() as tg:
            for item in addrs:
                tg.start_soon(dial, Multiaddr(item) if isinstance(item, str) else item)
        if not reached and len(self.core.table) == 0:
            raise DhtError(
                f"none of the {len(addrs)} bootstrap nodes answered; check the addresses "
                "and that they are running"
            )
        await self.refresh(force=True)
        return len(reached)

    async def refresh(self, *, force: bool = False) -> None:
        """A self-lookup, then a lookup into each bucket not refreshed for
        `DhtTiming.refresh_interval_s` (all of them when ``force``)."""
        self._last_refresh = time.monotonic()
        await self._lookup(self.host.peer_id.to_bytes(), MessageType.FIND_NODE)
        max_age = 0 if force else int(self.timing.refresh_interval_s * 1000)
        keys = self.core.refresh_keys(self._clock(), max_age, limit=self.timing.max_refreshes)
        limiter = anyio.Semaphore(4)

        async def refresh_one(key: bytes) -> None:
            async with limiter:
                await self._lookup(key, MessageType.FIND_NODE)

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(refresh_one, key)

    async def _maintain(self) -> None:
        while True:
            await anyio.sleep(self.timing.maintenance_interval_s)
            try:
                await self.maintain_once()
            except DhtError as exc:
                _log.warning("DHT upkeep failed: %s", exc)

    async def maintain_once(self) -> None:
        """One round of upkeep (the background task calls it every maintenance interval)."""
        now = self._clock()
        self.core.purge_expired(now)
        monotonic = time.monotonic()
        if (
            len(self.core.table)
            and monotonic - self._last_refresh >= self.timing.refresh_interval_s
        ):
            await self.refresh()
        own = self._own_record
        if own is not None and now - own.record.issued_at_ms >= own.record.ttl_s * 500:
            await self.publish_record(self._own_addrs, self._own_protocols)
        if monotonic - self._last_replicate >= self.timing.replicate_interval_s:
            self._last_replicate = monotonic
            await self.replicate()
        if (
            self.store is not None
            and monotonic - self._last_persist >= self.timing.persist_interval_s
        ):
            await self.persist()

    async def replicate(self) -> int:
        """Send every held record (up to `DhtTiming.max_replications`) to the k closest peers
        the table knows for its key; returns how many PUTs were accepted."""
        records = self.core.store.records(self._clock())[: self.timing.max_replications]
        accepted = 0
        for record in records:
            targets = [
                (PeerId.from_bytes(p), _multiaddrs(a)) for p, a in self.core.closest(record.key)
            ]
            accepted += await self._put_to(record, targets)
        return accepted

    # --- persistence ----------------------------------------------------------------------

    async def persist(self) -> None:
        """Save new records and the routing table to the store (no-op without one)."""
        store = self.store
        if store is None:
            return
        self._last_persist = time.monotonic()
        dirty = self.core.store.take_dirty()
        entries = [
            RoutingEntry(PeerId.from_bytes(p), tuple(_multiaddrs(a)), int(seen))
            for p, a, seen in self.core.table.entries()
        ]
        now = self._clock()

        def save() -> None:
            for record in dirty:
                with contextlib.suppress(DhtQuotaExceeded):
                    store.put_record(
                        record.key,
                        record.peer_id,
                        record.seq,
                        record.expires_at_ms,
                        record.envelope,
                    )
            store.save_routing(entries[: store.max_routing_entries])
            store.purge_expired(now)

        await anyio.to_thread.run_sync(save)

    async def _restore(self) -> None:
        store = self.store
        assert store is not None
        now = self._clock()
        records, entries = await anyio.to_thread.run_sync(
            lambda: (store.iter_records(now), store.load_routing())
        )
        for stored in records:
            self.core.restore_record(stored.key, stored.envelope, now)
        self.core.store.take_dirty()
        for entry in entries:
            self.core.add_contact(entry.peer_id, entry.addrs, entry.last_seen_ms)
            self.host.peerstore.add(
                entry.peer_id, entry.addrs, ttl=ANNOUNCED_TTL, now=anyio.current_time()
            )

    # --- the client side ------------------------------------------------------------------

    async def get_closest_peers(self, key: bytes) -> list[tuple[PeerId, list[Multiaddr]]]:
        """The k closest DHT servers to ``sha256(key)`` that answered, closest first."""
        result = await self._lookup(key, MessageType.FIND_NODE)
        return result.peers

    async def closest_peers(
        self, point: bytes, *, prefix_bits: int = DEFAULT_POINT_PREFIX_BITS
    ) -> list[tuple[PeerId, list[Multiaddr]]]:
        """The k closest DHT servers to ``point`` that answered, closest first: ``point`` is 32
        bytes used directly as the Kademlia target (an inbox key), not hashed.

        The requests carry a key whose hash shares ``prefix_bits`` leading bits with ``point``
        (`teia.dht.core.point_request_key`, found in a worker thread and remembered for the
        last 1,024 points). Raises `ValueError` for a point that is not 32 bytes.
        """
        cache_key = (bytes(point), prefix_bits)
        request_key = self._point_keys.get(cache_key)
        if request_key is None:
            request_key = await anyio.to_thread.run_sync(point_request_key, point, prefix_bits)
            self._point_keys[cache_key] = request_key
            while len(self._point_keys) > _POINT_KEYS_KEPT:
                self._point_keys.popitem(last=False)
        self._point_keys.move_to_end(cache_key)
        result = await self._drive(self.core.lookup_point(point, request_key, self._clock()))
        return result.peers

    async def find_peer(self, peer: PeerId) -> list[Multiaddr]:
        """Where ``peer`` can be reached; empty if the DHT does not know.

        Looks in the routing table, then in records held here, then asks the network for the
        peer's signed record (GET_VALUE lookup), then for the peer itself (FIND_NODE lookup).
        """
        if peer == self.host.peer_id:
            return [a.without_peer_id() for a in self.host.addrs]
        addrs = self.core.peer_addrs(peer)
        if addrs:
            return addrs
        key = record_key(peer)
        held = self.core.store.get(key, self._clock())
        if isinstance(held, SignedPeerRecord) and held.record.addrs:
            return self._learn(peer, list(held.record.addrs))
        found = await self.get_record(peer)
        if found is not None and found.record.addrs:
            return self._learn(peer, list(found.record.addrs))
        driver = self.core.lookup(peer.to_bytes(), self._clock())
        result = await self._drive(driver)
        for candidate, candidate_addrs in result.peers:
            if candidate == peer and candidate_addrs:
                return self._learn(peer, candidate_addrs)
        if driver.target_addrs:
            return self._learn(peer, _multiaddrs(driver.target_addrs))
        return []

    async def get_record(self, peer: PeerId) -> SignedPeerRecord | None:
        """The newest valid signed record of ``peer`` that a GET_VALUE lookup meets."""
        found = await self.get_value(record_key(peer))
        return found if isinstance(found, SignedPeerRecord) else None

    async def get_value(self, key: bytes, *, quorum: int = 1) -> DhtValue | None:
        """The newest valid value under ``key`` (a ``/teia-peer/`` or ``/teia-devices/`` key)
        among the first ``quorum`` peers to answer with one (0: every peer the lookup asks).

        What is found is also kept here, as if it had been put to this node.
        """
        driver = self.core.lookup(key, self._clock(), kind=MessageType.GET_VALUE, quorum=quorum)
        result = await self._drive(driver)
        if result.record is not None:
            with contextlib.suppress(InvalidRecord, DhtQuotaExceeded):
                self.core.store_record(result.record, self._clock())
        return result.record

    async def put_value(self, value: DhtValue) -> int:
        """Store a value (made here, or fetched) on the k closest nodes to its key; returns on
        how many it was stored. Validated first, as any node will: `InvalidRecord` if it is not
        acceptable."""
        with contextlib.suppress(DhtQuotaExceeded, StaleRecord):
            self.core.store_record(value, self._clock())
        closest = await self._lookup(value.key, MessageType.FIND_NODE)
        return await self._put_to(value, closest.peers)

    async def publish_record(
        self,
        addrs: Sequence[Multiaddr] | None = None,
        protocols: Sequence[str] | None = None,
    ) -> int:
        """Sign this peer's record (``addrs`` default to the host's, ``protocols`` to its
        handlers') and store it on the k closest nodes; returns on how many it was stored.

        It is re-published before half its TTL for as long as the node runs.
        """
        self._own_addrs = list(addrs) if addrs is not None else None
        self._own_protocols = list(protocols) if protocols is not None else None
        advertised = (
            self._own_addrs
            if self._own_addrs is not None
            else [a.without_peer_id() for a in self.host.addrs]
        )
        record = PeerRecord.create(
            self.host.peer_id,
            advertised,
            self._own_protocols if self._own_protocols is not None else self.host.protocols,
            issued_at_ms=self._clock(),
            ttl_s=self.timing.record_ttl_s,
        ).sign(self.host.identity)
        self._own_record = record
        with contextlib.suppress(DhtQuotaExceeded):
            self.core.store_record(record, self._clock())
        closest = await self._lookup(record.key, MessageType.FIND_NODE)
        stored = await self._put_to(record, closest.peers)
        self.metrics.records_published += 1
        return stored

    async def _put_to(
        self, record: DhtValue, peers: Sequence[tuple[PeerId, list[Multiaddr]]]
    ) -> int:
        request = Message(
            MessageType.PUT_VALUE,
            key=record.key,
            record=Record(key=record.key, value=record.envelope),
        )
        stored = 0

        async def put(peer: PeerId, addrs: list[Multiaddr]) -> None:
            nonlocal stored
            try:
                await self.request(peer, request, addrs)
                stored += 1
            except _REQUEST_ERRORS as exc:
                _log.debug("PUT_VALUE to %s failed: %s", peer, exc)

        async with anyio.create_task_group() as tg:
            for peer, addrs in peers:
                if peer != self.host.peer_id:
                    tg.start_soon(put, peer, addrs)
        return stored

    async def request(
        self, peer: PeerId, message: Message, addrs: Sequence[Multiaddr] = ()
    ) -> Message:
        """Send one request to ``peer`` on a new stream and read its answer.

        Raises what the transport raises, `TimeoutError`, or `InvalidDhtMessage` for an
        answer that does not parse or is not of the request's type.
        """
        limits = self.core.config.limits
        failed_at = self._failed.get(peer)
        if failed_at is not None:
            if anyio.current_time() - failed_at < self.timing.failed_peer_backoff_s:
                raise DhtError(f"{peer} failed a request moments ago; not asking again yet")
            del self._failed[peer]
        try:
            with anyio.fail_after(self.timing.request_timeout_s):
                if addrs:
                    self.host.peerstore.add(
                        peer, addrs, ttl=ANNOUNCED_TTL, now=anyio.current_time()
                    )
                try:
                    await self.host.connect(peer)
                except _REQUEST_ERRORS:
                    self._note_unreachable(peer)
                    raise
                stream = await self.host.open_stream(peer, KAD_PROTOCOL)
                try:
                    await send_message(stream, message, limits)
                    response = await receive_message(stream, limits)
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
        except TimeoutError:
            self.metrics.outbound_failures += 1
            self._note_unreachable(peer)
            raise
        except _REQUEST_ERRORS:
            self.metrics.outbound_failures += 1
            raise
        if response.type is not message.type:
            raise InvalidDhtMessage(
                f"asked {message.type.name}, the peer answered {response.type.name}"
            )
        return response

    def _note_unreachable(self, peer: PeerId) -> None:
        # Only dial failures and timeouts: a peer that reset one stream (busy) stays askable.
        self._failed[peer] = anyio.current_time()
        self._failed.move_to_end(peer)
        while len(self._failed) > 4096:
            self._failed.popitem(last=False)

    async def _lookup(self, key: bytes, kind: MessageType) -> LookupResult:
        return await self._drive(self.core.lookup(key, self._clock(), kind=kind))

    async def _drive(self, driver: LookupDriver) -> LookupResult:
        started = time.monotonic()
        send, receive = anyio.create_memory_object_stream[
            tuple[PeerId, Message | None, str | None]
        ](math.inf)

        async def query(action: SendRequest) -> None:
            response: Message | None = None
            ip: str | None = None
            try:
                response = await self.request(action.peer_id, action.request, action.addrs)
                connection = self.host.connections.connections_to(action.peer_id)
                ip = _ip_of(connection[0].remote_address) if connection else None
            except _REQUEST_ERRORS as exc:
                _log.debug("lookup request to %s failed: %s", action.peer_id, exc)
            send.send_nowait((action.peer_id, response, ip))

        with send, receive:
            async with anyio.create_task_group() as tg:
                with anyio.move_on_after(self.timing.lookup_timeout_s):
                    while True:
                        now = self._clock()
                        action = driver.next_action(now)
                        if action is None:
                            break
                        if isinstance(action, SendRequest):
                            tg.start_soon(query, action)
                            continue
                        with anyio.move_on_after(max(0, action.until_ms - now) / 1000):
                            peer, response, ip = await receive.receive()
                            self._deliver(driver, peer, response, ip)
                        # Take every answer already waiting before polling again.
                        while True:
                            try:
                                peer, response, ip = receive.receive_nowait()
                            except anyio.WouldBlock:
                                break
                            self._deliver(driver, peer, response, ip)
                tg.cancel_scope.cancel()
        result = driver.finish(self._clock())
        for ping in driver.pings:
            self._note_ping(ping)
        for peer, addrs in result.peers:
            self.host.peerstore.add(peer, addrs, ttl=ANNOUNCED_TTL, now=anyio.current_time())
        elapsed = time.monotonic() - started
        self.metrics.lookups += 1
        self.metrics.lookups_empty += not result.peers
        self.metrics.lookup_seconds_total += elapsed
        self.metrics.lookup_seconds.append(elapsed)
        if self.metrics.on_lookup is not None:
            self.metrics.on_lookup(elapsed, result)
        return result

    def _deliver(
        self,
        driver: LookupDriver,
        peer: PeerId,
        response: Message | None,
        ip: str | None,
    ) -> None:
        if response is None:
            driver.on_failure(peer)
        else:
            driver.on_response(peer, response, self._clock(), ip=ip)

    def _learn(self, peer: PeerId, addrs: list[Multiaddr]) -> list[Multiaddr]:
        self.host.peerstore.add(peer, addrs, ttl=ANNOUNCED_TTL, now=anyio.current_time())
        return addrs

    # --- pings of full buckets' oldest entries ------------------------------------------

    def _note_ping(self, ping: PingRequest | None) -> None:
        if ping is None or self._task_group is None or ping.peer_id in self._pinging:
            return
        if len(self._pinging) >= 64:
            return  # the bucket stays as it is; the newcomer may come back later
        self._pinging.add(ping.peer_id)
        self._task_group.start_soon(self._ping, ping)

    async def _ping(self, ping: PingRequest) -> None:
        try:
            try:
                await self.request(ping.peer_id, Message(MessageType.PING), ping.addrs)
                ok = True
            except _REQUEST_ERRORS:
                ok = False
            self.core.ping_result(ping.peer_id, ok, self._clock())
        finally:
            self._pinging.discard(ping.peer_id)

    # --- the server side ----------------------------------------------------------------

    async def _serve(self, stream: NegotiatedStream) -> None:
        peer = stream.remote_peer_id
        if peer is None:
            return
        if (
            self._inbound[peer] >= self.timing.max_inbound_per_peer
            or self._inbound_total >= self.timing.max_inbound
        ):
            self.metrics.refused["busy"] += 1
            stream.reset()
            return
        self._inbound[peer] += 1
        self._inbound_total += 1
        try:
            self._learn_requester(peer, stream)
            await self._serve_requests(peer, stream)
        finally:
            self._inbound_total -= 1
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    async def _serve_requests(self, peer: PeerId, stream: NegotiatedStream) -> None:
        limits = self.core.config.limits
        for _ in range(self.timing.max_requests_per_stream):
            try:
                with anyio.fail_after(self.timing.stream_idle_s):
                    request = await receive_message(stream, limits)
            except anyio.EndOfStream:
                return
            except (InvalidDhtMessage, anyio.IncompleteRead, TimeoutError) as exc:
                self._refuse(
                    stream, "malformed" if isinstance(exc, InvalidDhtMessage) else "timeout", exc
                )
                return
            try:
                response = self.core.handle_request(peer, request, self._clock())
            except InvalidRecord as exc:
                self._refuse(stream, exc.reason, exc)
                return
            except (InvalidDhtMessage, DhtQuotaExceeded) as exc:
                reason = "quota" if isinstance(exc, DhtQuotaExceeded) else "malformed"
                self._refuse(stream, reason, exc)
                return
            self.metrics.requests[request.type.name] += 1
            with anyio.fail_after(self.timing.request_timeout_s):
                await send_message(stream, response, limits)

    def _refuse(self, stream: NegotiatedStream, reason: str, exc: BaseException) -> None:
        self.metrics.refused[reason] += 1
        _log.info("refused a DHT request from %s (%s): %s", stream.remote_peer_id, reason, exc)
        stream.reset()

    def _learn_requester(self, peer: PeerId, stream: NegotiatedStream) -> None:
        """Add a requester that is itself a DHT server (as identify says) to the table."""
        info = self.host.peer_info(peer)
        if info is not None:
            self._add_if_server(peer, stream.remote_address)
            return
        if peer in self._identify_waiting or len(self._identify_waiting) >= 256:
            return
        if self._task_group is None:
            return
        self._identify_waiting.add(peer)
        self._task_group.start_soon(self._add_after_identify, peer, stream.remote_address)

    async def _add_after_identify(self, peer: PeerId, address: tuple[str, int] | None) -> None:
        try:
            with anyio.move_on_after(self.timing.request_timeout_s):
                await self.host.wait_identified(peer)
            self._add_if_server(peer, address)
        finally:
            self._identify_waiting.discard(peer)

    def _add_if_server(self, peer: PeerId, address: tuple[str, int] | None) -> None:
        info = self.host.peer_info(peer)
        if info is None or KAD_PROTOCOL not in info.protocols:
            return
        addrs = info.listen_multiaddrs
        if not addrs:
            return
        self._note_ping(self.core.add_contact(peer, addrs, self._clock(), ip=_ip_of(address)))


def _multiaddrs(raw: Sequence[bytes]) -> list[Multiaddr]:
    out = []
    for item in raw:
        with contextlib.suppress(ValueError):
            out.append(Multiaddr.from_bytes(item))
    return out
