"""SQLite persistence for a DHT node: records, routing table and provider entries.

`DhtStore` is synchronous and thread-safe: the node calls it from worker threads
(``await anyio.to_thread.run_sync(store.put_record, …)``). One connection
(``check_same_thread=False``) is shared under a lock; the database runs in WAL mode with
``synchronous=NORMAL`` (a crash loses at most the last transactions, never consistency — the
network re-publishes what was lost). The file is created 0600, its directory 0700 if missing.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`)::

    records(key BLOB PRIMARY KEY, peer_id BLOB, seq INTEGER, expires_at_ms INTEGER, envelope BLOB)
    routing(peer_id BLOB PRIMARY KEY, addrs BLOB, last_seen_ms INTEGER)
    providers(key BLOB, provider BLOB, addrs BLOB, expires_at_ms INTEGER,
              PRIMARY KEY (key, provider))

``addrs`` columns hold binary multiaddrs, each prefixed with its length as an unsigned varint.
The store does not verify signatures (`teia.dht.records` does, before anything is stored); it
keeps the rules that concern what is kept: a record replaces another only with a higher
``seq``, and counts are bounded (`DhtQuotaExceeded` beyond). A value read back that does not
parse means the file was altered behind our back: `DhtStoreError`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from teia.errors import (
    DhtQuotaExceeded,
    DhtStoreError,
    InvalidMultiaddr,
    InvalidPeerId,
    InvalidVarint,
)
from teia.identity import Multiaddr, PeerId, varint
from teia.service import sqlite as service_sqlite

__all__ = [
    "DEFAULT_MAX_PROVIDERS_PER_KEY",
    "DEFAULT_MAX_RECORDS",
    "DEFAULT_MAX_ROUTING_ENTRIES",
    "SCHEMA_VERSION",
    "DhtStore",
    "ProviderEntry",
    "RoutingEntry",
    "StoredRecord",
]

SCHEMA_VERSION: Final = 1
DEFAULT_MAX_RECORDS: Final = 100_000
DEFAULT_MAX_PROVIDERS_PER_KEY: Final = 20
DEFAULT_MAX_ROUTING_ENTRIES: Final = 10_000
"""Far above a full table (256 buckets of k = 20 is 5,120, and real tables hold a few hundred)."""

_SCHEMA: Final = """
CREATE TABLE records (
    key BLOB PRIMARY KEY,
    peer_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    envelope BLOB NOT NULL
);
CREATE INDEX records_expiry ON records (expires_at_ms);
CREATE TABLE routing (
    peer_id BLOB PRIMARY KEY,
    addrs BLOB NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE providers (
    key BLOB NOT NULL,
    provider BLOB NOT NULL,
    addrs BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (key, provider)
);
CREATE INDEX providers_expiry ON providers (expires_at_ms);
"""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record row: the envelope is returned exactly as it was stored."""

    key: bytes
    peer_id: PeerId
    seq: int
    expires_at_ms: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class RoutingEntry:
    """One routing-table contact, as saved across restarts."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """A peer that announced (``ADD_PROVIDER``) it provides a key, until ``expires_at_ms``."""

    key: bytes
    provider: PeerId
    addrs: tuple[Multiaddr, ...]
    expires_at_ms: int


def _pack_addrs(addrs: Iterable[Multiaddr]) -> bytes:
    return b"".join(varint.encode(len(raw)) + raw for raw in (a.to_bytes() for a in addrs))


def _unpack_addrs(blob: bytes) -> tuple[Multiaddr, ...]:
    out = []
    offset = 0
    try:
        while offset < len(blob):
            length, offset = varint.decode(blob, offset)
            if length > len(blob) - offset:
                raise DhtStoreError("stored address list is truncated; the store is corrupt")
            out.append(Multiaddr.from_bytes(blob[offset : offset + length]))
            offset += length
    except (InvalidVarint, InvalidMultiaddr) as exc:
        raise DhtStoreError(f"stored address list does not parse ({exc}); corrupt") from None
    return tuple(out)


def _peer_id(raw: bytes) -> PeerId:
    try:
        return PeerId.from_bytes(raw)
    except InvalidPeerId as exc:
        raise DhtStoreError(
            f"stored peer ID does not parse ({exc}); the store is corrupt"
        ) from None


class DhtStore:
    """A DHT node's SQLite store. Use as a context manager, or call `close`.

    Raises `DhtStoreError` when the file is not a usable teia DHT store (corrupt, another
    database, a newer schema) or is closed, and `DhtQuotaExceeded` at a limit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_providers_per_key: int = DEFAULT_MAX_PROVIDERS_PER_KEY,
        max_routing_entries: int = DEFAULT_MAX_ROUTING_ENTRIES,
    ) -> None:
        """Open (creating if needed) the store at ``path``, a file inside the node's data dir."""
        self.path = Path(path)
        self.max_records = max_records
        self.max_providers_per_key = max_providers_per_key
        self.max_routing_entries = max_routing_entries
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._name = f"the DHT store {self.path}"
        connection = service_sqlite.open_private(self.path, DhtStoreError, "the DHT store")
        try:
            self._set_up(connection)
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise DhtStoreError(
                f"{self.path} is not a usable DHT store ({exc}); move it aside and restart: "
                "the node rebuilds its table and records from the network"
            ) from None
        except DhtStoreError:
            connection.close()
            raise
        self._connection = connection

    def _set_up(self, connection: sqlite3.Connection) -> None:
        service_sqlite.use_wal(connection)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            service_sqlite.check_integrity(connection, self.path, DhtStoreError)
            return
        if version > SCHEMA_VERSION:
            raise DhtStoreError(
                f"{self.path} has schema version {version}; this teia knows up to "
                f"{SCHEMA_VERSION}: upgrade teia"
            )
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version != 0 or tables:
            raise DhtStoreError(f"{self.path} is some other SQLite database, not a DHT store")
        service_sqlite.create_schema(connection, _SCHEMA, SCHEMA_VERSION)

    # --- plumbing -------------------------------------------------------------------------

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return service_sqlite.transaction(
            self._lock, lambda: self._connection, DhtStoreError, self._name
        )

    def close(self) -> None:
        """Close the database (idempotent); later calls raise `DhtStoreError`."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> DhtStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- records --------------------------------------------------------------------------

    def put_record(
        self, key: bytes, peer_id: PeerId, seq: int, expires_at_ms: int, envelope: bytes
    ) -> bool:
        """Store a (verified) record unless the one held under ``key`` has ``seq`` ≥ this one.

        Returns whether it was stored. Raises `DhtQuotaExceeded` for a new key when
        `max_records` are held (expired ones count until `purge_expired`).
        """
        with self._transaction() as db:
            row = db.execute("SELECT seq FROM records WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] >= seq:
                return False
            if row is None:
                (count,) = db.execute("SELECT count(*) FROM records").fetchone()
                if count >= self.max_records:
                    raise DhtQuotaExceeded(f"the store holds its limit of {count} records")
            db.execute(
                "INSERT OR REPLACE INTO records (key, peer_id, seq, expires_at_ms, envelope)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, peer_id.to_bytes(), seq, expires_at_ms, envelope),
            )
            return True

    def get_record(self, key: bytes, now_ms: int | None = None) -> StoredRecord | None:
        """The record under ``key``; ``None`` if absent (or, given ``now_ms``, expired)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT peer_id, seq, expires_at_ms, envelope FROM records WHERE key = ?", (key,)
            ).fetchone()
        if row is None or (now_ms is not None and row[2] < now_ms):
            return None
        return StoredRecord(key, _peer_id(row[0]), row[1], row[2], row[3])

    def iter_records(self, now_ms: int | None = None) -> list[StoredRecord]:
        """Every record (unexpired at ``now_ms`` if given), e.g. to re-publish or replicate."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT key, peer_id, seq, expires_at_ms, envelope FROM records"
                " WHERE expires_at_ms >= ? ORDER BY key",
                (-1 if now_ms is None else now_ms,),
            ).fetchall()
        return [StoredRecord(r[0], _peer_id(r[1]), r[2], r[3], r[4]) for r in rows]

    def count_records(self) -> int:
        """How many records are held (expired ones included until `purge_expired`)."""
        with self._transaction() as db:
            (count,) = db.execute("SELECT count(*) FROM records").fetchone()
        return int(count)

    def purge_expired(self, now_ms: int) -> int:
        """Delete records and provider entries that expired before ``now_ms``; return how many."""
        with self._transaction() as db:
            records = db.execute("DELETE FROM records WHERE expires_at_ms < ?", (now_ms,))
            providers = db.execute("DELETE FROM providers WHERE expires_at_ms < ?", (now_ms,))
            return records.rowcount + providers.rowcount

    # --- routing table --------------------------------------------------------------------

    def save_routing(self, entries: Iterable[RoutingEntry]) -> None:
        """Replace the saved routing table with ``entries`` (atomically)."""
        rows = [(e.peer_id.to_bytes(), _pack_addrs(e.addrs), e.last_seen_ms) for e in entries]
        if len(rows) > self.max_routing_entries:
            raise DhtQuotaExceeded(
                f"{len(rows)} routing entries; the store keeps at most {self.max_routing_entries}"
            )
        with self._transaction() as db:
            db.execute("DELETE FROM routing")
            db.executemany(
                "INSERT OR REPLACE INTO routing (peer_id, addrs, last_seen_ms) VALUES (?, ?, ?)",
                rows,
            )

    def load_routing(self) -> list[RoutingEntry]:
        """The saved routing table, most recently seen first."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT peer_id, addrs, last_seen_ms FROM routing"
                " ORDER BY last_seen_ms DESC, peer_id"
            ).fetchall()
        return [RoutingEntry(_peer_id(r[0]), _unpack_addrs(r[1]), r[2]) for r in rows]

    # --- providers ------------------------------------------------------------------------

    def add_provider(
        self, key: bytes, provider: PeerId, addrs: Sequence[Multiaddr], expires_at_ms: int
    ) -> None:
        """Record (or refresh) that ``provider`` provides ``key`` until ``expires_at_ms``.

        Raises `DhtQuotaExceeded` for a new provider when the key has `max_providers_per_key`.
        """
        provider_bytes = provider.to_bytes()
        with self._transaction() as db:
            known = db.execute(
                "SELECT 1 FROM providers WHERE key = ? AND provider = ?", (key, provider_bytes)
            ).fetchone()
            if known is None:
                (count,) = db.execute(
                    "SELECT count(*) FROM providers WHERE key = ?", (key,)
                ).fetchone()
                if count >= self.max_providers_per_key:
                    raise DhtQuotaExceeded(f"the key already has {count} providers (the limit)")
            db.execute(
                "INSERT OR REPLACE INTO providers (key, provider, addrs, expires_at_ms)"
                " VALUES (?, ?, ?, ?)",
                (key, provider_bytes, _pack_addrs(addrs), expires_at_ms),
            )

    def get_providers(self, key: bytes, now_ms: int, limit: int = 20) -> list[ProviderEntry]:
        """Up to ``limit`` unexpired providers of ``key``, the longest-lived first."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT provider, addrs, expires_at_ms FROM providers"
                " WHERE key = ? AND expires_at_ms >= ?"
                " ORDER BY expires_at_ms DESC, provider LIMIT ?",
                (key, now_ms, max(0, limit)),
            ).fetchall()
        return [ProviderEntry(key, _peer_id(r[0]), _unpack_addrs(r[1]), r[2]) for r in rows]
