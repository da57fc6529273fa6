"""The peer's SQLite database: history, contacts, sessions, prekeys and the outbox.

One file (WAL, mode 0600, ``synchronous=NORMAL``: a commit survives the process dying, not a
power cut; set ``durable=True`` for ``FULL``). Methods are synchronous and run on one
connection; `teia.peer.peer.Peer` calls them from a worker thread, one at a time, so the event
loop never waits on disk.

Secrets and content at rest are sealed with `RowCipher` (ChaCha20-Poly1305 under a key derived
from the identity seed; every row's natural key is its associated data, so a sealed value
copied into another row does not open): session state, prekey private keys, message texts.
Search works without plaintext in the file: each message's words are indexed as keyed hashes
(HMAC-SHA256 under a second derived key, truncated to 16 bytes). SQLite's FTS5 was not used on
purpose: its index holds the words in clear. Keyed hashes land on random pages of the token
index, so a message's tokens first go to an unindexed table (appended in order: one page) and
are moved into the index a few thousand at a time, sorted (`merge_search`): each message's
commit writes ~5 pages fewer, and an index page takes many tokens per write. Search reads both.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`)::

    meta(key PK, value)
    contacts(peer_id PK, name UNIQUE, identity_key, trust, previous_peer_id, addrs, added_ms)
    sessions(peer_id, slot, state*, updated_ms)                         PK(peer_id, slot)
    session_versions(peer_id PK, version)          newest state saved (see `_save_sessions`)
    prekeys(kind, id, private*, public, handed_out, created_ms)        PK(kind, id)
    messages(seq PK, message_id, peer_id, conversation, outgoing, sent_ms, received_ms,
             body*, state, path, latency_ms)                  UNIQUE(peer_id, outgoing, message_id)
    outbox(peer_id, message_id, kind, plaintext*, envelope, attempts, created_ms, last_error)
                                                                       PK(peer_id, message_id)
    base_keys(peer_id, base_key)          initiators' X3DH base keys already accepted (replays)
    search_tokens(token, seq)                                     index on token
    search_recent(token, seq)      the newest tokens, unindexed, until `merge_search` moves them
    app_inbox(seq PK, peer_id, message_id, app, data*, sent_ms, path)
                      application payloads received, until their handler has taken them
    (* sealed)

Features built on the peer (groups, devices, attachments) keep their own tables in the same
file: `PeerDatabase.ensure_schema` creates them, `PeerDatabase.transaction` and
`PeerDatabase.cipher` give them the same atomicity and sealing. Version 1 files are upgraded in
place, as are version 2 files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teia import _native
from teia.crypto import OneTimePrekey, SignedPrekey
from teia.errors import ProfileError
from teia.peer.wire import Plaintext

__all__ = [
    "SCHEMA_VERSION",
    "AppRow",
    "Contact",
    "MessageRow",
    "OutboxItem",
    "PeerDatabase",
    "RowCipher",
    "SessionSnapshot",
    "Trust",
    "now_ms",
]

SCHEMA_VERSION: Final = 3
_NONCE: Final = 12
_KIND_APP: Final = 3  # wire.Kind.APP
_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_TOKENS_PER_MESSAGE: Final = 512

SessionSnapshot = tuple[int, Sequence[bytes]]
"""(version, serialised sessions): versions grow with every change of a peer's sessions."""
Trust = Literal["unverified", "verified", "unverified-changed"]
MessageState = Literal[
    "pending", "sent", "stored", "delivered", "read", "received", "failed", "retracted"
]


_CHECKPOINT_PAGES: Final = 4000
_RECENT_TOKENS: Final = 2048  # unindexed search tokens worth a merge
_RECENT_TOKENS_CAP: Final = 8 * _RECENT_TOKENS  # merged within the transaction at this many


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class RowCipher:
    """Seals values at rest under keys derived from the identity seed."""

    def __init__(self, identity_seed: bytes) -> None:
        def derive(info: bytes) -> bytes:
            return HKDF(
                algorithm=hashes.SHA256(), length=32, salt=b"teia peer profile", info=info
            ).derive(identity_seed)

        self._aead = ChaCha20Poly1305(derive(b"teia profile rows v1"))
        self._search_key = derive(b"teia profile search v1")

    def seal(self, associated: bytes, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, associated: bytes, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], associated)
        except (InvalidTag, ValueError):
            raise ProfileError(
                "a sealed row of the profile database does not open: the database belongs to "
                "another identity or was modified"
            ) from None

    def token(self, word: str) -> bytes:
        """HMAC-SHA256(search key, word)[:16]."""
        return _native.search_tokens(self._search_key, [word])[0]

    def tokens(self, text: str) -> set[bytes]:
        """The search tokens of a text's distinct case-folded words (one native call)."""
        words = list({w.casefold() for w in _WORD.findall(text)})[:_MAX_TOKENS_PER_MESSAGE]
        return set(_native.search_tokens(self._search_key, words))


