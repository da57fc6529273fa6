"""Homeserver storage: one repository (`HomeserverStore`) over two SQL backends.

`SqliteDatabase` is the embedded default (WAL, one file in the data directory);
`PostgresDatabase` is for operators who outgrow it (psycopg 3's synchronous API: psycopg's
async API and asyncpg are asyncio-only, and the service runs on trio). Both run every
transaction in a worker thread, off the event loop, on a small pool of connections; write
transactions are serialized in the process (one homeserver process per database).

The SQL is shared: written with ``?`` placeholders and a few type names that each dialect
fills in. The repository speaks in plain Python values (event dicts, tuples), never rows.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import anyio
import anyio.to_thread

from teia.errors import HomeserverDatabaseError, MatrixError

__all__ = [
    "Database",
    "HomeserverStore",
    "PostgresDatabase",
    "SqliteDatabase",
    "StoredEvent",
    "SyncRoom",
    "open_database",
]

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    displayname TEXT,
    created_ts {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    created_ts {bigint} NOT NULL
);
CREATE INDEX IF NOT EXISTS access_tokens_user ON access_tokens (user_id);
CREATE TABLE IF NOT EXISTS filters (
    filter_id {id_pk},
    user_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rooms (
    room_id TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    created_ts {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    stream {id_pk},
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    depth {bigint} NOT NULL,
    body TEXT NOT NULL,
    redacted_by TEXT,
    rel_type TEXT,
    rel_target TEXT,
    rel_key TEXT,
    txn_device TEXT,
    txn_id TEXT
);
CREATE INDEX IF NOT EXISTS events_room_stream ON events (room_id, stream);
CREATE UNIQUE INDEX IF NOT EXISTS events_txn ON events (sender, txn_device, txn_id)
    WHERE txn_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_relations ON events (rel_target) WHERE rel_target IS NOT NULL;
CREATE TABLE IF NOT EXISTS current_state (
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
);
CREATE TABLE IF NOT EXISTS memberships (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    stream {bigint} NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS memberships_user ON memberships (user_id);
CREATE TABLE IF NOT EXISTS extremities (
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    depth {bigint} NOT NULL,
    PRIMARY KEY (room_id, event_id)
);
CREATE TABLE IF NOT EXISTS receipts (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    event_id TEXT NOT NULL,
    ts {bigint} NOT NULL,
    stream {bigint} NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type)
);
CREATE INDEX IF NOT EXISTS receipts_stream ON receipts (stream);
CREATE TABLE IF NOT EXISTS media (
    media_id TEXT PRIMARY KEY,
    uploader TEXT NOT NULL,
    content_type TEXT NOT NULL,
    filename TEXT,
    data {blob} NOT NULL,
    created_ts {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    verify_key TEXT NOT NULL,
    valid_until_ts {bigint} NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
CREATE TABLE IF NOT EXISTS openid_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_ts {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS identity_accounts (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_ts {bigint} NOT NULL
);
CREATE INDEX IF NOT EXISTS identity_accounts_user ON identity_accounts (user_id);
CREATE TABLE IF NOT EXISTS identity_sessions (
    sid TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    send_attempt {bigint} NOT NULL,
    token_hash TEXT,
    expires_ts {bigint} NOT NULL,
    attempts_left INTEGER NOT NULL,
    validated_ts {bigint}
);
CREATE UNIQUE INDEX IF NOT EXISTS identity_sessions_secret
    ON identity_sessions (secret_hash, medium, address);
CREATE TABLE IF NOT EXISTS identity_bindings (
    medium TEXT NOT NULL,
    address TEXT NOT NULL,
    user_id TEXT NOT NULL,
    lookup_hash TEXT NOT NULL,
    bound_ts {bigint} NOT NULL,
    PRIMARY KEY (medium, address)
);
CREATE INDEX IF NOT EXISTS identity_bindings_hash ON identity_bindings (lookup_hash);
CREATE TABLE IF NOT EXISTS identity_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS room_aliases (
    alias TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL,
    created_ts {bigint} NOT NULL
);
CREATE INDEX IF NOT EXISTS room_aliases_room ON room_aliases (room_id);
CREATE TABLE IF NOT EXISTS room_directory (
    room_id TEXT PRIMARY KEY,
    added_ts {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    created_ts {bigint} NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    stream {bigint} NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
);
CREATE INDEX IF NOT EXISTS account_data_stream ON account_data (user_id, stream);
CREATE TABLE IF NOT EXISTS account_data_changes (
    stream {id_pk},
    user_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS e2e_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS e2e_one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);
CREATE TABLE IF NOT EXISTS e2e_fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm)
);
CREATE TABLE IF NOT EXISTS e2e_device_changes (
    stream {id_pk},
    user_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS to_device (
    stream {id_pk},
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS to_device_inbox ON to_device (user_id, device_id, stream);
CREATE TABLE IF NOT EXISTS to_device_txns (
    sender TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    created_ts {bigint} NOT NULL,
    PRIMARY KEY (sender, device_id, txn_id)
);
CREATE TABLE IF NOT EXISTS federation_txns (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    response TEXT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
"""


