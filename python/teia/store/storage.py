"""SQLite persistence for a store node: envelopes, tombstones, prekey bundles, quotas.

`InboxStore` is synchronous and thread-safe (one connection under a lock); the node calls it
from worker threads. It reads no clock: every call that depends on time takes ``now_ms``.
The database runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives
the process dying (not necessarily the machine losing power; replicas cover that). The file is
created 0600, its directory 0700 if missing.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`)::

    envelopes(seq INTEGER PRIMARY KEY, inbox, message_id, payload, timestamp_ms,
              expires_at_ms, UNIQUE (inbox, message_id))      -- seq orders an inbox (cursor)
    tombstones(inbox, message_id, expires_at_ms, PRIMARY KEY (inbox, message_id))
    bundles(inbox PRIMARY KEY, bundle, updated_ms)
    one_time_prekeys(id INTEGER PRIMARY KEY, inbox, prekey)
    auth_nonces(nonce PRIMARY KEY, expires_at_ms)            -- since version 2

Version 1 databases are upgraded in place (the nonce table is added).

Payloads are stored exactly as deposited: opaque, end-to-end encrypted bytes. Quotas are
kept from in-memory counters loaded at open and updated with each committed change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from teia.errors import StoreDatabaseError
from teia.identity import varint
from teia.service import sqlite as service_sqlite
from teia.store.messages import Status, Tombstone

__all__ = [
    "SCHEMA_VERSION",
    "FetchPage",
    "InboxStore",
    "StoreLimits",
    "StoredEnvelope",
    "decode_cursor",
    "encode_cursor",
    "summary_digest",
]

SCHEMA_VERSION: Final = 2

_SCHEMA: Final = """
CREATE TABLE envelopes (
    seq INTEGER PRIMARY KEY,
    inbox BLOB NOT NULL,
    message_id BLOB NOT NULL,
    payload BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    UNIQUE (inbox, message_id)
);
CREATE INDEX envelopes_inbox_seq ON envelopes (inbox, seq);
CREATE INDEX envelopes_expiry ON envelopes (expires_at_ms);
CREATE TABLE tombstones (
    inbox BLOB NOT NULL,
    message_id BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (inbox, message_id)
) WITHOUT ROWID;
CREATE INDEX tombstones_expiry ON tombstones (expires_at_ms);
CREATE TABLE bundles (
    inbox BLOB PRIMARY KEY,
    bundle BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE one_time_prekeys (
    id INTEGER PRIMARY KEY,
    inbox BLOB NOT NULL,
    prekey BLOB NOT NULL
);
CREATE INDEX one_time_prekeys_inbox ON one_time_prekeys (inbox, id);
"""

# Version 2: the nonces of accepted owner signatures, until they can no longer pass the time
# window, so that a restart keeps refusing replays (`teia.store.auth`).
_SCHEMA_2: Final = """
CREATE TABLE auth_nonces (
    nonce BLOB PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX auth_nonces_expiry ON auth_nonces (expires_at_ms);
"""


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What one node holds at most."""

    max_inbox_envelopes: int = 10_000
    max_inbox_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 8 * 1024 * 1024 * 1024
    """Payload bytes on this node (the disk quota; SQLite's overhead comes on top)."""
    max_one_time_prekeys: int = 200


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """An envelope as the node keeps it: an absolute expiry instead of a requested TTL."""

    inbox: bytes
    message_id: bytes
    payload: bytes
    timestamp_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class FetchPage:
    envelopes: list[StoredEnvelope]
    cursor: bytes
    """Pass back to continue after the last envelope returned."""
    more: bool


def encode_cursor(seq: int) -> bytes:
    return varint.encode(seq)


def decode_cursor(cursor: bytes) -> int:
    """The position a cursor names; `ValueError` (an `InvalidVarint`) if it is not one."""
    if not cursor:
        return 0
    seq, end = varint.decode(cursor)
    if end != len(cursor):
        raise ValueError("cursor has trailing bytes")
    return seq


class InboxStore:
    """A store node's SQLite database; use as a context manager, or call `close`."""

    def __init__(self, path: str | os.PathLike[str], *, limits: StoreLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or StoreLimits()
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._name = f"the store database {self.path}"
        connection = service_sqlite.open_private(
            self.path, StoreDatabaseError, "the store database"
        )
        try:
            self._set_up(connection)
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise StoreDatabaseError(
                f"{self.path} is not a usable store database ({exc}); move it aside and "
                "restart: replicas hold copies and anti-entropy refills this node"
            ) from None
        except StoreDatabaseError:
            connection.close()
            raise
        self._connection = connection
        self._next_nonce_purge_ms = 0
        self._usage: dict[bytes, list[int]] = {}
        self._total_bytes = 0
        self._total_envelopes = 0
        for inbox, count, size in connection.execute(
            "SELECT inbox, count(*), sum(length(payload)) FROM envelopes GROUP BY inbox"
        ):
            self._usage[inbox] = [count, size]
            self._total_envelopes += count
            self._total_bytes += size

    def _set_up(self, connection: sqlite3.Connection) -> None:
        service_sqlite.use_wal(connection)
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        self.nonces_complete = version == SCHEMA_VERSION
        """Whether the nonce table holds every nonce accepted before this open (False for a
        new database, or one upgraded from version 1: the node then refuses signatures from
        before its start, whose nonces it cannot know)."""
        if version in (1, SCHEMA_VERSION):
            service_sqlite.check_integrity(connection, self.path, StoreDatabaseError)
            if version == SCHEMA_VERSION:
                return
            service_sqlite.create_schema(connection, _SCHEMA_2, SCHEMA_VERSION)
            return
        if version > SCHEMA_VERSION:
            raise StoreDatabaseError(
                f"{self.path} has schema version {version}; this teia knows up to "
                f"{SCHEMA_VERSION}: upgrade teia"
            )
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if version != 0 or tables:
            raise StoreDatabaseError(f"{self.path} is some other SQLite database, not a store")
        service_sqlite.create_schema(connection, _SCHEMA + _SCHEMA_2, SCHEMA_VERSION)

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> InboxStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return service_sqlite.transaction(
            self._lock, lambda: self._connection, StoreDatabaseError, self._name
        )

    def _reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return service_sqlite.reading(
            self._lock, lambda: self._connection, StoreDatabaseError, self._name
        )

    # --- figures ----------------------------------------------------------------------------

    @property
    def envelope_count(self) -> int:
        """Envelopes held (expired ones count until purged)."""
        return self._total_envelopes

    @property
    def total_bytes(self) -> int:
        """Payload bytes held."""
        return self._total_bytes

    @property
    def inbox_count(self) -> int:
        """Inboxes with at least one envelope."""
        return len(self._usage)

    def usage(self, inbox: bytes) -> tuple[int, int]:
        """(envelopes, payload bytes) held for ``inbox``."""
        count, size = self._usage.get(inbox, (0, 0))
        return count, size

    # --- deposits ---------------------------------------------------------------------------

    def deposit_batch(self, envelopes: Sequence[StoredEnvelope]) -> list[Status]:
        """Store envelopes in one transaction; one result per envelope, in order.

        OK (stored), DUPLICATE (already held), GONE (acknowledged or deleted before: a
        tombstone stands), INBOX_FULL or STORE_FULL (nothing stored for that one). When this
        returns, the stored ones are committed.
        """
        results: list[Status] = []
        added: dict[bytes, list[int]] = {}
        added_bytes = 0
        with self._transaction() as db:
            for env in envelopes:
                if db.execute(
                    "SELECT 1 FROM tombstones WHERE inbox = ? AND message_id = ?",
                    (env.inbox, env.message_id),
                ).fetchone():
                    results.append(Status.GONE)
                    continue
                size = len(env.payload)
                count, used = self._usage.get(env.inbox, (0, 0))
                extra = added.get(env.inbox, (0, 0))
                if (
                    count + extra[0] + 1 > self.limits.max_inbox_envelopes
                    or used + extra[1] + size > self.limits.max_inbox_bytes
                ):
                    exists = db.execute(
                        "SELECT 1 FROM envelopes WHERE inbox = ? AND message_id = ?",
                        (env.inbox, env.message_id),
                    ).fetchone()
                    results.append(Status.DUPLICATE if exists else Status.INBOX_FULL)
                    continue
                if self._total_bytes + added_bytes + size > self.limits.max_total_bytes:
                    results.append(Status.STORE_FULL)
                    continue
                cursor = db.execute(
                    "INSERT OR IGNORE INTO envelopes (inbox, message_id, payload, timestamp_ms, "
                    "expires_at_ms) VALUES (?, ?, ?, ?, ?)",
                    (env.inbox, env.message_id, env.payload, env.timestamp_ms, env.expires_at_ms),
                )
                if cursor.rowcount == 0:
                    results.append(Status.DUPLICATE)
                    continue
                results.append(Status.OK)
                entry = added.setdefault(env.inbox, [0, 0])
                entry[0] += 1
                entry[1] += size
                added_bytes += size
        for inbox, (count, size) in added.items():
            self._add_usage(inbox, count, size)
        return results

    def _add_usage(self, inbox: bytes, count: int, size: int) -> None:
        entry = self._usage.setdefault(inbox, [0, 0])
        entry[0] += count
        entry[1] += size
        self._total_envelopes += count
        self._total_bytes += size
        if entry[0] <= 0:
            del self._usage[inbox]

    # --- reading ----------------------------------------------------------------------------

    def fetch(
        self, inbox: bytes, cursor: bytes, limit: int, max_bytes: int, now_ms: int
    ) -> FetchPage:
        """Up to ``limit`` unexpired envelopes after ``cursor``, oldest deposit first, within
        about ``max_bytes`` of payload (at least one when any is left)."""
        after = decode_cursor(cursor)
        with self._reading() as db:
            rows = db.execute(
                "SELECT seq, message_id, payload, timestamp_ms, expires_at_ms FROM envelopes "
                "WHERE inbox = ? AND seq > ? AND expires_at_ms > ? ORDER BY seq LIMIT ?",
                (inbox, after, now_ms, limit + 1),
            ).fetchall()
        out: list[StoredEnvelope] = []
        total = 0
        last = after
        more = len(rows) > limit
        for seq, message_id, payload, timestamp_ms, expires_at_ms in rows[:limit]:
            if out and total + len(payload) > max_bytes:
                more = True
                break
            out.append(StoredEnvelope(inbox, message_id, payload, timestamp_ms, expires_at_ms))
            total += len(payload)
            last = seq
        return FetchPage(out, encode_cursor(last) if last else b"", more)

    def get_envelopes(self, inbox: bytes, message_ids: Iterable[bytes]) -> list[StoredEnvelope]:
        """The held envelopes of ``inbox`` among ``message_ids`` (for anti-entropy pushes)."""
        out = []
        with self._reading() as db:
            for message_id in message_ids:
                row = db.execute(
                    "SELECT payload, timestamp_ms, expires_at_ms FROM envelopes "
                    "WHERE inbox = ? AND message_id = ?",
                    (inbox, message_id),
                ).fetchone()
                if row is not None:
                    out.append(StoredEnvelope(inbox, message_id, row[0], row[1], row[2]))
        return out

    # --- acknowledgements and deletions -----------------------------------------------------

    def remove(
        self, inbox: bytes, message_ids: Iterable[bytes], tombstone_expires_at_ms: int
    ) -> int:
        """Delete these envelopes and leave tombstones (also for IDs not held, so a replica's
        copy arriving later is refused). Returns how many envelopes were deleted."""
        return self.apply_tombstones(
            inbox, [Tombstone(m, tombstone_expires_at_ms) for m in message_ids], prefer_own=True
        )

    def apply_tombstones(
        self, inbox: bytes, tombstones: Iterable[Tombstone], *, prefer_own: bool = False
    ) -> int:
        """Record tombstones (from the owner or another node) and delete what they cover.

        A tombstone lasts until the envelope it covers would have expired, when that is known
        (``prefer_own``: the held envelope's expiry wins over the given one). Returns the
        number of envelopes deleted.
        """
        removed = 0
        freed = 0
        with self._transaction() as db:
            for tomb in tombstones:
                row = db.execute(
                    "DELETE FROM envelopes WHERE inbox = ? AND message_id = ? "
                    "RETURNING length(payload), expires_at_ms",
                    (inbox, tomb.message_id),
                ).fetchone()
                expires = tomb.expires_at_ms
                if row is not None:
                    removed += 1
                    freed += row[0]
                    if prefer_own:
                        expires = row[1]
                db.execute(
                    "INSERT INTO tombstones (inbox, message_id, expires_at_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (inbox, message_id) DO UPDATE SET expires_at_ms = "
                    "max(expires_at_ms, excluded.expires_at_ms)",
                    (inbox, tomb.message_id, expires),
                )
        if removed:
            self._add_usage(inbox, -removed, -freed)
        return removed

    def purge_expired(self, now_ms: int, *, limit: int = 10_000) -> tuple[int, int]:
        """Delete up to ``limit`` expired envelopes and tombstones, and every expired nonce;
        returns (envelopes, tombstones) deleted. Call again while it returns ``limit`` for
        either."""
        freed: dict[bytes, list[int]] = {}
        with self._transaction() as db:
            rows = db.execute(
                "DELETE FROM envelopes WHERE seq IN (SELECT seq FROM envelopes "
                "WHERE expires_at_ms <= ? LIMIT ?) RETURNING inbox, length(payload)",
                (now_ms, limit),
            ).fetchall()
            tombs = db.execute(
                "DELETE FROM tombstones WHERE (inbox, message_id) IN (SELECT inbox, "
                "message_id FROM tombstones WHERE expires_at_ms <= ? LIMIT ?)",
                (now_ms, limit),
            ).rowcount
            db.execute("DELETE FROM auth_nonces WHERE expires_at_ms < ?", (now_ms,))
        for inbox, size in rows:
            entry = freed.setdefault(inbox, [0, 0])
            entry[0] += 1
            entry[1] += size
        for inbox, (count, size) in freed.items():
            self._add_usage(inbox, -count, -size)
        return len(rows), tombs

    # --- nonces of owner signatures ---------------------------------------------------------

    def remember_nonce(self, nonce: bytes, expires_at_ms: int, now_ms: int) -> bool:
        """Keep ``nonce`` (of an accepted owner signature) until ``expires_at_ms``; False when
        it is already held and in force (a replay). Committed when this returns.

        Expired nonces are deleted on the way (at most once a second of ``now_ms``) and by
        `purge_expired`, so the table holds little more than the verifier's window allows.
        """
        with self._transaction() as db:
            if now_ms >= self._next_nonce_purge_ms:
                self._next_nonce_purge_ms = now_ms + 1000
                db.execute("DELETE FROM auth_nonces WHERE expires_at_ms < ?", (now_ms,))
            cursor = db.execute(
                "INSERT INTO auth_nonces (nonce, expires_at_ms) VALUES (?, ?) ON CONFLICT "
                "(nonce) DO UPDATE SET expires_at_ms = excluded.expires_at_ms "
                "WHERE auth_nonces.expires_at_ms < ?",
                (nonce, expires_at_ms, now_ms),
            )
            return cursor.rowcount == 1

    def nonces(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        """Up to ``limit`` nonces in force at ``now_ms`` with their expiry, latest first."""
        with self._reading() as db:
            return db.execute(
                "SELECT nonce, expires_at_ms FROM auth_nonces WHERE expires_at_ms >= ? "
                "ORDER BY expires_at_ms DESC LIMIT ?",
                (now_ms, limit),
            ).fetchall()

    @property
    def nonce_count(self) -> int:
        """Nonces held (expired ones count until purged)."""
        with self._reading() as db:
            count: int = db.execute("SELECT count(*) FROM auth_nonces").fetchone()[0]
            return count

    # --- anti-entropy -----------------------------------------------------------------------

    def inboxes(self) -> list[bytes]:
        """Every inbox with envelopes or tombstones."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT inbox FROM envelopes UNION SELECT inbox FROM tombstones"
            ).fetchall()
        return [row[0] for row in rows]

    def inbox_state(self, inbox: bytes, now_ms: int) -> tuple[list[bytes], list[Tombstone]]:
        """Sorted live message IDs and tombstones of one inbox."""
        with self._reading() as db:
            live = [
                row[0]
                for row in db.execute(
                    "SELECT message_id FROM envelopes WHERE inbox = ? AND expires_at_ms > ? "
                    "ORDER BY message_id",
                    (inbox, now_ms),
                )
            ]
            tombs = [
                Tombstone(row[0], row[1])
                for row in db.execute(
                    "SELECT message_id, expires_at_ms FROM tombstones WHERE inbox = ? "
                    "AND expires_at_ms > ? ORDER BY message_id",
                    (inbox, now_ms),
                )
            ]
        return live, tombs

    def digests(self, inboxes: Iterable[bytes], now_ms: int) -> dict[bytes, bytes]:
        """A digest per inbox of its live IDs and tombstones: equal digests, equal state."""
        out = {}
        for inbox in inboxes:
            live, tombs = self.inbox_state(inbox, now_ms)
            out[inbox] = summary_digest(live, [t.message_id for t in tombs])
        return out

    def forget(
        self, inbox: bytes, live_ids: Iterable[bytes], tombstone_ids: Iterable[bytes]
    ) -> int:
        """Drop these envelopes and tombstones without leaving tombstones: the inbox moved to
        other nodes that hold the same state (anti-entropy's hand-off). Returns envelopes
        dropped."""
        removed = 0
        freed = 0
        with self._transaction() as db:
            for message_id in live_ids:
                row = db.execute(
                    "DELETE FROM envelopes WHERE inbox = ? AND message_id = ? "
                    "RETURNING length(payload)",
                    (inbox, message_id),
                ).fetchone()
                if row is not None:
                    removed += 1
                    freed += row[0]
            db.executemany(
                "DELETE FROM tombstones WHERE inbox = ? AND message_id = ?",
                [(inbox, message_id) for message_id in tombstone_ids],
            )
        if removed:
            self._add_usage(inbox, -removed, -freed)
        return removed

    # --- prekey bundles ---------------------------------------------------------------------

    def put_bundle(
        self,
        inbox: bytes,
        bundle: bytes,
        one_time_prekeys: Sequence[bytes],
        *,
        replace: bool,
        now_ms: int,
    ) -> int:
        """Store the owner's bundle and add (or with ``replace``, set) one-time prekeys.

        Returns how many one-time prekeys are held afterwards; the oldest beyond the limit
        are dropped.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT INTO bundles (inbox, bundle, updated_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (inbox) DO UPDATE SET bundle = excluded.bundle, "
                "updated_ms = excluded.updated_ms",
                (inbox, bundle, now_ms),
            )
            if replace:
                db.execute("DELETE FROM one_time_prekeys WHERE inbox = ?", (inbox,))
            db.executemany(
                "INSERT INTO one_time_prekeys (inbox, prekey) VALUES (?, ?)",
                [(inbox, key) for key in one_time_prekeys],
            )
            held = db.execute(
                "SELECT count(*) FROM one_time_prekeys WHERE inbox = ?", (inbox,)
            ).fetchone()[0]
            excess = held - self.limits.max_one_time_prekeys
            if excess > 0:
                db.execute(
                    "DELETE FROM one_time_prekeys WHERE id IN (SELECT id FROM one_time_prekeys "
                    "WHERE inbox = ? ORDER BY id LIMIT ?)",
                    (inbox, excess),
                )
                held -= excess
        return int(held)

    def take_bundle(self, inbox: bytes) -> tuple[bytes, bytes, int] | None:
        """The bundle, one one-time prekey (b"" when none is left) removed as it is handed
        out, and how many remain; None without a bundle."""
        with self._transaction() as db:
            row = db.execute("SELECT bundle FROM bundles WHERE inbox = ?", (inbox,)).fetchone()
            if row is None:
                return None
            taken = db.execute(
                "DELETE FROM one_time_prekeys WHERE id = (SELECT id FROM one_time_prekeys "
                "WHERE inbox = ? ORDER BY id LIMIT 1) RETURNING prekey",
                (inbox,),
            ).fetchone()
            remaining = db.execute(
                "SELECT count(*) FROM one_time_prekeys WHERE inbox = ?", (inbox,)
            ).fetchone()[0]
        return row[0], (taken[0] if taken else b""), int(remaining)


def summary_digest(live_ids: Iterable[bytes], tombstone_ids: Iterable[bytes]) -> bytes:
    """SHA-256 over sorted live IDs (each after 0x00) then sorted tombstone IDs (after 0x01)."""
    h = hashlib.sha256()
    for message_id in sorted(live_ids):
        h.update(b"\x00" + message_id)
    for message_id in sorted(tombstone_ids):
        h.update(b"\x01" + message_id)
    return h.digest()
