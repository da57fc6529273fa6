"""The store node: ``/teia/store/1.0.0`` served on a `Host`, over an `InboxStore`.

``async with StoreNode(host, store, membership=…) as node`` registers the protocol handler
and starts three tasks: the **writer**, which commits deposits in batches (each deposit is
answered only after the transaction holding it committed: durability before acknowledgement),
the **purger** of expired envelopes and tombstones, and **anti-entropy** (with a membership),
which reconciles inboxes with the other nodes responsible for them. `handle` is the
transport-free entry point the stream handler uses (tests and benchmarks call it directly).

Access rules: anyone may deposit (rate-limited per source peer, quota-bounded per inbox and
per node) and fetch bundles; fetch, ack, delete and bundle upload need the owner's signature
(`teia.store.auth`); the ``Sync*`` requests are served only to peers in the membership.
The node sees inbox hashes, message IDs, sizes and times, never a sender: envelopes are
sealed by the sender for the recipient. Nothing here logs payloads, keys or signatures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from teia.errors import (
    InvalidStoreMessage,
    MessageTooLarge,
    StoreAuthError,
    StoreDatabaseError,
    StoreError,
    StoreRequestRefused,
    TransportError,
)
from teia.host.host import Host
from teia.host.peerstore import CONNECTED_TTL
from teia.host.streams import NegotiatedStream
from teia.identity import PeerId
from teia.store.auth import OwnerAuthVerifier, OwnerRequest
from teia.store.client import StoreClient, wall_clock_ms
from teia.store.membership import StoreMembership, StoreNodeInfo, responsible_nodes
from teia.store.messages import (
    MAX_DEPOSIT_ENVELOPES,
    MAX_REQUEST_SIZE,
    MAX_SYNC_DIGESTS,
    MAX_SYNC_IDS,
    PROTOCOL,
    AckRequest,
    DeleteRequest,
    DepositRequest,
    Envelope,
    FetchRequest,
    GetBundleRequest,
    PutBundleRequest,
    Request,
    Response,
    Status,
    SyncDigestsRequest,
    SyncInboxRequest,
    SyncPushRequest,
    Tombstone,
    decode_request,
    encode_response,
)
from teia.store.ratelimit import RateLimiter
from teia.store.storage import InboxStore, StoredEnvelope

__all__ = ["AntiEntropyReport", "StoreNode", "StoreSettings"]

_log = logging.getLogger(__name__)

DAY_S: Final = 86_400
_FETCH_MAX_BYTES: Final = 1024 * 1024
_PUSH_MAX_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """A node's policy; the service fills it from configuration."""

    default_ttl_s: int = 14 * DAY_S
    min_ttl_s: int = 7 * DAY_S
    max_ttl_s: int = 14 * DAY_S
    """Requested TTLs are clamped into [min_ttl_s, max_ttl_s] (the operator's window)."""
    fetch_limit: int = 100
    """Page size when a fetch asks for 0."""
    batch_max: int = 1024
    """Envelopes committed per transaction at most."""
    queue_size: int = 1024
    """Deposit requests waiting for the writer before depositors wait too."""
    deposit_rate: float = 200.0
    deposit_burst: float = 2000.0
    """Envelopes per second (and burst) one source peer may deposit."""
    request_rate: float = 100.0
    request_burst: float = 500.0
    """Other requests per second (and burst) from one source peer."""
    replication: int = 3
    idle_timeout: float = 60.0
    """Seconds a stream may sit without a request."""
    purge_interval: float = 60.0
    anti_entropy_interval: float = 300.0
    """Seconds between anti-entropy rounds (also run when the membership changes)."""
    sync_timeout: float = 30.0


@dataclass(slots=True)
class AntiEntropyReport:
    """What one anti-entropy round did."""

    peers: int = 0
    failed_peers: int = 0
    inboxes_compared: int = 0
    inboxes_differing: int = 0
    envelopes_pushed: int = 0
    tombstones_learned: int = 0
    envelopes_handed_off: int = 0