class Cursor(Protocol):
    """The part of a DB-API cursor the repository uses."""

    rowcount: int

    @property
    def description(self) -> Any: ...

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx:
    """One transaction: ``rows = tx.query(sql, params)`` with ``?`` placeholders."""

    def __init__(self, cursor: Cursor, placeholder: str) -> None:
        self._cursor = cursor
        self._placeholder = placeholder

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.execute(sql, tuple(params))
        if self._cursor.description is None:
            return []
        return [tuple(row) for row in self._cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.query(sql, params)
        return max(0, self._cursor.rowcount)


class Database:
    """A pool of connections and the worker threads that use them."""

    placeholder = "?"
    types: ClassVar[dict[str, str]] = {}

    def __init__(self, pool_size: int = 4) -> None:
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._all: list[Any] = []
        self._size = pool_size
        self._created = 0
        self._create_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(pool_size)
        self._closed = False

    # dialect hooks -------------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin(self, conn: Any, write: bool) -> Cursor:
        raise NotImplementedError

    def _commit(self, conn: Any) -> None:
        conn.commit()

    def _rollback(self, conn: Any) -> None:
        conn.rollback()

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        if self._closed:
            raise HomeserverDatabaseError("the homeserver database is closed")
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            with self._create_lock:
                try:
                    conn = self._connect()
                except self._errors() as exc:
                    raise HomeserverDatabaseError(f"cannot open the database: {exc}") from None
                self._all.append(conn)
        try:
            yield conn
        finally:
            self._pool.put(conn)

    def transact(self, fn: Callable[[Tx], T], *, write: bool) -> T:
        """Run ``fn`` in one transaction, in the calling thread; commit or roll back."""
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            with self._connection() as conn:
                cursor = self._begin(conn, write)
                try:
                    result = fn(Tx(cursor, self.placeholder))
                except BaseException:
                    self._rollback(conn)
                    raise
                self._commit(conn)
                return result
        finally:
            if lock is not None:
                lock.release()

    async def run(self, fn: Callable[[Tx], T], *, write: bool = False) -> T:
        """Run ``fn`` in one transaction in a worker thread."""
        return await anyio.to_thread.run_sync(
            lambda: self.transact(fn, write=write), limiter=self._limiter
        )

    def migrate(self) -> None:
        """Create the tables (idempotent); refuse a database of another schema version."""

        def create(tx: Tx) -> None:
            for statement in _SCHEMA.format(**self.types).split(";"):
                if statement.strip():
                    tx.query(statement)
            row = tx.one("SELECT version FROM schema_version")
            if row is None:
                tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise HomeserverDatabaseError(
                    f"database schema version {row[0]}, this teia knows {SCHEMA_VERSION}"
                )

        try:
            self.transact(create, write=True)
        except self._errors() as exc:
            raise HomeserverDatabaseError(f"cannot prepare the database: {exc}") from None

    def close(self) -> None:
        self._closed = True
        for conn in self._all:
            with contextlib.suppress(Exception):  # closing what may already be broken
                conn.close()
        self._all.clear()


class SqliteDatabase(Database):
    """SQLite in WAL mode: the embedded default."""

    types: ClassVar[dict[str, str]] = {
        "id_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "bigint": "INTEGER",
        "blob": "BLOB",
    }

    def __init__(self, path: Path, pool_size: int = 4) -> None:
        super().__init__(pool_size)
        self.path = path

    def _connect(self) -> Any:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _begin(self, conn: Any, write: bool) -> Cursor:
        cursor = conn.cursor()
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return cursor  # type: ignore[no-any-return]

    def _commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


class PostgresDatabase(Database):
    """PostgreSQL through psycopg 3 (synchronous connections in worker threads)."""

    placeholder = "%s"
    types: ClassVar[dict[str, str]] = {
        "id_pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "bigint": "BIGINT",
        "blob": "BYTEA",
    }

    def __init__(self, dsn: str, pool_size: int = 4) -> None:
        super().__init__(pool_size)
        self.dsn = dsn

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=False)

    def _begin(self, conn: Any, write: bool) -> Cursor:
        return conn.cursor()  # type: ignore[no-any-return]

    def _errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)


