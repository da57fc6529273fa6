"""The DHT node's logic, sans-IO: routing-table upkeep, request handling, lookups.

No sockets and no clock: every call takes ``now_ms`` (milliseconds on any clock the caller
keeps), and whatever needs the network comes back as a value for the I/O layer to act on. The
async node (`teia.dht.node`) and the in-memory simulation (``tests/dht/test_simulation.py``)
drive the very same code.

- **Routing table** (`DhtCore.table`, the Rust ``KadRoutingTable``): `DhtCore.add_contact`
  inserts a peer seen alive; when its bucket is full the answer is a `PingRequest` for the
  bucket's oldest entry, which the I/O layer pings and reports with `DhtCore.ping_result`
  (a live oldest entry stays, a dead one makes room for the newcomer).
- **Requests** (`DhtCore.handle_request`): FIND_NODE, GET_VALUE, PUT_VALUE, GET_PROVIDERS,
  ADD_PROVIDER and PING. Answers carry the k closest peers to ``sha256(key)`` that the table
  holds, never the requester, with their addresses. Values are accepted only under a key
  namespace with a validator: ``/teia-peer/`` (signed peer records, `teia.dht.records`) and
  ``/teia-devices/`` (accounts' signed device lists, `teia.dht.devicelists`).
  Anything refused raises a typed error (`InvalidDhtMessage`, an `InvalidRecord` subclass, or
  `DhtQuotaExceeded`) and stores nothing; the I/O layer resets the stream.
- **Lookups** (`LookupDriver`, around the Rust ``KadLookup``): says which peer to ask with
  which request, takes answers and failures, keeps the best record a GET_VALUE lookup met,
  adds responders to the table and, when done, evicts the peers that did not answer (dead
  entries otherwise keep coming back in everybody's answers and slow every lookup down).
  `DhtCore.lookup` converges on ``sha256(key)``; `DhtCore.lookup_point` on a 32-byte point
  used as it is (an inbox key), asking with a key ground to hash near it (`point_request_key`).

Storage: the core keeps records and provider entries in memory (`MemoryRecordStore`, bounded),
so that request handling never blocks. A node that must survive restarts persists snapshots to
a `teia.dht.storage.DhtStore` from its I/O layer (`MemoryRecordStore.take_dirty` says what
changed) and reloads them at start (`DhtCore.restore_record` re-validates each one).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from teia import _native
from teia.dht.devicelists import DEVICE_LIST_KEY_PREFIX, DeviceListRecord
from teia.dht.messages import (
    DEFAULT_LIMITS,
    ConnectionType,
    Message,
    MessageLimits,
    MessageType,
    Peer,
    Record,
)
from teia.dht.records import (
    RECORD_KEY_PREFIX,
    DhtValue,
    SignedPeerRecord,
    check_replaces,
)
from teia.errors import (
    DhtQuotaExceeded,
    InvalidDhtMessage,
    InvalidPeerId,
    InvalidRecord,
    RecordKeyMismatch,
)
from teia.identity import Multiaddr, PeerId

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "DEFAULT_POINT_PREFIX_BITS",
    "MAX_POINT_PREFIX_BITS",
    "PROVIDER_TTL_MS",
    "DhtConfig",
    "DhtCore",
    "LookupDriver",
    "LookupResult",
    "MemoryRecordStore",
    "Mode",
    "PingRequest",
    "SendRequest",
    "Wait",
    "point_request_key",
]

DEFAULT_K: Final = 20
DEFAULT_ALPHA: Final = 3
PROVIDER_TTL_MS: Final = 24 * 60 * 60 * 1000
"""How long an ADD_PROVIDER announcement is kept (providers re-announce before that)."""
_VALUE_PREFIXES: Final = (RECORD_KEY_PREFIX, DEVICE_LIST_KEY_PREFIX)
"""Key namespaces the node holds values under (each has a validator in `validate_record`)."""
DEFAULT_POINT_PREFIX_BITS: Final = 16
"""Leading bits a point lookup's request key hashes to (see `point_request_key`): answers are
exact for networks of up to some 2^14 servers and close beyond; ~65k hashes per new point."""
MAX_POINT_PREFIX_BITS: Final = 24

RawPeer = tuple[bytes, list[bytes]]
"""A peer as the Rust core sees it: binary peer ID and binary multiaddrs."""


class Mode(enum.StrEnum):
    """Whether a node answers requests (a discovery node, a reachable peer) or only asks."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """Tunables of a DHT node (the defaults are libp2p's where libp2p has one)."""

    k: int = DEFAULT_K
    """Bucket size, peers per answer, peers a record is replicated to."""
    alpha: int = DEFAULT_ALPHA
    """Requests in flight per lookup."""
    request_timeout_ms: int = 10_000
    """How long a lookup waits for one answer before asking someone else."""
    max_lookup_requests: int = 200
    """Requests one lookup may send in total."""
    bucket_prefix_limit: int = 2
    """Table entries sharing one IP prefix (/24, /48) in one bucket."""
    table_prefix_limit: int = 10
    """Table entries sharing one IP prefix in the whole table."""
    prefix_limits_for_private: bool = False
    """Whether peers seen on loopback or private addresses count against the prefix limits
    (off: a lab or a LAN is one prefix by nature; public addresses always count)."""
    max_addrs: int = 16
    """Addresses kept per table entry."""
    max_records: int = 100_000
    max_provider_keys: int = 10_000
    max_providers_per_key: int = 20
    limits: MessageLimits = DEFAULT_LIMITS


@dataclass(frozen=True, slots=True)
class PingRequest:
    """Action for the I/O layer: ping ``peer_id``, then call `DhtCore.ping_result`.

    It is the oldest entry of a full bucket that a newcomer wants to join.
    """

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Lookup action: send ``request`` to ``peer_id`` (at ``addrs``), report the outcome."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    request: Message


@dataclass(frozen=True, slots=True)
class Wait:
    """Lookup action: nothing to send until an answer or failure arrives, or ``until_ms``."""

    until_ms: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What a finished lookup found."""

    key: bytes
    peers: list[tuple[PeerId, list[Multiaddr]]]
    """The closest peers that answered, closest first (at most k)."""
    record: DhtValue | None
    """GET_VALUE lookups: the best valid record any peer returned."""
    rounds: int
    """Longest chain of answers the lookup followed (1: only the seeds were asked)."""
    requests: int
    failures: int
    timeouts: int
    duration_ms: int


def _addrs_from_raw(raw: Iterable[bytes]) -> list[Multiaddr]:
    out = []
    for address in raw:
        try:
            out.append(Multiaddr.from_bytes(address))
        except ValueError:
            continue
    return out


def _prefix_ip(ip: str | None, count_private: bool) -> str | None:
    """The IP the prefix limits count a peer under; ``None`` exempts it."""
    if ip is None:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if not count_private and not address.is_global:
        return None
    return str(address)


# --- record store ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Provider:
    addrs: tuple[bytes, ...]
    expires_at_ms: int


class MemoryRecordStore:
    """Records by key and provider entries, bounded, in memory.

    Records are kept validated (`DhtValue`: peer records, device lists), so answering needs no
    signature check.
    `take_dirty` returns the keys changed since the last call, for snapshots to SQLite.
    """

    def __init__(
        self,
        *,
        max_records: int = 100_000,
        max_provider_keys: int = 10_000,
        max_providers_per_key: int = 20,
    ) -> None:
        self.max_records = max_records
        self.max_provider_keys = max_provider_keys
        self.max_providers_per_key = max_providers_per_key
        self._records: dict[bytes, DhtValue] = {}
        self._providers: dict[bytes, OrderedDict[bytes, _Provider]] = {}
        self._dirty: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: bytes, now_ms: int) -> DhtValue | None:
        """The record under ``key`` unless absent or expired at ``now_ms``."""
        record = self._records.get(key)
        if record is None or record.is_expired(now_ms):
            return None
        return record

    def put(self, key: bytes, record: DhtValue) -> bool:
        """Store a validated record if it beats the one held; returns whether it was stored.

        Raises `StaleRecord` (via `check_replaces`) for a lower or conflicting ``seq``, and
        `DhtQuotaExceeded` for a new key when full.
        """
        existing = self._records.get(key)
        if not check_replaces(existing, record):
            return False
        if existing is None and len(self._records) >= self.max_records:
            raise DhtQuotaExceeded(f"the node holds its limit of {self.max_records} records")
        self._records[key] = record
        self._dirty.add(key)
        return True

    def records(self, now_ms: int) -> list[DhtValue]:
        """Every unexpired record."""
        return [r for r in self._records.values() if not r.is_expired(now_ms)]

    def take_dirty(self) -> list[DhtValue]:
        """Records stored since the last call (still held), and forget that they were."""
        dirty = [self._records[k] for k in self._dirty if k in self._records]
        self._dirty.clear()
        return dirty

    def add_provider(
        self, key: bytes, provider: bytes, addrs: Sequence[bytes], now_ms: int
    ) -> None:
        """Note that ``provider`` provides ``key`` for `PROVIDER_TTL_MS`.

        Raises `DhtQuotaExceeded` when the key has its limit of providers, or too many keys
        have providers.
        """
        entries = self._providers.get(key)
        if entries is None:
            if len(self._providers) >= self.max_provider_keys:
                raise DhtQuotaExceeded(
                    f"the node holds providers for its limit of {self.max_provider_keys} keys"
                )
            entries = self._providers[key] = OrderedDict()
        if provider not in entries and len(entries) >= self.max_providers_per_key:
            raise DhtQuotaExceeded(f"the key already has {len(entries)} providers (the limit)")
        entries[provider] = _Provider(tuple(addrs), now_ms + PROVIDER_TTL_MS)
        entries.move_to_end(provider)

    def get_providers(self, key: bytes, now_ms: int) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """Unexpired providers of ``key``, the most recently announced first."""
        entries = self._providers.get(key)
        if entries is None:
            return []
        return [
            (provider, entry.addrs)
            for provider, entry in reversed(entries.items())
            if entry.expires_at_ms >= now_ms
        ]

    def purge_expired(self, now_ms: int) -> int:
        """Drop expired records and provider entries; returns how many went."""
        gone = [k for k, r in self._records.items() if r.is_expired(now_ms)]
        for key in gone:
            del self._records[key]
        count = len(gone)
        for key in list(self._providers):
            entries = self._providers[key]
            for provider in [p for p, e in entries.items() if e.expires_at_ms < now_ms]:
                del entries[provider]
                count += 1
            if not entries:
                del self._providers[key]
        return count


# --- the node core --------------------------------------------------------------------------


class DhtCore:
    """One DHT node's state and rules; see the module docstring."""

    def __init__(
        self,
        local: PeerId,
        *,
        mode: Mode = Mode.SERVER,
        config: DhtConfig | None = None,
        store: MemoryRecordStore | None = None,
    ) -> None:
        self.local = local
        self.local_bytes = local.to_bytes()
        self.mode = mode
        self.config = config or DhtConfig()
        self.store = store or MemoryRecordStore(
            max_records=self.config.max_records,
            max_provider_keys=self.config.max_provider_keys,
            max_providers_per_key=self.config.max_providers_per_key,
        )
        self.table = _native.KadRoutingTable(
            self.local_bytes,
            k=self.config.k,
            bucket_prefix_limit=self.config.bucket_prefix_limit,
            table_prefix_limit=self.config.table_prefix_limit,
            max_addrs=self.config.max_addrs,
        )
        self.local_addrs: list[bytes] = []
        """This node's own binary addresses, for answers about itself (set by the I/O layer)."""
        self._pending_newcomers: dict[bytes, int] = {}

    # --- routing table --------------------------------------------------------------------

    def add_contact(
        self,
        peer: PeerId,
        addrs: Iterable[Multiaddr | bytes],
        now_ms: int,
        *,
        ip: str | None = None,
    ) -> PingRequest | None:
        """``peer`` (a DHT server) was seen alive at ``addrs``; ``ip`` is the address it was
        observed on (not one it claims), for the prefix limits.

        Returns a `PingRequest` when its bucket is full and the oldest entry must be pinged.
        """
        return self._add_raw(peer.to_bytes(), _raw_addrs(addrs), now_ms, ip)

    def _add_raw(
        self, peer_id: bytes, addrs: list[bytes], now_ms: int, ip: str | None
    ) -> PingRequest | None:
        if peer_id == self.local_bytes:
            return None
        outcome, oldest = self.table.insert(
            peer_id,
            addrs,
            now_ms,
            _prefix_ip(ip, self.config.prefix_limits_for_private),
        )
        if outcome != "pending" or oldest is None:
            return None
        entry = self.table.get(oldest)
        try:
            oldest_id = PeerId.from_bytes(oldest)
        except InvalidPeerId:
            self.table.ping_failed(oldest)
            return None
        addrs_of_oldest = tuple(_addrs_from_raw(entry[0])) if entry is not None else ()
        return PingRequest(oldest_id, addrs_of_oldest)

    def ping_result(self, peer: PeerId, ok: bool, now_ms: int) -> None:
        """Report a `PingRequest`'s outcome: a live entry stays, a dead one is evicted."""
        if ok:
            self.table.ping_ok(peer.to_bytes(), now_ms)
        else:
            self.table.ping_failed(peer.to_bytes())

    def remove_contact(self, peer: PeerId) -> bool:
        """Drop ``peer`` from the table (it failed a request); a pending peer takes its slot."""
        peer_id = peer.to_bytes()
        if not self.table.contains(peer_id):
            return False
        self.table.ping_failed(peer_id)
        return True

    def closest(
        self, key: bytes, n: int | None = None, *, exclude: bytes | None = None
    ) -> list[RawPeer]:
        """The ``n`` (default k) table entries closest to ``sha256(key)``, without ``exclude``."""
        count = self.config.k if n is None else n
        found = self.table.closest(_native.kad_key(key), count + (exclude is not None))
        return [p for p in found if p[0] != exclude][:count]

    def closest_to_point(self, point: bytes, n: int | None = None) -> list[RawPeer]:
        """The ``n`` (default k) table entries whose Kademlia keys are closest to ``point``, a
        32-byte position in the key space used as it is (not hashed)."""
        _check_point(point)
        return self.table.closest(point, self.config.k if n is None else n)

    def refresh_keys(
        self,
        now_ms: int,
        max_age_ms: int,
        *,
        limit: int = 16,
        max_tries: int = 1 << 16,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> list[bytes]:
        """FIND_NODE keys whose lookups refresh the buckets idle for ``max_age_ms``.

        A request carries a key that the answering node hashes, so a bucket is refreshed by a
        key whose hash falls into it: random keys are drawn until one does (about 2^(d+1)
        draws for the bucket at shared-prefix depth d; deeper buckets than ``max_tries``
        allows are left to the self-lookup, which covers the closest buckets anyway).
        """
        local_key = int.from_bytes(_native.kad_key(self.local_bytes), "big")
        out: list[bytes] = []
        for target in self.table.refresh_targets(now_ms, max_age_ms):
            depth = 256 - (local_key ^ int.from_bytes(target, "big")).bit_length()
            if 2 ** (depth + 1) > max_tries:
                continue
            for _ in range(max_tries):
                candidate = random_bytes(32)
                hashed = int.from_bytes(_native.kad_key(candidate), "big")
                if 256 - (local_key ^ hashed).bit_length() == depth:
                    out.append(candidate)
                    break
            if len(out) >= limit:
                break
        return out

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        """The addresses the table holds for ``peer`` (empty if unknown)."""
        entry = self.table.get(peer.to_bytes())
        return [] if entry is None else _addrs_from_raw(entry[0])

    # --- requests -------------------------------------------------------------------------

    def handle_request_data(
        self, sender: PeerId, data: bytes, now_ms: int, *, sender_addrs: Sequence[Multiaddr] = ()
    ) -> bytes:
        """`handle_request` on the encoded message (without its length prefix)."""
        request = Message.decode(data, self.config.limits)
        return self.handle_request(sender, request, now_ms, sender_addrs=sender_addrs).encode(
            self.config.limits
        )

    def handle_request(
        self,
        sender: PeerId,
        request: Message,
        now_ms: int,
        *,
        sender_addrs: Sequence[Multiaddr] = (),
    ) -> Message:
        """The answer to ``sender``'s ``request``.

        Raises `InvalidDhtMessage` for a request that makes no sense (no key), an
        `InvalidRecord` subclass for a refused PUT_VALUE (its ``reason`` says why), and
        `DhtQuotaExceeded` when the store is full; nothing is stored then.
        """
        kind = request.type
        if kind is MessageType.PING:
            return Message(MessageType.PING)
        if not request.key:
            raise InvalidDhtMessage(f"a {kind.name} request needs a key")
        exclude = sender.to_bytes()
        if kind is MessageType.FIND_NODE:
            return Message(
                MessageType.FIND_NODE, key=request.key, closer_peers=self._closer(request, exclude)
            )
        if kind is MessageType.GET_VALUE:
            record = self._get_value(request.key, now_ms)
            return Message(
                MessageType.GET_VALUE,
                key=request.key,
                record=record,
                closer_peers=self._closer(request, exclude),
            )
        if kind is MessageType.PUT_VALUE:
            self.put_value(request, now_ms)
            return request
        if kind is MessageType.ADD_PROVIDER:
            self._add_provider(sender, request, now_ms, sender_addrs)
            return Message(MessageType.ADD_PROVIDER, key=request.key)
        # GET_PROVIDERS
        providers = tuple(
            Peer(provider, addrs[: self.config.limits.max_addrs])
            for provider, addrs in self.store.get_providers(request.key, now_ms)[
                : self.config.limits.max_peers
            ]
        )
        return Message(
            MessageType.GET_PROVIDERS,
            key=request.key,
            closer_peers=self._closer(request, exclude),
            provider_peers=providers,
        )

    def _closer(self, request: Message, exclude: bytes) -> tuple[Peer, ...]:
        limit = self.config.limits.max_addrs
        peers = [
            Peer(peer_id, tuple(addrs[:limit]), ConnectionType.NOT_CONNECTED)
            for peer_id, addrs in self.closest(request.key, exclude=exclude)
        ]
        if request.type is MessageType.FIND_NODE and request.key == self.local_bytes:
            # Asked about ourselves: we are the answer (as go-libp2p does).
            peers.insert(0, Peer(self.local_bytes, tuple(self.local_addrs[:limit])))
            peers = peers[: self.config.k]
        return tuple(peers)

    def _get_value(self, key: bytes, now_ms: int) -> Record | None:
        if not key.startswith(_VALUE_PREFIXES):
            return None
        record = self.store.get(key, now_ms)
        return None if record is None else Record(key=key, value=record.envelope)

    def validate_record(self, key: bytes, value: bytes, now_ms: int) -> DhtValue:
        """Check a value offered under ``key``; raises an `InvalidRecord` subclass."""
        if key.startswith(RECORD_KEY_PREFIX):
            return SignedPeerRecord.decode(value, now_ms=now_ms, key=key)
        if key.startswith(DEVICE_LIST_KEY_PREFIX):
            return DeviceListRecord.decode(value, now_ms=now_ms, key=key)
        raise RecordKeyMismatch(
            f"no validator for keys like {key[:16]!r}: only {RECORD_KEY_PREFIX!r} records "
            f"and {DEVICE_LIST_KEY_PREFIX!r} device lists"
        )

    def put_value(self, request: Message, now_ms: int) -> bool:
        """Validate and store a PUT_VALUE's record; returns whether it was new or newer.

        The record must be the one the message's key names; re-publishing the held record
        returns ``False``. Raises like `handle_request`.
        """
        record = request.record
        if record is None or not record.value:
            raise InvalidDhtMessage("a PUT_VALUE request needs a record with a value")
        if record.key != request.key:
            raise RecordKeyMismatch("the record's key is not the message's key")
        signed = self.validate_record(request.key, record.value, now_ms)
        return self.store.put(request.key, signed)

    def store_record(self, record: DhtValue, now_ms: int) -> bool:
        """Store a record this node made or fetched (re-validated, as from the network)."""
        signed = self.validate_record(record.key, record.envelope, now_ms)
        return self.store.put(record.key, signed)

    def restore_record(self, key: bytes, envelope: bytes, now_ms: int) -> bool:
        """Reload a record from a snapshot; a record that no longer passes is skipped."""
        try:
            signed = self.validate_record(key, envelope, now_ms)
            return self.store.put(key, signed)
        except (InvalidRecord, DhtQuotaExceeded):
            return False

    def _add_provider(
        self, sender: PeerId, request: Message, now_ms: int, sender_addrs: Sequence[Multiaddr]
    ) -> None:
        sender_bytes = sender.to_bytes()
        for peer in request.provider_peers:
            # Only the sender may announce itself: anything else would let one peer point
            # everybody at a victim.
            if peer.id != sender_bytes:
                continue
            addrs = list(peer.addrs) or [a.to_bytes() for a in sender_addrs]
            self.store.add_provider(
                request.key, sender_bytes, addrs[: self.config.limits.max_addrs], now_ms
            )

    # --- lookups --------------------------------------------------------------------------

    def lookup(
        self,
        key: bytes,
        now_ms: int,
        *,
        kind: MessageType = MessageType.FIND_NODE,
        seeds: Sequence[RawPeer] | None = None,
        quorum: int = 1,
    ) -> LookupDriver:
        """Start a lookup of the peers closest to ``sha256(key)``; drive it with its methods.

        ``kind`` is FIND_NODE (``key`` a binary peer ID or any key) or GET_VALUE (``key`` a
        record key; the lookup also collects the best record, and stops once ``quorum`` peers
        answered with a valid one, 0: never early).
        """
        return LookupDriver(self, key, now_ms, kind=kind, seeds=seeds, quorum=quorum)

    def lookup_point(self, point: bytes, request_key: bytes, now_ms: int) -> LookupDriver:
        """Start a FIND_NODE lookup of the peers closest to ``point`` itself (32 bytes, not
        hashed: an inbox key, a position chosen by an application).

        The wire protocol only carries keys that the answering node hashes, so the requests
        carry ``request_key``, whose hash shares a prefix with ``point``
        (`point_request_key`): answers then name the peers around ``point``, and the lookup
        keeps and asks the closest by XOR to ``point`` itself.
        """
        _check_point(point)
        return LookupDriver(
            self, request_key, now_ms, target=point, seeds=self.closest_to_point(point)
        )

    def purge_expired(self, now_ms: int) -> int:
        """Drop expired records and provider entries."""
        return self.store.purge_expired(now_ms)


def _check_point(point: bytes) -> None:
    if len(point) != 32:
        raise ValueError(f"a point in the key space is 32 bytes, not {len(point)}")


def point_request_key(
    point: bytes,
    prefix_bits: int = DEFAULT_POINT_PREFIX_BITS,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A 32-byte FIND_NODE key whose SHA-256 starts with the first ``prefix_bits`` bits of
    ``point``, so that nodes, which hash what they are asked, answer about ``point``'s
    neighbourhood.

    Keys are a random 24-byte stem and an 8-byte counter, drawn until one fits (about
    2^prefix_bits hashes): the key does not contain the point, so a node asked learns only
    that prefix of it, as it would from any lookup ending there. CPU-bound (tens of
    milliseconds at 16 bits): run it in a worker thread and reuse the key for the same point.
    Raises `ValueError` for a point that is not 32 bytes or bits outside 0..24.
    """
    _check_point(point)
    if not 0 <= prefix_bits <= MAX_POINT_PREFIX_BITS:
        raise ValueError(f"prefix_bits must be 0..{MAX_POINT_PREFIX_BITS}, not {prefix_bits}")
    whole, rest = divmod(prefix_bits, 8)
    head = point[:whole]
    mask = (0xFF00 >> rest) & 0xFF
    last = point[whole] & mask
    sha256 = hashlib.sha256
    while True:
        stem = random_bytes(24)
        for counter in range(1 << 32):
            candidate = stem + counter.to_bytes(8, "big")
            digest = sha256(candidate).digest()
            if digest[:whole] == head and digest[whole] & mask == last:
                return candidate


def _raw_addrs(addrs: Iterable[Multiaddr | bytes]) -> list[bytes]:
    return [a if isinstance(a, bytes) else a.without_peer_id().to_bytes() for a in addrs]


class LookupDriver:
    """One iterative lookup, driven by the I/O layer (or the simulation).

    Loop: `next_action` gives a `SendRequest` (send it, then report `on_response` or
    `on_failure`), a `Wait` (until an answer, a failure or the time), or ``None`` when done;
    then `finish` gives the `LookupResult` and evicts the table entries that never answered.
    """

    def __init__(
        self,
        core: DhtCore,
        key: bytes,
        now_ms: int,
        *,
        kind: MessageType = MessageType.FIND_NODE,
        seeds: Sequence[RawPeer] | None = None,
        quorum: int = 1,
        target: bytes | None = None,
    ) -> None:
        if kind not in (MessageType.FIND_NODE, MessageType.GET_VALUE):
            raise ValueError(f"lookups are FIND_NODE or GET_VALUE, not {kind.name}")
        self.core = core
        self.key = key
        """What the requests carry."""
        self.kind = kind
        self.target = _native.kad_key(key) if target is None else target
        """The position in the key space the lookup converges on (``sha256(key)`` unless
        given: see `DhtCore.lookup_point`)."""
        self.started_ms = now_ms
        config = core.config
        start = list(seeds) if seeds is not None else core.closest(key)
        self._lookup = _native.KadLookup(
            self.target,
            start,
            local_peer_id=core.local_bytes,
            k=config.k,
            alpha=config.alpha,
            request_timeout_ms=config.request_timeout_ms,
            max_requests=config.max_lookup_requests,
        )
        self._request = Message(kind, key=key)
        self._round: dict[bytes, int] = {peer_id: 1 for peer_id, _ in start}
        self._addrs: dict[bytes, list[bytes]] = {peer_id: list(a) for peer_id, a in start}
        self._rounds = 0
        self.record: DhtValue | None = None
        self.target_addrs: list[bytes] = []
        """FIND_NODE lookups of a peer ID: addresses answers gave for that very peer."""
        self.invalid_records = 0
        self.pings: list[PingRequest] = []
        """Ping actions produced by adding responders to the table (the I/O layer runs them)."""
        self._finished: LookupResult | None = None
        self.quorum = quorum
        """GET_VALUE: stop once this many peers answered with a valid record (0: never stop
        early). Records are signed and sequence-numbered, so one valid answer is usable; the
        newest among those seen is kept."""
        self._records_seen = 0

    @property
    def is_done(self) -> bool:
        return bool(self._lookup.is_done) or self._quorum_reached

    @property
    def _quorum_reached(self) -> bool:
        return self.quorum > 0 and self._records_seen >= self.quorum

    def next_action(self, now_ms: int) -> SendRequest | Wait | None:
        """What to do next; ``None`` when the lookup is over (call `finish`)."""
        if self._quorum_reached:
            return None
        while True:
            action, value = self._lookup.poll(now_ms)
            if action == "done":
                return None
            if action == "wait":
                assert isinstance(value, int)
                return Wait(value)
            assert isinstance(value, tuple)
            peer_id, addrs = value
            try:
                peer = PeerId.from_bytes(peer_id)
            except InvalidPeerId:
                self._lookup.on_failure(peer_id)
                continue
            self._rounds = max(self._rounds, self._round.get(peer_id, 1))
            return SendRequest(peer, tuple(_addrs_from_raw(addrs)), self._request)

    def on_response(
        self, peer: PeerId, response: Message, now_ms: int, *, ip: str | None = None
    ) -> bool:
        """``peer`` answered; returns whether the answer was used.

        An answer of another type or for another key counts as a failure; one without a key
        is taken (py-libp2p leaves it out of FIND_NODE answers, and a stream carries one
        request, so the answer can only be to it).
        """
        peer_id = peer.to_bytes()
        if response.type is not self.kind or response.key not in (b"", self.key):
            self._lookup.on_failure(peer_id)
            return False
        depth = self._round.get(peer_id, 1) + 1
        closer: list[RawPeer] = []
        for entry in response.closer_peers:
            closer.append((entry.id, list(entry.addrs)))
            if entry.id not in self._round:
                self._round[entry.id] = depth
                self._addrs[entry.id] = list(entry.addrs)
            if entry.id == self.key and entry.addrs and not self.target_addrs:
                self.target_addrs = list(entry.addrs)
        if not self._lookup.on_response(peer_id, closer):
            return False
        if self.kind is MessageType.GET_VALUE and response.record is not None:
            self._take_record(response.record, now_ms)
        addrs = self._known_addrs(peer_id)
        ping = self.core._add_raw(peer_id, addrs, now_ms, ip)
        if ping is not None:
            self.pings.append(ping)
        return True

    def _known_addrs(self, peer_id: bytes) -> list[bytes]:
        addrs = self._addrs.get(peer_id)
        if addrs:
            return addrs
        entry = self.core.table.get(peer_id)
        return [] if entry is None else list(entry[0])

    def _take_record(self, record: Record, now_ms: int) -> None:
        if record.key not in (b"", self.key):
            self.invalid_records += 1
            return
        try:
            signed = self.core.validate_record(self.key, record.value, now_ms)
        except InvalidRecord:
            self.invalid_records += 1
            return
        self._records_seen += 1
        if self.record is None or signed.seq > self.record.seq:
            self.record = signed

    def on_failure(self, peer: PeerId) -> None:
        """The request to ``peer`` failed (no connection, reset stream, bad answer)."""
        self._lookup.on_failure(peer.to_bytes())

    def finish(self, now_ms: int) -> LookupResult:
        """The result; evicts unresponsive peers from the table (call once, when done)."""
        if self._finished is not None:
            return self._finished
        for peer_id in self._lookup.unresponsive():
            self.core.table.ping_failed(peer_id)
        self.core.table.mark_refreshed(self.target, now_ms)
        peers = []
        for peer_id, addrs in self._lookup.results():
            try:
                peers.append((PeerId.from_bytes(peer_id), _addrs_from_raw(addrs)))
            except InvalidPeerId:
                continue
        stats = self._lookup.stats()
        self._finished = LookupResult(
            key=self.key,
            peers=peers,
            record=self.record,
            rounds=self._rounds,
            requests=int(stats.get("requests", 0)),
            failures=int(stats.get("failures", 0)),
            timeouts=int(stats.get("timeouts", 0)),
            duration_ms=now_ms - self.started_ms,
        )
        return self._finished

    @property
    def rounds(self) -> int:
        return self._rounds