@dataclass(slots=True)
class _DepositJob:
    envelopes: list[StoredEnvelope]
    done: anyio.Event = field(default_factory=anyio.Event)
    results: list[Status] = field(default_factory=list)
    error: StoreError | None = None


class _Metrics:
    def __init__(self, registry: CollectorRegistry, store: InboxStore) -> None:
        self.stored = Counter(
            "teia_store_envelopes_stored", "envelopes stored (deposits)", registry=registry
        )
        self.replicated = Counter(
            "teia_store_envelopes_replicated",
            "envelopes stored from other store nodes (anti-entropy)",
            registry=registry,
        )
        self.delivered = Counter(
            "teia_store_envelopes_delivered",
            "envelopes acknowledged by their recipient",
            registry=registry,
        )
        self.deleted = Counter(
            "teia_store_envelopes_deleted",
            "envelopes deleted unread, or by another node's tombstone",
            registry=registry,
        )
        self.expired = Counter(
            "teia_store_envelopes_expired",
            "envelopes purged at the end of their TTL",
            registry=registry,
        )
        self.fetched = Counter(
            "teia_store_envelopes_fetched", "envelopes handed out by fetch", registry=registry
        )
        self.stored_bytes = Counter(
            "teia_store_bytes_stored", "payload bytes stored (deposits)", registry=registry
        )
        self.refused = Counter(
            "teia_store_deposits_refused",
            "envelopes not stored, by reason",
            ["reason"],
            registry=registry,
        )
        self.requests = Counter(
            "teia_store_requests",
            "requests answered, by kind and status",
            ["kind", "status"],
            registry=registry,
        )
        self.batch = Histogram(
            "teia_store_batch_envelopes",
            "envelopes per committed batch",
            buckets=(1, 4, 16, 64, 256, 1024, 4096),
            registry=registry,
        )
        self.commit = Histogram(
            "teia_store_batch_seconds",
            "time to commit one batch",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        Gauge("teia_store_envelopes", "envelopes held", registry=registry).set_function(
            lambda: store.envelope_count
        )
        Gauge("teia_store_bytes", "payload bytes held", registry=registry).set_function(
            lambda: store.total_bytes
        )
        Gauge(
            "teia_store_inboxes", "inboxes with at least one envelope", registry=registry
        ).set_function(lambda: store.inbox_count)


_KINDS: Final[dict[type, str]] = {
    DepositRequest: "deposit",
    FetchRequest: "fetch",
    AckRequest: "ack",
    DeleteRequest: "delete",
    PutBundleRequest: "put_bundle",
    GetBundleRequest: "get_bundle",
    SyncDigestsRequest: "sync_digests",
    SyncInboxRequest: "sync_inbox",
    SyncPushRequest: "sync_push",
}


class StoreNode:
    """A store node on ``host``; see the module docstring."""

    def __init__(
        self,
        host: Host,
        store: InboxStore,
        *,
        membership: StoreMembership | None = None,
        settings: StoreSettings | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.membership = membership
        self.settings = settings or StoreSettings()
        self.clock = clock
        """Wall-clock milliseconds (tests pass a controllable one)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = _Metrics(self.registry, store)
        self.verifier = OwnerAuthVerifier(not_before_ms=clock())
        """Replaced when the node starts by one seeded with the nonces the database kept."""
        self.client = StoreClient(host, timeout=self.settings.sync_timeout, clock=clock)
        self._deposit_limiter = RateLimiter(self.settings.deposit_rate, self.settings.deposit_burst)
        self._request_limiter = RateLimiter(self.settings.request_rate, self.settings.request_burst)
        self._send: MemoryObjectSendStream[_DepositJob] | None = None
        self._receive: MemoryObjectReceiveStream[_DepositJob] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._sync_lock = anyio.Lock()
        self.last_report: AntiEntropyReport | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        now = self.clock()
        max_nonces = self.verifier.max_nonces
        kept = await anyio.to_thread.run_sync(self.store.nonces, now, max_nonces)
        self.verifier = OwnerAuthVerifier(
            # A database that kept every nonce needs no start-time bound: a request signed
            # before a restart passes once, its replays are refused.
            not_before_ms=0 if self.store.nonces_complete else now,
            max_nonces=max_nonces,
            remembered=kept,
        )
        self._send, self._receive = anyio.create_memory_object_stream[_DepositJob](
            self.settings.queue_size
        )
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._writer, self._receive)
        if self.settings.purge_interval > 0:
            self._task_group.start_soon(self._purge_loop)
        if self.membership is not None and self.settings.anti_entropy_interval > 0:
            self._task_group.start_soon(self._anti_entropy_loop)
        self.host.set_handler(PROTOCOL, self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self.host.remove_handler(PROTOCOL)
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, traceback)
        finally:
            if self._send is not None:
                self._send.close()
            with anyio.CancelScope(shield=True):
                await self.client.aclose()

    @property
    def peer_id(self) -> PeerId:
        return self.host.peer_id

    # --- serving ----------------------------------------------------------------------------

    async def _serve(self, stream: NegotiatedStream) -> None:
        peer = stream.remote_peer_id
        while True:
            data = None
            with anyio.move_on_after(self.settings.idle_timeout):
                try:
                    data = await stream.receive_message(MAX_REQUEST_SIZE)
                except anyio.EndOfStream:
                    return
                except MessageTooLarge as exc:
                    self.metrics.requests.labels("unknown", Status.TOO_LARGE.name).inc()
                    await stream.send_message(
                        encode_response(Response(Status.TOO_LARGE, f"{exc}; stream closed"))
                    )
                    return
            if data is None:
                return  # idle: the client opens a new stream when it needs one
            response = await self.handle_bytes(data, peer)
            await stream.send_message(encode_response(response))

    async def handle_bytes(self, data: bytes, peer: PeerId | None) -> Response:
        """Parse and answer one framed request from ``peer`` (None: a local caller)."""
        try:
            request = decode_request(data)
        except InvalidStoreMessage as exc:
            self.metrics.requests.labels("unknown", Status.BAD_REQUEST.name).inc()
            return Response(Status.BAD_REQUEST, str(exc))
        return await self.handle(request, peer)

    async def handle(self, request: Request, peer: PeerId | None) -> Response:
        """Answer one request from ``peer`` (None: a trusted local caller)."""
        kind = _KINDS[type(request)]
        try:
            response = await self._dispatch(request, peer)
        except StoreRequestRefused as exc:
            response = Response(Status(exc.status), str(exc))
        except StoreDatabaseError as exc:
            _log.error("store database error", extra={"teia_fields": {"error": str(exc)}})
            response = Response(Status.INTERNAL, "the node's storage failed; try another node")
        self.metrics.requests.labels(kind, response.status.name).inc()
        return response

    def _is_store_node(self, peer: PeerId | None) -> bool:
        if peer is None:
            return True
        if self.membership is None:
            return False
        return any(node.peer_id == peer for node in self.membership.store_nodes())

    def _limit(self, peer: PeerId | None, cost: float, *, deposit: bool) -> None:
        if peer is None or self._is_store_node(peer):
            return
        limiter = self._deposit_limiter if deposit else self._request_limiter
        if not limiter.take(peer, cost, anyio.current_time()):
            what = "deposits" if deposit else "requests"
            raise StoreRequestRefused(
                f"too many {what} from this peer (at most {limiter.rate:g}/s, bursts of "
                f"{limiter.burst:g}); slow down",
                Status.RATE_LIMITED,
            )

    async def _dispatch(self, request: Request, peer: PeerId | None) -> Response:
        match request:
            case DepositRequest(envelopes=envelopes):
                self._limit(peer, len(envelopes), deposit=True)
                return Response(results=tuple(await self.deposit(envelopes)))
            case GetBundleRequest(inbox=inbox):
                self._limit(peer, 1, deposit=False)
                taken = await anyio.to_thread.run_sync(self.store.take_bundle, inbox)
                if taken is None:
                    return Response(Status.NOT_FOUND, "no bundle for this inbox")
                bundle, prekey, remaining = taken
                return Response(bundle=bundle, one_time_prekey=prekey, remaining=remaining)
            case FetchRequest() | AckRequest() | DeleteRequest() | PutBundleRequest():
                self._limit(peer, 1, deposit=False)
                return await self._owner_operation(request)
            case SyncDigestsRequest() | SyncInboxRequest() | SyncPushRequest():
                if not self._is_store_node(peer):
                    raise StoreRequestRefused(
                        "sync requests are served to store nodes only", Status.FORBIDDEN
                    )
                return await self._sync_request(request)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _owner_operation(self, request: OwnerRequest) -> Response:
        now = self.clock()
        until = self.verifier.check(request, now)
        assert request.auth is not None  # the verifier refuses a request without one
        # Kept (committed) before the operation runs, so no restart can make it replayable.
        if not await anyio.to_thread.run_sync(
            self.store.remember_nonce, request.auth.nonce, until, now
        ):
            raise StoreAuthError("this signed operation was already used", Status.REPLAYED)
        match request:
            case FetchRequest():
                limit = request.limit or self.settings.fetch_limit
                try:
                    page = await anyio.to_thread.run_sync(
                        self.store.fetch,
                        request.inbox,
                        request.cursor,
                        limit,
                        _FETCH_MAX_BYTES,
                        now,
                    )
                except ValueError:
                    raise StoreRequestRefused(
                        "the cursor is not one this node handed out", Status.BAD_REQUEST
                    ) from None
                self.metrics.fetched.inc(len(page.envelopes))
                envelopes = tuple(
                    Envelope(
                        e.inbox,
                        e.message_id,
                        e.payload,
                        e.timestamp_ms,
                        max(1, (e.expires_at_ms - now) // 1000),
                        e.expires_at_ms,
                    )
                    for e in page.envelopes
                )
                return Response(envelopes=envelopes, cursor=page.cursor, more=page.more)
            case AckRequest() | DeleteRequest():
                expires = now + self.settings.max_ttl_s * 1000
                removed = await anyio.to_thread.run_sync(
                    self.store.remove, request.inbox, request.message_ids, expires
                )
                counter = (
                    self.metrics.delivered
                    if isinstance(request, AckRequest)
                    else self.metrics.deleted
                )
                counter.inc(removed)
                return Response(remaining=removed)
            case PutBundleRequest():
                held = await anyio.to_thread.run_sync(
                    lambda: self.store.put_bundle(
                        request.inbox,
                        request.bundle,
                        request.one_time_prekeys,
                        replace=request.replace,
                        now_ms=now,
                    )
                )
                return Response(remaining=held)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- deposits and the writer ------------------------------------------------------------

    def expiry_ms(self, ttl_s: int, now_ms: int) -> int:
        """When an envelope deposited now with ``ttl_s`` (0: default) expires."""
        s = self.settings
        ttl = s.default_ttl_s if ttl_s == 0 else min(max(ttl_s, s.min_ttl_s), s.max_ttl_s)
        return now_ms + ttl * 1000

    async def deposit(self, envelopes: Sequence[Envelope]) -> list[Status]:
        """Store envelopes through the writer; results once their batch committed."""
        now = self.clock()
        stored = [
            StoredEnvelope(
                e.inbox, e.message_id, e.payload, e.timestamp_ms, self.expiry_ms(e.ttl_s, now)
            )
            for e in envelopes
        ]
        results = await self._commit(stored)
        count = size = 0
        for env, result in zip(stored, results, strict=True):
            if result == Status.OK:
                count += 1
                size += len(env.payload)
            elif not result.stored:
                self.metrics.refused.labels(result.name.lower()).inc()
        if count:
            self.metrics.stored.inc(count)
            self.metrics.stored_bytes.inc(size)
        return results

    async def _commit(self, envelopes: list[StoredEnvelope]) -> list[Status]:
        if self._send is None:
            raise StoreRequestRefused("the node is not running", Status.BUSY)
        job = _DepositJob(envelopes)
        await self._send.send(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    async def _writer(self, receive: MemoryObjectReceiveStream[_DepositJob]) -> None:
        # Two stages: this task gathers deposits into batches while `_committer` commits the
        # previous batch in a worker thread (SQLite releases the GIL while it works).
        send_batch, receive_batch = anyio.create_memory_object_stream[list[_DepositJob]](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._committer, receive_batch)
            async with send_batch, receive:
                async for first in receive:
                    jobs = [first]
                    count = len(first.envelopes)
                    # Let the tasks that are ready to deposit run first (a checkpoint puts the
                    # writer behind them), so a batch gathers every deposit on its way rather
                    # than only the one that woke the writer.
                    for _ in range(8):
                        await anyio.lowlevel.checkpoint()
                        gathered = 0
                        while count < self.settings.batch_max:
                            try:
                                job = receive.receive_nowait()
                            except anyio.WouldBlock:
                                break
                            jobs.append(job)
                            count += len(job.envelopes)
                            gathered += 1
                        if not gathered or count >= self.settings.batch_max:
                            break
                    await send_batch.send(jobs)

    async def _committer(self, receive: MemoryObjectReceiveStream[list[_DepositJob]]) -> None:
        async with receive:
            async for jobs in receive:
                batch = [env for job in jobs for env in job.envelopes]
                started = anyio.current_time()
                try:
                    results = await anyio.to_thread.run_sync(self.store.deposit_batch, batch)
                except StoreDatabaseError as exc:
                    for job in jobs:
                        job.error = exc
                        job.done.set()
                    continue
                self.metrics.commit.observe(anyio.current_time() - started)
                self.metrics.batch.observe(len(batch))
                offset = 0
                for job in jobs:
                    job.results = results[offset : offset + len(job.envelopes)]
                    offset += len(job.envelopes)
                    job.done.set()

    # --- expiry -----------------------------------------------------------------------------

    async def purge_expired(self) -> tuple[int, int]:
        """Delete what expired by the node's clock; returns (envelopes, tombstones)."""
        now = self.clock()
        total_envelopes = total_tombstones = 0
        for _ in range(1000):
            envelopes, tombstones = await anyio.to_thread.run_sync(self.store.purge_expired, now)
            total_envelopes += envelopes
            total_tombstones += tombstones
            if envelopes < 10_000 and tombstones < 10_000:
                break
        self.metrics.expired.inc(total_envelopes)
        return total_envelopes, total_tombstones

    async def _purge_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.purge_interval)
            try:
                await self.purge_expired()
            except StoreDatabaseError as exc:
                _log.error("purge failed", extra={"teia_fields": {"error": str(exc)}})

    # --- anti-entropy: the answering side ---------------------------------------------------

    async def _sync_request(
        self, request: SyncDigestsRequest | SyncInboxRequest | SyncPushRequest
    ) -> Response:
        now = self.clock()
        match request:
            case SyncDigestsRequest(digests=digests):
                ours = await anyio.to_thread.run_sync(
                    self.store.digests, [inbox for inbox, _ in digests], now
                )
                differing = tuple(inbox for inbox, digest in digests if ours[inbox] != digest)
                return Response(inboxes=differing)
            case SyncInboxRequest(inbox=inbox, live_ids=live_ids, tombstones=tombstones):
                if tombstones:
                    removed = await anyio.to_thread.run_sync(
                        self.store.apply_tombstones, inbox, self._capped(tombstones, now)
                    )
                    self.metrics.deleted.inc(removed)
                live, tombs = await anyio.to_thread.run_sync(self.store.inbox_state, inbox, now)
                held = set(live)
                gone = {t.message_id: t for t in tombs}
                wanted = tuple(i for i in live_ids if i not in held and i not in gone)
                known_gone = tuple(gone[i] for i in live_ids if i in gone)
                return Response(message_ids=wanted, tombstones=known_gone)
            case SyncPushRequest(envelopes=envelopes):
                limit = now + self.settings.max_ttl_s * 1000
                stored = [
                    StoredEnvelope(
                        e.inbox,
                        e.message_id,
                        e.payload,
                        e.timestamp_ms,
                        min(e.expires_at_ms or limit, limit),
                    )
                    for e in envelopes
                ]
                results = await self._commit([e for e in stored if e.expires_at_ms > now])
                self.metrics.replicated.inc(sum(1 for r in results if r == Status.OK))
                return Response(results=tuple(results))
        raise AssertionError("unreachable")  # pragma: no cover

    def _capped(self, tombstones: Iterable[Tombstone], now: int) -> list[Tombstone]:
        limit = now + self.settings.max_ttl_s * 1000
        return [Tombstone(t.message_id, min(t.expires_at_ms, limit)) for t in tombstones]

    # --- anti-entropy: the asking side ------------------------------------------------------

    async def _anti_entropy_loop(self) -> None:
        assert self.membership is not None
        seen_version = self.membership.version
        waited = 0.0
        step = min(5.0, self.settings.anti_entropy_interval)
        while True:
            await anyio.sleep(step)
            waited += step
            version = self.membership.version
            if version == seen_version and waited < self.settings.anti_entropy_interval:
                continue
            seen_version, waited = version, 0.0
            try:
                await self.run_anti_entropy()
            except StoreDatabaseError as exc:
                _log.error("anti-entropy failed", extra={"teia_fields": {"error": str(exc)}})

    async def run_anti_entropy(self) -> AntiEntropyReport:
        """One round: with each other node responsible for an inbox this node holds, compare
        digests, exchange IDs and tombstones where they differ, push what the other lacks; then
        hand off (drop) inboxes this node is no longer responsible for once every responsible
        node confirmed the same state."""
        async with self._sync_lock:
            report = await self._anti_entropy_round()
        self.last_report = report
        _log.info(
            "anti-entropy round",
            extra={
                "teia_fields": {
                    "peers": report.peers,
                    "failed": report.failed_peers,
                    "differing": report.inboxes_differing,
                    "pushed": report.envelopes_pushed,
                    "handed_off": report.envelopes_handed_off,
                }
            },
        )
        return report

    async def _anti_entropy_round(self) -> AntiEntropyReport:
        assert self.membership is not None
        report = AntiEntropyReport()
        nodes = list(self.membership.store_nodes())
        me = self.host.peer_id
        replication = self.settings.replication
        inboxes = await anyio.to_thread.run_sync(self.store.inboxes)
        plan: dict[PeerId, list[bytes]] = {}
        infos = {node.peer_id: node for node in nodes}
        not_mine: dict[bytes, set[PeerId]] = {}
        for inbox in inboxes:
            holders = [n.peer_id for n in responsible_nodes(inbox, nodes, replication)]
            if me not in holders:
                not_mine[inbox] = set(holders)
            for peer in holders:
                if peer != me:
                    plan.setdefault(peer, []).append(inbox)
        confirmed: dict[bytes, set[PeerId]] = {}
        report.peers = len(plan)

        async def with_peer(peer: PeerId, peer_inboxes: list[bytes]) -> None:
            try:
                with anyio.fail_after(self.settings.sync_timeout * 4):
                    same = await self._sync_with(infos[peer], peer_inboxes, report)
            except (
                StoreError,
                TransportError,
                OSError,
                TimeoutError,
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ) as exc:
                report.failed_peers += 1
                self.client.forget(peer)
                _log.info(
                    "anti-entropy with a peer failed",
                    extra={
                        "teia_fields": {"peer": str(peer), "error": str(exc) or type(exc).__name__}
                    },
                )
                return
            for inbox in same:
                confirmed.setdefault(inbox, set()).add(peer)

        async with anyio.create_task_group() as tg:
            limiter = anyio.Semaphore(4)

            async def bounded(peer: PeerId, peer_inboxes: list[bytes]) -> None:
                async with limiter:
                    await with_peer(peer, peer_inboxes)

            for peer, peer_inboxes in plan.items():
                tg.start_soon(bounded, peer, peer_inboxes)

        now = self.clock()
        for inbox, needed in not_mine.items():
            if needed and confirmed.get(inbox, set()) >= needed:
                live, tombs = await anyio.to_thread.run_sync(self.store.inbox_state, inbox, now)
                report.envelopes_handed_off += await anyio.to_thread.run_sync(
                    self.store.forget, inbox, live, [t.message_id for t in tombs]
                )
        return report

    async def _connect(self, info: StoreNodeInfo) -> None:
        if self.host.is_connected(info.peer_id):
            return
        if info.addrs:
            self.host.peerstore.add(
                info.peer_id, info.addrs, ttl=CONNECTED_TTL, now=anyio.current_time()
            )
        await self.host.connect(info.peer_id)

    async def _sync_with(
        self, info: StoreNodeInfo, inboxes: list[bytes], report: AntiEntropyReport
    ) -> list[bytes]:
        """Reconcile ``inboxes`` with one peer; returns those already equal there."""
        peer = info.peer_id
        await self._connect(info)
        now = self.clock()
        digests = await anyio.to_thread.run_sync(self.store.digests, inboxes, now)
        differing: set[bytes] = set()
        items = list(digests.items())
        for start in range(0, len(items), MAX_SYNC_DIGESTS):
            chunk = tuple(items[start : start + MAX_SYNC_DIGESTS])
            response = await self._checked(peer, SyncDigestsRequest(chunk))
            differing.update(response.inboxes)
        report.inboxes_compared += len(items)
        report.inboxes_differing += len(differing)
        for inbox in differing:
            await self._reconcile_inbox(peer, inbox, report)
        return [inbox for inbox in inboxes if inbox not in differing]

    async def _checked(self, peer: PeerId, request: Request) -> Response:
        response = await self.client.exchange(peer, request)
        if response.status != Status.OK:
            raise StoreRequestRefused(
                f"store node {peer} refused sync: {response.error or response.status.name}",
                int(response.status),
            )
        return response

    async def _reconcile_inbox(self, peer: PeerId, inbox: bytes, report: AntiEntropyReport) -> None:
        now = self.clock()
        live, tombs = await anyio.to_thread.run_sync(self.store.inbox_state, inbox, now)
        wanted: list[bytes] = []
        theirs: list[Tombstone] = []
        chunks = max(1, -(-max(len(live), len(tombs)) // MAX_SYNC_IDS))
        for index in range(chunks):
            part = slice(index * MAX_SYNC_IDS, (index + 1) * MAX_SYNC_IDS)
            response = await self._checked(
                peer, SyncInboxRequest(inbox, tuple(live[part]), tuple(tombs[part]))
            )
            wanted.extend(response.message_ids)
            theirs.extend(response.tombstones)
        if theirs:
            removed = await anyio.to_thread.run_sync(
                self.store.apply_tombstones, inbox, self._capped(theirs, now)
            )
            self.metrics.deleted.inc(removed)
            report.tombstones_learned += len(theirs)
        gone = {t.message_id for t in theirs}
        wanted = [i for i in wanted if i not in gone]
        for start in range(0, len(wanted), MAX_DEPOSIT_ENVELOPES):
            envelopes = await anyio.to_thread.run_sync(
                self.store.get_envelopes, inbox, wanted[start : start + MAX_DEPOSIT_ENVELOPES]
            )
            await self._push(peer, envelopes, report)

    async def _push(
        self, peer: PeerId, envelopes: list[StoredEnvelope], report: AntiEntropyReport
    ) -> None:
        batch: list[Envelope] = []
        size = 0
        for env in envelopes:
            if batch and size + len(env.payload) > _PUSH_MAX_BYTES:
                await self._checked(peer, SyncPushRequest(tuple(batch)))
                report.envelopes_pushed += len(batch)
                batch, size = [], 0
            batch.append(
                Envelope(
                    env.inbox, env.message_id, env.payload, env.timestamp_ms, 0, env.expires_at_ms
                )
            )
            size += len(env.payload)
        if batch:
            await self._checked(peer, SyncPushRequest(tuple(batch)))
            report.envelopes_pushed += len(batch)