def open_database(database: str, data_dir: Path) -> Database:
    """``sqlite`` (a file in ``data_dir``) or a ``postgresql://`` URI; tables created."""
    db: Database
    if database in ("", "sqlite"):
        data_dir.mkdir(parents=True, exist_ok=True)
        db = SqliteDatabase(data_dir / "homeserver.db")
    elif database.startswith(("postgresql://", "postgres://")):
        db = PostgresDatabase(database)
    else:
        raise HomeserverDatabaseError(
            "database must be 'sqlite' or a postgresql:// URI (libpq connection string)"
        )
    db.migrate()
    return db


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: its position in the server's stream, and the transaction that sent
    it (for the sender's own device)."""

    stream: int
    event: dict[str, Any]
    txn_device: str | None = None
    txn_id: str | None = None


_EVENT_COLUMNS = "stream, body, txn_device, txn_id"


def _stored(row: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(int(row[0]), json.loads(row[1]), row[2], row[3])


@dataclass(frozen=True)
class SyncRoom:
    """What one sync needs of one room, read in the same transaction as the others: the
    user's membership and its position, the timeline slice (newest first, up to ``limit + 1``
    to tell whether it was limited), the receipts in range, and the current state when the
    room is new to the client or its timeline was cut."""

    room_id: str
    membership: str
    stream: int
    events: list[StoredEvent]
    receipts: list[tuple[str, str, str, int]]
    state: dict[tuple[str, str], dict[str, Any]] | None


def _current_state(tx: Tx, room_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    rows = tx.query(
        "SELECT s.type, s.state_key, e.body FROM current_state s"
        " JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ?",
        (room_id,),
    )
    return {(r[0], r[1]): json.loads(r[2]) for r in rows}


def _extremities(tx: Tx, room_id: str) -> list[tuple[str, int]]:
    rows = tx.query(
        "SELECT event_id, depth FROM extremities WHERE room_id = ? ORDER BY depth DESC LIMIT 10",
        (room_id,),
    )
    return [(str(r[0]), int(r[1])) for r in rows]


def _room_events(
    tx: Tx, room_id: str, after: int, upto: int, limit: int, newest_first: bool
) -> list[StoredEvent]:
    order = "DESC" if newest_first else "ASC"
    rows = tx.query(
        f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608
        f" WHERE room_id = ? AND stream > ? AND stream <= ? ORDER BY stream {order} LIMIT ?",
        (room_id, after, upto, limit),
    )
    return [_stored(r) for r in rows]


def _receipts(tx: Tx, room_id: str, after: int, upto: int) -> list[tuple[str, str, str, int]]:
    rows = tx.query(
        "SELECT user_id, receipt_type, event_id, ts FROM receipts"
        " WHERE room_id = ? AND stream > ? AND stream <= ?",
        (room_id, after, upto),
    )
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


class HomeserverStore:
    """The repository: every read and write the homeserver makes, as async methods.

    The two stream positions (events, receipts) are kept in memory once read: this process is
    the database's only writer, and a position moves only after its transaction committed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._max_stream: int | None = None
        self._max_receipt: int | None = None
        self._max_account: int | None = None

    def close(self) -> None:
        self.db.close()

    # users and tokens ----------------------------------------------------------------------

    async def create_user(self, user_id: str, password_hash: str, now: int) -> bool:
        def fn(tx: Tx) -> bool:
            if tx.one("SELECT 1 FROM users WHERE user_id = ?", (user_id,)):
                return False
            tx.run(
                "INSERT INTO users (user_id, password_hash, displayname, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (user_id, password_hash, user_id.split(":")[0][1:], now),
            )
            return True

        return await self.db.run(fn, write=True)

    async def password_hash(self, user_id: str) -> str | None:
        row = await self.db.run(
            lambda tx: tx.one("SELECT password_hash FROM users WHERE user_id = ?", (user_id,))
        )
        return None if row is None else str(row[0])

    async def add_token(self, token_hash: str, user_id: str, device_id: str, now: int) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, user_id, device_id, now),
            ),
            write=True,
        )

    async def token_owner(self, token_hash: str) -> tuple[str, str] | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?",
                (token_hash,),
            )
        )
        return None if row is None else (str(row[0]), str(row[1]))

    async def delete_token(self, token_hash: str) -> None:
        await self.db.run(
            lambda tx: tx.run("DELETE FROM access_tokens WHERE token_hash = ?", (token_hash,)),
            write=True,
        )

    # devices -------------------------------------------------------------------------------

    async def add_device(
        self, user_id: str, device_id: str, display_name: str | None, now: int
    ) -> None:
        """Remember a device (a session's); an existing one keeps its name unless given."""

        def fn(tx: Tx) -> None:
            row = tx.one(
                "SELECT display_name FROM devices WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            if row is None:
                tx.run(
                    "INSERT INTO devices (user_id, device_id, display_name, created_ts) "
                    "VALUES (?, ?, ?, ?)",
                    (user_id, device_id, display_name, now),
                )
            elif display_name is not None:
                tx.run(
                    "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                    (display_name, user_id, device_id),
                )

        await self.db.run(fn, write=True)

    async def devices(self, user_id: str) -> list[tuple[str, str | None]]:
        """(device ID, display name) of every device a user has a session or keys for."""

        def fn(tx: Tx) -> list[tuple[str, str | None]]:
            named = {
                str(d): (None if n is None else str(n))
                for d, n in tx.query(
                    "SELECT device_id, display_name FROM devices WHERE user_id = ?", (user_id,)
                )
            }
            live = tx.query(
                "SELECT device_id FROM access_tokens WHERE user_id = ? UNION "
                "SELECT device_id FROM e2e_device_keys WHERE user_id = ?",
                (user_id, user_id),
            )
            return sorted((str(d), named.get(str(d))) for (d,) in live)

        return await self.db.run(fn)

    async def rename_device(self, user_id: str, device_id: str, name: str | None) -> None:
        def fn(tx: Tx) -> None:
            if not tx.run(
                "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                (name, user_id, device_id),
            ):
                tx.run(
                    "INSERT INTO devices (user_id, device_id, display_name, created_ts) "
                    "VALUES (?, ?, ?, 0)",
                    (user_id, device_id, name),
                )

        await self.db.run(fn, write=True)

    async def delete_device(self, user_id: str, device_id: str) -> list[str]:
        """Delete a device and its sessions; the hashes of the tokens it had."""

        def fn(tx: Tx) -> list[str]:
            hashes = [
                str(h)
                for (h,) in tx.query(
                    "SELECT token_hash FROM access_tokens WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
            ]
            tx.run(
                "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            tx.run("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
            return hashes

        return await self.db.run(fn, write=True)

    # account data --------------------------------------------------------------------------

    async def put_account_data(
        self, user_id: str, room_id: str, data_type: str, content: str, limit: int
    ) -> None:
        """Set one type of a user's account data (``room_id`` empty: global); at most
        ``limit`` types per user (`MatrixError` past it, nothing written)."""
        written: list[int] = []

        def fn(tx: Tx) -> None:
            exists = tx.one(
                "SELECT 1 FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
                (user_id, room_id, data_type),
            )
            if exists is None:
                (count,) = tx.one(
                    "SELECT count(*) FROM account_data WHERE user_id = ?", (user_id,)
                ) or (0,)
                if count >= limit:
                    raise MatrixError(
                        400, "M_LIMIT_EXCEEDED", f"at most {limit} kinds of account data"
                    )
            tx.run("INSERT INTO account_data_changes (user_id) VALUES (?)", (user_id,))
            (stream,) = tx.one("SELECT max(stream) FROM account_data_changes") or (0,)
            written.append(int(stream))
            tx.run(
                "DELETE FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
                (user_id, room_id, data_type),
            )
            tx.run(
                "INSERT INTO account_data (user_id, room_id, type, content, stream) "
                "VALUES (?, ?, ?, ?, ?)",
                (user_id, room_id, data_type, content, stream),
            )

        await self.db.run(fn, write=True)
        if written and self._max_account is not None:
            self._max_account = max(self._max_account, written[0])

    async def get_account_data(self, user_id: str, room_id: str, data_type: str) -> str | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT content FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
                (user_id, room_id, data_type),
            )
        )
        return None if row is None else str(row[0])

    async def account_data_since(
        self, user_id: str, after: int, upto: int
    ) -> list[tuple[str, str, str]]:
        """(room ID or '', type, content) of what changed in (``after``, ``upto``]."""
        rows = await self.db.run(
            lambda tx: tx.query(
                "SELECT room_id, type, content FROM account_data WHERE user_id = ? "
                "AND stream > ? AND stream <= ? ORDER BY stream",
                (user_id, after, upto),
            )
        )
        return [(str(r), str(t), str(c)) for r, t, c in rows]

    async def max_account_data(self) -> int:
        """The newest account-data position (kept in memory once read)."""
        if self._max_account is None:
            row = await self.db.run(
                lambda tx: tx.one("SELECT max(stream) FROM account_data_changes")
            )
            loaded = int(row[0]) if row is not None and row[0] is not None else 0
            self._max_account = max(self._max_account or 0, loaded)
        return self._max_account

    async def user_devices(self, user_id: str) -> list[str]:
        """The devices a user has sessions or keys for."""
        rows = await self.db.run(
            lambda tx: tx.query(
                "SELECT device_id FROM access_tokens WHERE user_id = ? UNION "
                "SELECT device_id FROM e2e_device_keys WHERE user_id = ?",
                (user_id, user_id),
            )
        )
        return sorted(str(r[0]) for r in rows)

    async def delete_user_tokens(self, user_id: str) -> None:
        await self.db.run(
            lambda tx: tx.run("DELETE FROM access_tokens WHERE user_id = ?", (user_id,)),
            write=True,
        )

    async def add_openid_token(self, token_hash: str, user_id: str, now: int, expires: int) -> None:
        """Keep an OpenID token until ``expires`` (ms); forget the expired ones."""

        def fn(tx: Tx) -> None:
            tx.run("DELETE FROM openid_tokens WHERE expires_ts <= ?", (now,))
            tx.run(
                "INSERT INTO openid_tokens (token_hash, user_id, expires_ts) VALUES (?, ?, ?)",
                (token_hash, user_id, expires),
            )

        await self.db.run(fn, write=True)

    async def openid_token_owner(self, token_hash: str, now: int) -> str | None:
        """The user an unexpired OpenID token was issued to."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT user_id FROM openid_tokens WHERE token_hash = ? AND expires_ts > ?",
                (token_hash, now),
            )
        )
        return None if row is None else str(row[0])

    async def profile(self, user_id: str) -> tuple[bool, str | None]:
        """(whether the user exists, their display name)."""
        row = await self.db.run(
            lambda tx: tx.one("SELECT displayname FROM users WHERE user_id = ?", (user_id,))
        )
        return (False, None) if row is None else (True, row[0])

    async def set_displayname(self, user_id: str, name: str | None) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "UPDATE users SET displayname = ? WHERE user_id = ?", (name, user_id)
            ),
            write=True,
        )

    async def search_users(self, term: str, limit: int) -> list[tuple[str, str | None]]:
        pattern = "%" + term.lower().replace("\\", "").replace("%", "").replace("_", "") + "%"

        def fn(tx: Tx) -> list[tuple[str, str | None]]:
            rows = tx.query(
                "SELECT user_id, displayname FROM users"
                " WHERE lower(user_id) LIKE ? OR lower(coalesce(displayname, '')) LIKE ?"
                " ORDER BY user_id LIMIT ?",
                (pattern, pattern, limit),
            )
            return [(str(r[0]), r[1]) for r in rows]

        return await self.db.run(fn)

    async def put_filter(self, user_id: str, body: str) -> str:
        def fn(tx: Tx) -> str:
            row = tx.one(
                "INSERT INTO filters (user_id, body) VALUES (?, ?) RETURNING filter_id",
                (user_id, body),
            )
            assert row is not None
            return str(row[0])

        return await self.db.run(fn, write=True)

    async def get_filter(self, user_id: str, filter_id: str) -> str | None:
        if not filter_id.isdigit():
            return None
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT body FROM filters WHERE user_id = ? AND filter_id = ?",
                (user_id, int(filter_id)),
            )
        )
        return None if row is None else str(row[0])

    # rooms and events ----------------------------------------------------------------------

    async def create_room(self, room_id: str, room_version: str, now: int) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO rooms (room_id, room_version, created_ts) VALUES (?, ?, ?)"
                " ON CONFLICT (room_id) DO NOTHING",
                (room_id, room_version, now),
            ),
            write=True,
        )

    async def room_exists(self, room_id: str) -> bool:
        row = await self.db.run(
            lambda tx: tx.one("SELECT 1 FROM rooms WHERE room_id = ?", (room_id,))
        )
        return row is not None

    async def current_state(self, room_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        return await self.db.run(lambda tx: _current_state(tx, room_id))

    async def listed_rooms_state(self) -> list[tuple[str, dict[tuple[str, str], dict[str, Any]]]]:
        """Every room of the public directory with its current state, in one transaction."""

        def fn(tx: Tx) -> list[tuple[str, dict[tuple[str, str], dict[str, Any]]]]:
            rooms = tx.query("SELECT room_id FROM room_directory ORDER BY room_id")
            return [(str(r), _current_state(tx, str(r))) for (r,) in rooms]

        return await self.db.run(fn)

    async def send_context(
        self, room_id: str, txn: tuple[str, str, str] | None
    ) -> tuple[str | None, dict[tuple[str, str], dict[str, Any]], list[tuple[str, int]]]:
        """What sending into a room needs, in one transaction: the event already sent under
        ``txn`` (sender, device, transaction ID) if any, the current state, the extremities."""

        def fn(
            tx: Tx,
        ) -> tuple[str | None, dict[tuple[str, str], dict[str, Any]], list[tuple[str, int]]]:
            if txn is not None:
                row = tx.one(
                    "SELECT event_id FROM events WHERE sender = ? AND txn_device = ?"
                    " AND txn_id = ?",
                    txn,
                )
                if row is not None:
                    return str(row[0]), {}, []
            return None, _current_state(tx, room_id), _extremities(tx, room_id)

        return await self.db.run(fn)

    async def extremities(self, room_id: str) -> list[tuple[str, int]]:
        return await self.db.run(lambda tx: _extremities(tx, room_id))

    async def event_by_txn(self, sender: str, device: str, txn_id: str) -> str | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT event_id FROM events WHERE sender = ? AND txn_device = ? AND txn_id = ?",
                (sender, device, txn_id),
            )
        )
        return None if row is None else str(row[0])

    async def get_event(self, event_id: str) -> StoredEvent | None:
        row = await self.db.run(
            lambda tx: tx.one(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?",  # noqa: S608
                (event_id,),
            )
        )
        return None if row is None else _stored(row)

    async def has_events(self, event_ids: Sequence[str]) -> set[str]:
        def fn(tx: Tx) -> set[str]:
            found = set()
            for event_id in event_ids:
                if tx.one("SELECT 1 FROM events WHERE event_id = ?", (event_id,)):
                    found.add(event_id)
            return found

        return await self.db.run(fn)

    async def annotation_exists(self, target: str, sender: str, key: str) -> bool:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT 1 FROM events WHERE rel_target = ? AND rel_type = 'm.annotation'"
                " AND sender = ? AND rel_key = ? AND redacted_by IS NULL",
                (target, sender, key),
            )
        )
        return row is not None

    async def persist_event(
        self,
        event: dict[str, Any],
        *,
        txn: tuple[str, str] | None = None,
    ) -> tuple[int, bool, list[str]]:
        """Store an event and apply it (current state, memberships, forward extremities,
        redaction of its target). Returns (stream position, whether it was new, the room's
        joined and invited users after it)."""
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        room_id = event["room_id"]
        event_id = event["event_id"]
        state_key = event.get("state_key")
        raw = event.get("content")
        content: dict[str, Any] = raw if isinstance(raw, dict) else {}
        relates = content.get("m.relates_to") if isinstance(content, dict) else None
        rel_type = rel_target = rel_key = None
        if isinstance(relates, dict) and isinstance(relates.get("event_id"), str):
            rel_type = relates.get("rel_type") if isinstance(relates.get("rel_type"), str) else None
            rel_target = relates["event_id"]
            rel_key = relates.get("key") if isinstance(relates.get("key"), str) else None

        def fn(tx: Tx) -> tuple[int, bool, list[str]]:
            existing = tx.one("SELECT stream FROM events WHERE event_id = ?", (event_id,))
            if existing is not None:
                return int(existing[0]), False, []
            row = tx.one(
                "INSERT INTO events (event_id, room_id, type, state_key, sender, depth, body,"
                " rel_type, rel_target, rel_key, txn_device, txn_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING stream",
                (event_id, room_id, event["type"], state_key, event["sender"],
                 int(event.get("depth", 0)), body, rel_type, rel_target, rel_key,
                 txn[0] if txn else None, txn[1] if txn else None),
            )  # fmt: skip
            assert row is not None
            stream = int(row[0])
            if state_key is not None:
                tx.run(
                    "INSERT INTO current_state (room_id, type, state_key, event_id)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (room_id, type, state_key)"
                    " DO UPDATE SET event_id = excluded.event_id",
                    (room_id, event["type"], state_key, event_id),
                )
                if event["type"] == "m.room.member":
                    tx.run(
                        "INSERT INTO memberships (room_id, user_id, membership, stream)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (room_id, user_id)"
                        " DO UPDATE SET membership = excluded.membership,"
                        " stream = excluded.stream",
                        (room_id, state_key, str(content.get("membership")), stream),
                    )
            for prev in event.get("prev_events", []):
                tx.run(
                    "DELETE FROM extremities WHERE room_id = ? AND event_id = ?", (room_id, prev)
                )
            tx.run(
                "INSERT INTO extremities (room_id, event_id, depth) VALUES (?, ?, ?)"
                " ON CONFLICT (room_id, event_id) DO NOTHING",
                (room_id, event_id, int(event.get("depth", 0))),
            )
            target = event.get("redacts")
            if event["type"] == "m.room.redaction" and isinstance(target, str):
                _apply_redaction(tx, event, target)
            audience = tx.query(
                "SELECT user_id FROM memberships WHERE room_id = ?"
                " AND membership IN ('join', 'invite')",
                (room_id,),
            )
            return stream, True, [str(r[0]) for r in audience]

        stream, new, audience = await self.db.run(fn, write=True)
        if new:
            self._max_stream = max(self._max_stream or 0, stream)
        return stream, new, audience

    async def membership(self, room_id: str, user_id: str) -> tuple[str, int] | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT membership, stream FROM memberships WHERE room_id = ? AND user_id = ?",
                (room_id, user_id),
            )
        )
        return None if row is None else (str(row[0]), int(row[1]))

    async def rooms_for_user(self, user_id: str) -> list[tuple[str, str, int]]:
        rows = await self.db.run(
            lambda tx: tx.query(
                "SELECT room_id, membership, stream FROM memberships WHERE user_id = ?",
                (user_id,),
            )
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def room_members(self, room_id: str, memberships: Sequence[str] = ("join",)) -> list[str]:
        marks = ", ".join("?" for _ in memberships)
        rows = await self.db.run(
            lambda tx: tx.query(
                f"SELECT user_id FROM memberships WHERE room_id = ?"  # noqa: S608
                f" AND membership IN ({marks})",
                (room_id, *memberships),
            )
        )
        return [str(r[0]) for r in rows]

    async def max_stream(self) -> int:
        """The newest committed event's stream position."""
        if self._max_stream is None:
            row = await self.db.run(lambda tx: tx.one("SELECT max(stream) FROM events"))
            loaded = int(row[0]) if row and row[0] is not None else 0
            self._max_stream = max(self._max_stream or 0, loaded)
        return self._max_stream

    async def room_events(
        self, room_id: str, *, after: int, upto: int, limit: int, newest_first: bool
    ) -> list[StoredEvent]:
        """Events of the room with ``after < stream <= upto``; at most ``limit``, taken from
        the newest end or the oldest, and returned in that order."""
        return await self.db.run(
            lambda tx: _room_events(tx, room_id, after, upto, limit, newest_first)
        )

    async def sync_rooms(
        self,
        user_id: str,
        *,
        since: tuple[int, int] | None,
        upto: tuple[int, int],
        limit: int,
        full_state: bool,
    ) -> list[SyncRoom]:
        """Everything one ``/sync`` reads, in one transaction: for each room of the user
        whose membership is at or before ``upto`` (events, receipts positions), the slice of
        the timeline after ``since`` (all of it for rooms new to the client), the receipts in
        range and the state where the client needs it; rooms left or banned since, up to the
        leave; invites new since."""

        def fn(tx: Tx) -> list[SyncRoom]:
            out = []
            rooms = tx.query(
                "SELECT room_id, membership, stream FROM memberships WHERE user_id = ?",
                (user_id,),
            )
            for room_id, membership, mstream in rooms:
                if mstream > upto[0]:
                    continue  # landed after the position was read: next sync
                fresh = since is None or full_state or mstream > since[0]
                events: list[StoredEvent] = []
                receipts: list[tuple[str, str, str, int]] = []
                state = None
                if membership == "join":
                    after = 0 if fresh or since is None else since[0]
                    events = _room_events(tx, room_id, after, upto[0], limit + 1, True)
                    receipts = _receipts(tx, room_id, 0 if since is None else since[1], upto[1])
                    if fresh or len(events) > limit:
                        state = _current_state(tx, room_id)
                elif membership == "invite" and fresh:
                    state = _current_state(tx, room_id)
                elif membership in ("leave", "ban") and since is not None and mstream > since[0]:
                    events = _room_events(tx, room_id, since[0], mstream, limit + 1, True)
                else:
                    continue
                out.append(SyncRoom(room_id, membership, int(mstream), events, receipts, state))
            return out

        return await self.db.run(fn)

    async def events_by_id(self, event_ids: Sequence[str]) -> list[StoredEvent]:
        def fn(tx: Tx) -> list[StoredEvent]:
            out = []
            for event_id in event_ids:
                row = tx.one(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?",  # noqa: S608
                    (event_id,),
                )
                if row is not None:
                    out.append(_stored(row))
            return out

        return await self.db.run(fn)

    # receipts ------------------------------------------------------------------------------

    async def put_receipt(
        self, room_id: str, user_id: str, receipt_type: str, event_id: str, ts: int
    ) -> int:
        def fn(tx: Tx) -> int:
            row = tx.one("SELECT max(stream) FROM receipts")
            stream = (int(row[0]) if row and row[0] is not None else 0) + 1
            tx.run(
                "INSERT INTO receipts (room_id, user_id, receipt_type, event_id, ts, stream)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id, user_id, receipt_type)"
                " DO UPDATE SET event_id = excluded.event_id, ts = excluded.ts,"
                " stream = excluded.stream",
                (room_id, user_id, receipt_type, event_id, ts, stream),
            )
            return stream

        stream = await self.db.run(fn, write=True)
        self._max_receipt = max(self._max_receipt or 0, stream)
        return stream

    async def max_receipt_stream(self) -> int:
        """The newest committed receipt's stream position."""
        if self._max_receipt is None:
            row = await self.db.run(lambda tx: tx.one("SELECT max(stream) FROM receipts"))
            loaded = int(row[0]) if row and row[0] is not None else 0
            self._max_receipt = max(self._max_receipt or 0, loaded)
        return self._max_receipt

    async def receipts(
        self, room_id: str, *, after: int, upto: int
    ) -> list[tuple[str, str, str, int]]:
        """(user, receipt type, event ID, ts) changed in ``after < stream <= upto``."""
        return await self.db.run(lambda tx: _receipts(tx, room_id, after, upto))

    # media ---------------------------------------------------------------------------------

    async def put_media(
        self,
        media_id: str,
        uploader: str,
        content_type: str,
        filename: str | None,
        data: bytes,
        now: int,
    ) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO media (media_id, uploader, content_type, filename, data,"
                " created_ts) VALUES (?, ?, ?, ?, ?, ?)",
                (media_id, uploader, content_type, filename, data, now),
            ),
            write=True,
        )

    async def get_media(self, media_id: str) -> tuple[str, str | None, bytes] | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT content_type, filename, data FROM media WHERE media_id = ?",
                (media_id,),
            )
        )
        return None if row is None else (str(row[0]), row[1], bytes(row[2]))

    # federation ----------------------------------------------------------------------------

    async def server_key(self, server_name: str, key_id: str, now: int) -> str | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT verify_key FROM server_keys WHERE server_name = ? AND key_id = ?"
                " AND valid_until_ts > ?",
                (server_name, key_id, now),
            )
        )
        return None if row is None else str(row[0])

    async def put_server_key(
        self, server_name: str, key_id: str, verify_key: str, valid_until: int
    ) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO server_keys (server_name, key_id, verify_key, valid_until_ts)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (server_name, key_id) DO UPDATE SET"
                " verify_key = excluded.verify_key, valid_until_ts = excluded.valid_until_ts",
                (server_name, key_id, verify_key, valid_until),
            ),
            write=True,
        )

    async def federation_txn(self, origin: str, txn_id: str) -> str | None:
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT response FROM federation_txns WHERE origin = ? AND txn_id = ?",
                (origin, txn_id),
            )
        )
        return None if row is None else str(row[0])

    async def put_federation_txn(self, origin: str, txn_id: str, response: str) -> None:
        await self.db.run(
            lambda tx: tx.run(
                "INSERT INTO federation_txns (origin, txn_id, response) VALUES (?, ?, ?)"
                " ON CONFLICT (origin, txn_id) DO NOTHING",
                (origin, txn_id, response),
            ),
            write=True,
        )


def _apply_redaction(tx: Tx, redaction: dict[str, Any], target_id: str) -> None:
    """Replace the target's stored body with its redacted form: the content is gone for
    good (the event ID, a hash of the redacted form, does not change)."""
    from teia.homeserver.events import redact

    row = tx.one(
        "SELECT body FROM events WHERE event_id = ? AND room_id = ?",
        (target_id, redaction["room_id"]),
    )
    if row is None:
        return
    target = json.loads(row[0])
    redacted = redact(target)
    kept = ("event_id", "room_id", "sender", "type", "content", "origin_server_ts", "redacts")
    because = {k: v for k, v in redaction.items() if k in kept}
    redacted["unsigned"] = {"redacted_because": because}
    tx.run(
        "UPDATE events SET body = ?, redacted_by = ? WHERE event_id = ?",
        (json.dumps(redacted, separators=(",", ":")), redaction["event_id"], target_id),
    )