@dataclass(frozen=True, slots=True)
class Contact:
    """Someone in the address book. `peer_id` is the key: it embeds the identity key."""

    peer_id: str
    name: str | None
    identity_key: bytes
    trust: Trust
    previous_peer_id: str | None
    addrs: tuple[str, ...]
    added_ms: int


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One message of the history (`text` opened from its sealed form)."""

    seq: int
    message_id: bytes
    peer_id: str
    conversation: str
    outgoing: bool
    sent_ms: int
    received_ms: int | None
    text: str
    state: MessageState
    path: str | None
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An envelope waiting for delivery; `envelope` is None until it is encrypted."""

    peer_id: str
    message_id: bytes
    kind: int
    plaintext: bytes | None
    envelope: bytes | None
    attempts: int
    created_ms: int

    def with_envelope(self, envelope: bytes) -> OutboxItem:
        return OutboxItem(
            self.peer_id,
            self.message_id,
            self.kind,
            None,
            envelope,
            self.attempts,
            self.created_ms,
        )


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE contacts (
    peer_id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    identity_key BLOB NOT NULL,
    trust TEXT NOT NULL,
    previous_peer_id TEXT,
    addrs TEXT NOT NULL DEFAULT '[]',
    added_ms INTEGER NOT NULL
);
CREATE TABLE sessions (
    peer_id TEXT NOT NULL,
    slot INTEGER NOT NULL,
    state BLOB NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (peer_id, slot)
);
CREATE TABLE session_versions (peer_id TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE prekeys (
    kind TEXT NOT NULL,
    id INTEGER NOT NULL,
    private BLOB NOT NULL,
    public BLOB NOT NULL,
    handed_out INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BLOB NOT NULL,
    peer_id TEXT NOT NULL,
    conversation TEXT NOT NULL,
    outgoing INTEGER NOT NULL,
    sent_ms INTEGER NOT NULL,
    received_ms INTEGER,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    path TEXT,
    latency_ms REAL,
    UNIQUE (peer_id, outgoing, message_id)
);
CREATE INDEX messages_by_conversation ON messages (conversation, seq);
CREATE TABLE outbox (
    peer_id TEXT NOT NULL,
    message_id BLOB NOT NULL,
    kind INTEGER NOT NULL,
    plaintext BLOB NOT NULL,
    envelope BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    last_error TEXT,
    PRIMARY KEY (peer_id, message_id)
);
CREATE TABLE base_keys (peer_id TEXT NOT NULL, base_key BLOB NOT NULL,
    PRIMARY KEY (peer_id, base_key));
CREATE TABLE search_tokens (token BLOB NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX search_tokens_by_token ON search_tokens (token);
"""

# Added by schema version 2.
_SCHEMA_2 = """
CREATE TABLE app_inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id TEXT NOT NULL,
    message_id BLOB NOT NULL,
    app TEXT NOT NULL,
    data BLOB NOT NULL,
    sent_ms INTEGER NOT NULL,
    path TEXT
);
"""

# Added by schema version 3.
_SCHEMA_3 = """
CREATE TABLE search_recent (token BLOB NOT NULL, seq INTEGER NOT NULL);
"""

# Only constant column lists and "?" placeholders are ever formatted into SQL text.
_MESSAGE_COLUMNS = (
    "seq, message_id, peer_id, conversation, outgoing, sent_ms, received_ms, body, state, "
    "path, latency_ms"
)


def _session_ad(peer_id: str, slot: int) -> bytes:
    return b"session\0" + peer_id.encode() + b"\0" + bytes([slot])


def _prekey_ad(kind: str, prekey_id: int) -> bytes:
    return b"prekey\0" + kind.encode() + b"\0" + prekey_id.to_bytes(4, "big")


def _outbox_ad(peer_id: str, message_id: bytes) -> bytes:
    return b"outbox\0" + peer_id.encode() + b"\0" + message_id


def _message_ad(peer_id: str, outgoing: bool, message_id: bytes) -> bytes:
    return b"message\0" + peer_id.encode() + (b"\0o\0" if outgoing else b"\0i\0") + message_id


def _app_ad(peer_id: str, message_id: bytes) -> bytes:
    return b"app\0" + peer_id.encode() + b"\0" + message_id


@dataclass(frozen=True, slots=True)
class AppRow:
    """An application payload received and not yet taken by its handler."""

    seq: int
    peer_id: str
    message_id: bytes
    app: str
    data: bytes
    sent_ms: int
    path: str


class PeerDatabase:
    """The profile's database; see the module docstring. Not thread-safe by itself: one caller
    at a time (the peer serialises calls through one worker thread)."""

    def __init__(self, path: Path, cipher: RowCipher, *, durable: bool = False) -> None:
        self.path = path
        self._cipher = cipher
        self._lock = threading.Lock()
        self._last_timestamp = 0
        if not path.exists():
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            # Checkpoint every 4,000 WAL pages (16 MiB), not SQLite's 1,000: a page written by
            # many commits in between is copied back (and synced) once: a busy peer used ~15 %
            # more CPU per message at 1,000 (benchmarks/README.md, issue 7).
            self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.executescript(
                    f"BEGIN; {_SCHEMA} {_SCHEMA_2} {_SCHEMA_3} "
                    f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version in (1, 2):
                upgrade = (_SCHEMA_2 if version == 1 else "") + _SCHEMA_3
                self._db.executescript(
                    f"BEGIN; {upgrade} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version != SCHEMA_VERSION:
                raise ProfileError(
                    f"profile database schema {version} is not {SCHEMA_VERSION}; upgrade teia"
                )
            self._recent_tokens: int | None = None  # rows in search_recent (None: count them)
        except sqlite3.DatabaseError as exc:
            raise ProfileError(f"cannot open the profile database {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def next_timestamp(self) -> int:
        """Wall-clock milliseconds, strictly increasing within this process: stored envelopes
        are ordered by their timestamps, so two messages never share one."""
        self._last_timestamp = max(now_ms(), self._last_timestamp + 1)
        return self._last_timestamp

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recent_tokens = None
                raise
            self._db.execute("COMMIT")

    # --- for features built on the peer ---------------------------------------------------------

    @property
    def cipher(self) -> RowCipher:
        """The row cipher: seal what a feature keeps at rest (with the row's key as AD)."""
        return self._cipher

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """``with db.transaction() as conn:`` — one write transaction (rolled back on error)."""
        return self._transaction()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """Rows of a read-only query (outside any transaction)."""
        return self._db.execute(sql, params).fetchall()

    def ensure_schema(self, ddl: str) -> None:
        """Run a feature's ``CREATE TABLE IF NOT EXISTS …`` statements (idempotent)."""
        with self._lock:
            self._db.executescript(f"BEGIN; {ddl} COMMIT;")

    def insert_history(
        self,
        conn: sqlite3.Connection,
        *,
        message_id: bytes,
        peer_id: str,
        conversation: str,
        outgoing: bool,
        sent_ms: int,
        text: str,
        state: MessageState,
        path: str | None = None,
    ) -> int | None:
        """Inside ``transaction()``: a message into history (sealed, searchable) unless one
        with the same (peer, direction, ID) is there; its sequence number, or None."""
        if (
            conn.execute(
                "SELECT 1 FROM messages WHERE peer_id = ? AND outgoing = ? AND message_id = ?",
                (peer_id, int(outgoing), message_id),
            ).fetchone()
            is not None
        ):
            return None
        return self._insert_message(
            conn,
            message_id=message_id,
            peer_id=peer_id,
            conversation=conversation,
            outgoing=outgoing,
            sent_ms=sent_ms,
            received_ms=None if outgoing else now_ms(),
            text=text,
            state=state,
            path=path,
        )

    def app_pending(self, after_seq: int = 0, *, limit: int = 64) -> list[AppRow]:
        """Application payloads not yet taken, in arrival order."""
        rows = self._db.execute(
            "SELECT seq, peer_id, message_id, app, data, sent_ms, path FROM app_inbox "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        out = []
        for seq, peer, mid, app, data, sent, path in rows:
            message_id = bytes(mid)
            out.append(
                AppRow(
                    int(seq),
                    str(peer),
                    message_id,
                    str(app),
                    self._cipher.open(_app_ad(str(peer), message_id), bytes(data)),
                    int(sent),
                    str(path or "direct"),
                )
            )
        return out

    def app_done(self, seq: int) -> None:
        """The handler took the payload ``seq``: forget it."""
        with self._transaction() as db:
            db.execute("DELETE FROM app_inbox WHERE seq = ?", (seq,))

    # --- meta -------------------------------------------------------------------------------

    def next_counter(self, key: str, count: int = 1) -> int:
        """Reserve ``count`` consecutive integers under ``key``; returns the first."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            first = int(row[0]) if row else 1
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, first + count)
            )
        return first

    # --- prekeys ----------------------------------------------------------------------------

    def add_signed_prekey(self, prekey: SignedPrekey) -> None:
        sealed = self._cipher.seal(_prekey_ad("signed", prekey.id), prekey.to_bytes())
        with self._transaction() as db:
            db.execute(
                "INSERT INTO prekeys (kind, id, private, public, created_ms) "
                "VALUES ('signed', ?, ?, ?, ?)",
                (prekey.id, sealed, prekey.public_key, now_ms()),
            )

    def signed_prekey(self, prekey_id: int | None = None) -> SignedPrekey | None:
        """The signed prekey with ``prekey_id``, or the newest one."""
        if prekey_id is None:
            query = "SELECT id, private FROM prekeys WHERE kind = 'signed' ORDER BY id DESC"
            row = self._db.execute(query).fetchone()
        else:
            row = self._db.execute(
                "SELECT id, private FROM prekeys WHERE kind = 'signed' AND id = ?", (prekey_id,)
            ).fetchone()
        if row is None:
            return None
        return SignedPrekey.from_bytes(self._cipher.open(_prekey_ad("signed", row[0]), row[1]))

    def signed_prekey_ages(self) -> list[tuple[int, int]]:
        """(id, created_ms) of every signed prekey held, newest first."""
        rows = self._db.execute(
            "SELECT id, created_ms FROM prekeys WHERE kind = 'signed' ORDER BY id DESC"
        ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]

    def delete_signed_prekeys(self, prekey_ids: Sequence[int]) -> None:
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM prekeys WHERE kind = 'signed' AND id = ?", [(i,) for i in prekey_ids]
            )

    def add_one_time_prekeys(self, prekeys: Sequence[OneTimePrekey]) -> None:
        rows = [
            (p.id, self._cipher.seal(_prekey_ad("one-time", p.id), p.to_bytes()), p.public_key)
            for p in prekeys
        ]
        created = now_ms()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO prekeys (kind, id, private, public, created_ms) "
                "VALUES ('one-time', ?, ?, ?, ?)",
                [(*row, created) for row in rows],
            )

    def one_time_prekey(self, prekey_id: int) -> OneTimePrekey | None:
        row = self._db.execute(
            "SELECT private FROM prekeys WHERE kind = 'one-time' AND id = ?", (prekey_id,)
        ).fetchone()
        if row is None:
            return None
        return OneTimePrekey.from_bytes(
            self._cipher.open(_prekey_ad("one-time", prekey_id), row[0])
        )

    def fresh_one_time_prekeys(self) -> int:
        """One-time prekeys not yet handed out."""
        return int(
            self._db.execute(
                "SELECT count(*) FROM prekeys WHERE kind = 'one-time' AND handed_out = 0"
            ).fetchone()[0]
        )

    def hand_out_one_time_prekeys(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` fresh one-time prekeys (id, public key), now marked handed out."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, public FROM prekeys WHERE kind = 'one-time' AND handed_out = 0 "
                "ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            db.executemany(
                "UPDATE prekeys SET handed_out = 1 WHERE kind = 'one-time' AND id = ?",
                [(r[0],) for r in rows],
            )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    # --- contacts ---------------------------------------------------------------------------

    def _contact(self, row: Any) -> Contact | None:
        if row is None:
            return None
        peer_id, name, key, trust, previous, addrs, added = row
        return Contact(
            str(peer_id),
            None if name is None else str(name),
            bytes(key),
            trust,
            None if previous is None else str(previous),
            tuple(json.loads(str(addrs))),
            int(added),
        )

    _CONTACT = "SELECT peer_id, name, identity_key, trust, previous_peer_id, addrs, added_ms "

    def contact(self, peer_id: str) -> Contact | None:
        row = self._db.execute(self._CONTACT + "FROM contacts WHERE peer_id = ?", (peer_id,))
        return self._contact(row.fetchone())

    def contact_by_name(self, name: str) -> Contact | None:
        row = self._db.execute(self._CONTACT + "FROM contacts WHERE name = ?", (name,))
        return self._contact(row.fetchone())

    def contacts(self) -> list[Contact]:
        rows = self._db.execute(self._CONTACT + "FROM contacts ORDER BY name IS NULL, name")
        return [c for c in (self._contact(r) for r in rows.fetchall()) if c is not None]

    def upsert_contact(
        self,
        peer_id: str,
        identity_key: bytes,
        *,
        name: str | None = None,
        addrs: Iterable[str] = (),
    ) -> tuple[Contact, Contact | None]:
        """Add or update a contact; returns it and, when ``name`` moved here from another
        identity, that earlier contact (whose name is cleared; the new one is then
        ``unverified-changed``)."""
        with self._transaction() as db:
            previous = None
            if name is not None:
                previous = self.contact_by_name(name)
                if previous is not None and previous.peer_id == peer_id:
                    previous = None
                if previous is not None:
                    db.execute(
                        "UPDATE contacts SET name = NULL WHERE peer_id = ?", (previous.peer_id,)
                    )
            existing = self.contact(peer_id)
            new_addrs = list(dict.fromkeys([*(existing.addrs if existing else ()), *addrs]))
            if existing is None:
                db.execute(
                    "INSERT INTO contacts (peer_id, name, identity_key, trust, previous_peer_id, "
                    "addrs, added_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        peer_id,
                        name,
                        identity_key,
                        "unverified-changed" if previous else "unverified",
                        previous.peer_id if previous else None,
                        json.dumps(new_addrs),
                        now_ms(),
                    ),
                )
            else:
                db.execute(
                    "UPDATE contacts SET name = coalesce(?, name), addrs = ?, "
                    "trust = CASE WHEN ? THEN 'unverified-changed' ELSE trust END, "
                    "previous_peer_id = coalesce(?, previous_peer_id) WHERE peer_id = ?",
                    (
                        name,
                        json.dumps(new_addrs),
                        previous is not None,
                        previous.peer_id if previous else None,
                        peer_id,
                    ),
                )
            contact = self.contact(peer_id)
        assert contact is not None
        return contact, previous

    def set_trust(self, peer_id: str, trust: Trust) -> None:
        with self._transaction() as db:
            db.execute("UPDATE contacts SET trust = ? WHERE peer_id = ?", (trust, peer_id))

    def remove_contact(self, peer_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM contacts WHERE peer_id = ?", (peer_id,)).rowcount > 0

    # --- sessions ---------------------------------------------------------------------------

    def sessions(self, peer_id: str) -> list[bytes]:
        """The serialised sessions with a peer, current first (at most two)."""
        rows = self._db.execute(
            "SELECT slot, state FROM sessions WHERE peer_id = ? ORDER BY slot", (peer_id,)
        ).fetchall()
        return [self._cipher.open(_session_ad(peer_id, slot), state) for slot, state in rows]

    def session_version(self, peer_id: str) -> int:
        row = self._db.execute(
            "SELECT version FROM session_versions WHERE peer_id = ?", (peer_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _save_sessions(
        self, db: sqlite3.Connection, peer_id: str, snapshot: SessionSnapshot
    ) -> None:
        # Snapshots are taken under the peer's lock but may reach this thread out of order; a
        # state older than the one saved would make the ratchet reuse message keys after a
        # restart, so only a newer version is written.
        version, states = snapshot
        if version <= self.session_version(peer_id):
            return
        stamp = now_ms()
        # Upserts update rows in place: INSERT OR REPLACE deleted and re-inserted them, moving
        # each to a new page and rewriting its index entry: two more pages a commit.
        db.executemany(
            "INSERT INTO sessions (peer_id, slot, state, updated_ms) VALUES (?,?,?,?) "
            "ON CONFLICT (peer_id, slot) DO UPDATE SET "
            "state = excluded.state, updated_ms = excluded.updated_ms",
            [
                (peer_id, slot, self._cipher.seal(_session_ad(peer_id, slot), state), stamp)
                for slot, state in enumerate(states)
            ],
        )
        db.execute("DELETE FROM sessions WHERE peer_id = ? AND slot >= ?", (peer_id, len(states)))
        db.execute(
            "INSERT INTO session_versions (peer_id, version) VALUES (?, ?) "
            "ON CONFLICT (peer_id) DO UPDATE SET version = excluded.version",
            (peer_id, version),
        )

    def save_sessions(self, peer_id: str, snapshot: SessionSnapshot) -> None:
        with self._transaction() as db:
            self._save_sessions(db, peer_id, snapshot)

    # --- messages ---------------------------------------------------------------------------

    def _insert_message(
        self,
        db: sqlite3.Connection,
        *,
        message_id: bytes,
        peer_id: str,
        conversation: str,
        outgoing: bool,
        sent_ms: int,
        received_ms: int | None,
        text: str,
        state: MessageState,
        path: str | None = None,
        latency_ms: float | None = None,
    ) -> int:
        body = self._cipher.seal(_message_ad(peer_id, outgoing, message_id), text.encode())
        cursor = db.execute(
            "INSERT INTO messages (message_id, peer_id, conversation, outgoing, sent_ms, "
            "received_ms, body, state, path, latency_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                peer_id,
                conversation,
                int(outgoing),
                sent_ms,
                received_ms,
                body,
                state,
                path,
                latency_ms,
            ),
        )
        seq = cursor.lastrowid
        assert seq is not None
        tokens = self._cipher.tokens(text)
        if tokens:
            db.executemany(
                "INSERT INTO search_recent (token, seq) VALUES (?, ?)",
                [(token, seq) for token in tokens],
            )
            if self._recent_tokens is None:
                self._recent_tokens = db.execute("SELECT count(*) FROM search_recent").fetchone()[0]
            else:
                self._recent_tokens += len(tokens)
            if self._recent_tokens >= _RECENT_TOKENS_CAP:
                self._merge_search(db)  # nobody called `merge_search` in time
        return seq

    @property
    def search_merge_due(self) -> bool:
        """Enough tokens wait unindexed that `merge_search` is worth a call."""
        return (self._recent_tokens or 0) >= _RECENT_TOKENS

    def merge_search(self) -> None:
        """Move the newest search tokens into the token index, sorted, in one transaction."""
        with self._transaction() as db:
            self._merge_search(db)

    def _merge_search(self, db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO search_tokens (token, seq) "
            "SELECT token, seq FROM search_recent ORDER BY token, seq"
        )
        db.execute("DELETE FROM search_recent")
        self._recent_tokens = 0

    def queue_outgoing(
        self,
        *,
        peer_id: str,
        conversation: str,
        message_id: bytes,
        sent_ms: int,
        text: str | None,
        kind: int,
        plaintext: bytes,
        envelope: bytes | None = None,
        sessions: SessionSnapshot | None = None,
    ) -> int | None:
        """One message into history (for a text) and the outbox; see `queue_many`."""
        record = {
            "message_id": message_id,
            "sent_ms": sent_ms,
            "text": text,
            "kind": kind,
            "plaintext": plaintext,
            "envelope": envelope,
        }
        return self.queue_many(peer_id, conversation, [record], sessions)[0]

    def queue_many(
        self,
        peer_id: str,
        conversation: str,
        records: Sequence[dict[str, Any]],
        sessions: SessionSnapshot | None = None,
    ) -> list[int | None]:
        """In one transaction, messages for one peer: each text into history, each message
        into the outbox — its envelope (then ``sessions`` is the state after encrypting them
        all), or its plaintext sealed, for the delivery task to encrypt. Records have
        ``message_id``, ``sent_ms``, ``text`` (None for receipts), ``kind``, ``plaintext``,
        ``envelope``, and may have ``conversation`` (instead of the argument). Application
        payloads (kind 3) keep their sealed plaintext beside the envelope: history cannot
        rebuild them if the recipient refuses the envelope. Returns the history sequence
        numbers."""
        rows = []
        for r in records:
            sealed = b""
            if r["envelope"] is None or r["kind"] == _KIND_APP:
                sealed = self._cipher.seal(_outbox_ad(peer_id, r["message_id"]), r["plaintext"])
            rows.append((peer_id, r["message_id"], r["kind"], sealed, r["envelope"], r["sent_ms"]))
        out: list[int | None] = []
        with self._transaction() as db:
            if sessions is not None:
                self._save_sessions(db, peer_id, sessions)
            for r in records:
                seq = None
                if r["text"] is not None:
                    seq = self._insert_message(
                        db,
                        message_id=r["message_id"],
                        peer_id=peer_id,
                        conversation=r.get("conversation", conversation),
                        outgoing=True,
                        sent_ms=r["sent_ms"],
                        received_ms=None,
                        text=r["text"],
                        state="pending",
                    )
                out.append(seq)
            db.executemany(
                "INSERT INTO outbox (peer_id, message_id, kind, plaintext, envelope, created_ms) "
                "VALUES (?,?,?,?,?,?)",
                rows,
            )
        return out

    def queue_text(self, peer_id: str, text: str, message_id: bytes | None = None) -> bytes:
        """Queue a text for ``peer_id`` (history + outbox); returns its message ID."""
        message_id = message_id or secrets.token_bytes(16)
        self.queue_outgoing(
            peer_id=peer_id,
            conversation=peer_id,
            message_id=message_id,
            sent_ms=self.next_timestamp(),
            text=text,
            kind=1,
            plaintext=Plaintext(text).encode(),
        )
        return message_id

    def queue_app(self, peer_id: str, app: str, data: bytes) -> bytes:
        """Queue an application payload for ``peer_id`` (outbox, no text in history), as
        `Peer.send_app` does, from a process without the profile online; its message ID."""
        message_id = secrets.token_bytes(16)
        self.queue_outgoing(
            peer_id=peer_id,
            conversation="",
            message_id=message_id,
            sent_ms=self.next_timestamp(),
            text="",
            kind=_KIND_APP,
            plaintext=Plaintext(app=app, data=data).encode(),
        )
        return message_id

    def set_envelopes(
        self, peer_id: str, envelopes: Sequence[tuple[bytes, bytes]], sessions: SessionSnapshot
    ) -> None:
        """In one transaction: the sessions after encrypting, and each encrypted envelope in
        place of its sealed plaintext (which is dropped: nothing is encrypted twice)."""
        with self._transaction() as db:
            self._save_sessions(db, peer_id, sessions)
            db.executemany(
                "UPDATE outbox SET envelope = ?, "
                "plaintext = CASE WHEN kind = ? THEN plaintext ELSE x'' END "
                "WHERE peer_id = ? AND message_id = ?",
                [(envelope, _KIND_APP, peer_id, message_id) for message_id, envelope in envelopes],
            )

    def reset_envelopes(self, peer_id: str, message_ids: Sequence[bytes]) -> None:
        """Envelopes the recipient refused: encrypt their texts again (from history)."""
        with self._transaction() as db:
            for message_id in message_ids:
                kept = db.execute(
                    "SELECT kind, length(plaintext) FROM outbox "
                    "WHERE peer_id = ? AND message_id = ?",
                    (peer_id, message_id),
                ).fetchone()
                if kept is not None and kept[0] == _KIND_APP and kept[1]:
                    db.execute(
                        "UPDATE outbox SET envelope = NULL WHERE peer_id = ? AND message_id = ?",
                        (peer_id, message_id),
                    )
                    continue
                row = self.message(peer_id, message_id, outgoing=True)
                if row is None:
                    db.execute(
                        "DELETE FROM outbox WHERE peer_id = ? AND message_id = ?",
                        (peer_id, message_id),
                    )
                    continue
                sealed = self._cipher.seal(
                    _outbox_ad(peer_id, message_id), Plaintext(row.text).encode()
                )
                db.execute(
                    "UPDATE outbox SET envelope = NULL, plaintext = ? "
                    "WHERE peer_id = ? AND message_id = ?",
                    (sealed, peer_id, message_id),
                )

    def has_incoming(self, peer_id: str, message_id: bytes) -> bool:
        return (
            self._db.execute(
                "SELECT 1 FROM messages WHERE peer_id = ? AND outgoing = 0 AND message_id = ?",
                (peer_id, message_id),
            ).fetchone()
            is not None
        )

    def record_incoming(
        self,
        *,
        peer_id: str,
        identity_key: bytes,
        records: Sequence[dict[str, Any]],
        sessions: SessionSnapshot,
        path: str,
    ) -> list[int | None]:
        """In one transaction, for a batch from one sender: each message into history (texts;
        receipts leave a row without text, and mark our listed messages ``delivered``), the
        sessions after decrypting them, the one-time prekeys they consumed deleted, the
        initiators' base keys remembered, the sender in the contacts. Each record has
        ``message_id``, ``conversation``, ``sent_ms``, ``text`` (None for receipts),
        ``receipts``, ``used_one_time_prekey``, ``base_key``, and may have ``app`` (name,
        data): an application payload, queued in ``app_inbox`` for its handler. Returns the
        new history sequence numbers (None for a message already held)."""
        out: list[int | None] = []
        with self._transaction() as db:
            known = db.execute("SELECT 1 FROM contacts WHERE peer_id = ?", (peer_id,)).fetchone()
            if known is None:
                db.execute(
                    "INSERT INTO contacts (peer_id, identity_key, trust, added_ms) "
                    "VALUES (?, ?, 'unverified', ?)",
                    (peer_id, identity_key, now_ms()),
                )
            self._save_sessions(db, peer_id, sessions)
            received = now_ms()
            for record in records:
                if self.has_incoming(peer_id, record["message_id"]):
                    out.append(None)
                    continue
                if record["base_key"] is not None:
                    db.execute(
                        "INSERT OR IGNORE INTO base_keys (peer_id, base_key) VALUES (?, ?)",
                        (peer_id, record["base_key"]),
                    )
                if record["used_one_time_prekey"] is not None:
                    db.execute(
                        "DELETE FROM prekeys WHERE kind = 'one-time' AND id = ?",
                        (record["used_one_time_prekey"],),
                    )
                text = record["text"]
                out.append(
                    self._insert_message(
                        db,
                        message_id=record["message_id"],
                        peer_id=peer_id,
                        conversation=record["conversation"] if text is not None else "",
                        outgoing=False,
                        sent_ms=record["sent_ms"],
                        received_ms=received,
                        text=text or "",
                        state="received",
                        path=path,
                    )
                )
                if record["receipts"]:
                    self._mark_delivered(db, peer_id, [(r, None, None) for r in record["receipts"]])
                app = record.get("app")
                if app is not None:
                    name, data = app
                    db.execute(
                        "INSERT INTO app_inbox (peer_id, message_id, app, data, sent_ms, path) "
                        "VALUES (?,?,?,?,?,?)",
                        (
                            peer_id,
                            record["message_id"],
                            name,
                            self._cipher.seal(_app_ad(peer_id, record["message_id"]), data),
                            record["sent_ms"],
                            path,
                        ),
                    )
        return out

    def _mark_delivered(
        self,
        db: sqlite3.Connection,
        peer_id: str,
        deliveries: Sequence[tuple[bytes, str | None, float | None]],
    ) -> None:
        db.executemany(
            "UPDATE messages SET state = 'delivered', path = coalesce(?, path), "
            "latency_ms = coalesce(?, latency_ms) "
            "WHERE peer_id = ? AND outgoing = 1 AND message_id = ? "
            "AND state NOT IN ('delivered', 'read', 'retracted')",
            [(path, latency, peer_id, message_id) for message_id, path, latency in deliveries],
        )
        db.executemany(
            "DELETE FROM outbox WHERE peer_id = ? AND message_id = ?",
            [(peer_id, message_id) for message_id, _, _ in deliveries],
        )

    def mark_delivered(
        self,
        peer_id: str,
        deliveries: Sequence[tuple[bytes, str | None, float | None]],
    ) -> None:
        """(message ID, path, latency ms) per delivered message: history updated, outbox
        entry removed."""
        with self._transaction() as db:
            self._mark_delivered(db, peer_id, deliveries)

    def mark_read_incoming(
        self, peer_id: str, message_ids: Sequence[bytes] | None, limit: int
    ) -> list[bytes]:
        """Mark texts received from ``peer_id`` in our conversation with it as ``read`` (all
        of them, or those of ``message_ids``), at most ``limit``; the IDs newly marked."""
        with self._transaction() as db:
            if message_ids is None:
                rows = db.execute(
                    "SELECT message_id FROM messages WHERE peer_id = ? AND conversation = ? "
                    "AND outgoing = 0 AND state = 'received' ORDER BY seq LIMIT ?",
                    (peer_id, peer_id, limit),
                ).fetchall()
                wanted = [bytes(r[0]) for r in rows]
            else:
                wanted = list(message_ids)[:limit]
            marked = []
            for message_id in wanted:
                changed = db.execute(
                    "UPDATE messages SET state = 'read' WHERE peer_id = ? AND conversation = ? "
                    "AND outgoing = 0 AND message_id = ? AND state = 'received'",
                    (peer_id, peer_id, message_id),
                ).rowcount
                if changed:
                    marked.append(message_id)
            return marked

    def retract(self, peer_id: str, outgoing: bool, message_id: bytes) -> bool:
        """Empty a text of our conversation with ``peer_id`` (ours, or one it sent us) and
        mark it ``retracted``: its words are gone from history and from search results;
        whether there was such a text (not retracted before)."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE messages SET body = ?, state = 'retracted' WHERE peer_id = ? "
                "AND conversation = ? AND outgoing = ? AND message_id = ? "
                "AND state != 'retracted'",
                (
                    self._cipher.seal(_message_ad(peer_id, outgoing, message_id), b""),
                    peer_id,
                    peer_id,
                    int(outgoing),
                    message_id,
                ),
            ).rowcount
            return bool(changed)

    def mark_read_outgoing(self, peer_id: str, message_ids: Sequence[bytes]) -> list[bytes]:
        """``peer_id`` read these texts of ours: ``read``, unless not sent yet or failed; the
        IDs newly marked."""
        with self._transaction() as db:
            marked = []
            for message_id in message_ids:
                changed = db.execute(
                    "UPDATE messages SET state = 'read' WHERE peer_id = ? AND conversation = ? "
                    "AND outgoing = 1 AND message_id = ? AND state IN ('sent', 'stored', "
                    "'delivered')",
                    (peer_id, peer_id, message_id),
                ).rowcount
                if changed:
                    marked.append(message_id)
            return marked

    def seen_base_key(self, peer_id: str, base_key: bytes) -> bool:
        return (
            self._db.execute(
                "SELECT 1 FROM base_keys WHERE peer_id = ? AND base_key = ?", (peer_id, base_key)
            ).fetchone()
            is not None
        )

    def mark_stored(
        self, peer_id: str, message_ids: Sequence[bytes], latencies_ms: Sequence[float]
    ) -> None:
        """Deposited on the store: out of the outbox, ``stored`` until a receipt comes."""
        with self._transaction() as db:
            for message_id, latency_ms in zip(message_ids, latencies_ms, strict=True):
                db.execute(
                    "UPDATE messages SET state = 'stored', path = 'stored', latency_ms = ? "
                    "WHERE peer_id = ? AND outgoing = 1 AND message_id = ? AND state = 'pending'",
                    (latency_ms, peer_id, message_id),
                )
                db.execute(
                    "DELETE FROM outbox WHERE peer_id = ? AND message_id = ?",
                    (peer_id, message_id),
                )

    def note_attempt(self, peer_id: str, message_ids: Sequence[bytes], error: str) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? "
                "WHERE peer_id = ? AND message_id = ?",
                [(error, peer_id, m) for m in message_ids],
            )

    def outbox(self, peer_id: str | None = None, *, limit: int = 1_000_000) -> list[OutboxItem]:
        """Pending envelopes in the order they were queued."""
        query = (
            "SELECT peer_id, message_id, kind, plaintext, envelope, attempts, created_ms "
            "FROM outbox "
            + ("WHERE peer_id = ? " if peer_id is not None else "")
            + "ORDER BY rowid LIMIT ?"
        )
        params: tuple[object, ...] = (peer_id, limit) if peer_id is not None else (limit,)
        out = []
        for peer, mid, kind, plaintext, envelope, attempts, created in self._db.execute(
            query, params
        ).fetchall():
            message_id = bytes(mid)
            opened = None
            if envelope is None:
                opened = self._cipher.open(_outbox_ad(str(peer), message_id), bytes(plaintext))
            out.append(
                OutboxItem(
                    str(peer),
                    message_id,
                    int(kind),
                    opened,
                    None if envelope is None else bytes(envelope),
                    int(attempts),
                    int(created),
                )
            )
        return out

    def outbox_peers(self) -> list[str]:
        return [str(r[0]) for r in self._db.execute("SELECT DISTINCT peer_id FROM outbox")]

    def _row(self, row: Any) -> MessageRow:
        seq, mid, peer, conv, outgoing, sent, received, body, state, path, latency = row
        message_id, peer_id = bytes(mid), str(peer)
        text = self._cipher.open(
            _message_ad(peer_id, bool(outgoing), message_id),
            bytes(body),
        ).decode()
        return MessageRow(
            int(seq),
            message_id,
            peer_id,
            str(conv),
            bool(outgoing),
            int(sent),
            None if received is None else int(received),
            text,
            state,
            None if path is None else str(path),
            None if latency is None else float(latency),
        )

    def message(self, peer_id: str, message_id: bytes, *, outgoing: bool) -> MessageRow | None:
        row = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608
            "WHERE peer_id = ? AND outgoing = ? AND message_id = ?",
            (peer_id, int(outgoing), message_id),
        ).fetchone()
        return None if row is None else self._row(row)

    def outgoing_message(self, message_id: bytes) -> MessageRow | None:
        row = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE outgoing = 1 AND message_id = ?",  # noqa: S608
            (message_id,),
        ).fetchone()
        return None if row is None else self._row(row)

    def history(
        self, conversation: str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[MessageRow]:
        """The last ``limit`` messages of a conversation (before ``before_seq``), oldest first."""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation = ? AND seq < ? "  # noqa: S608
            "ORDER BY seq DESC LIMIT ?",
            (conversation, before_seq if before_seq is not None else 2**62, limit),
        ).fetchall()
        return [self._row(r) for r in reversed(rows)]

    def messages_after(self, seq: int, *, limit: int = 1000) -> list[MessageRow]:
        """Incoming texts with a sequence number above ``seq``, oldest first."""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq > ? AND outgoing = 0 "  # noqa: S608
            "AND conversation != '' ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [self._row(r) for r in rows]

    def recent(self, *, limit: int = 50, incoming_only: bool = False) -> list[MessageRow]:
        """The latest texts across every conversation, oldest first."""
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation != '' "  # noqa: S608
            + ("AND outgoing = 0 " if incoming_only else "")
            + "ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [self._row(r) for r in reversed(rows)]

    def conversations(self) -> list[tuple[str, int, int]]:
        """(conversation, message count, last sequence number), most recent first."""
        rows = self._db.execute(
            "SELECT conversation, count(*), max(seq) FROM messages WHERE conversation != '' "
            "GROUP BY conversation ORDER BY max(seq) DESC"
        ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def search(
        self, query: str, *, conversation: str | None = None, limit: int = 100
    ) -> list[MessageRow]:
        """Messages containing every word of ``query`` (whole words, case-insensitive),
        newest first."""
        tokens = sorted(self._cipher.tokens(query))
        if not tokens:
            return []
        placeholders = ",".join("?" * len(tokens))
        sql = (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq IN ("  # noqa: S608
            f"SELECT seq FROM (SELECT token, seq FROM search_tokens WHERE token IN ({placeholders})"
            f" UNION ALL SELECT token, seq FROM search_recent WHERE token IN ({placeholders})) "
            "GROUP BY seq HAVING count(DISTINCT token) = ?)"
            + " AND state != 'retracted'"
            + (" AND conversation = ?" if conversation is not None else "")
            + " ORDER BY seq DESC LIMIT ?"
        )
        params: list[object] = [*tokens, *tokens, len(tokens)]
        if conversation is not None:
            params.append(conversation)
        params.append(limit)
        return [self._row(r) for r in self._db.execute(sql, params).fetchall()]

    def last_seq(self) -> int:
        return int(self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0])
