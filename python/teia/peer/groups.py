"""Groups: a signed membership chain, sender keys, and messages fanned out pairwise.

``peer.groups`` (a `Groups`) creates groups, adds and removes members, renames them and sends
texts to them. Everything it says to other members is an application payload named
``teia.group`` (`Peer.send_app`), so it is end-to-end encrypted over the pairwise sessions,
retried, and deposited in the store inboxes of members who are offline.

**Membership** is a chain of signed states (`teia.peer.groupwire.GroupState`): version 0 is
signed by the creator (its first admin; the group ID is derived from the creator's peer ID),
each later version names the hash of the one before and is accepted only when signed by an
admin *of the state before it*. A change that does not extend the chain held — forged,
replayed, forked — is refused (`GroupChangeRefused`); one that arrives before its predecessor
is held back (parked, bounded) until the predecessor arrives. A peer learns a group it is not
in yet from the admin who signed the state adding it, together with the headers of every
version before it (`GroupJoin`; several pages of them when they do not fit one payload, kept
until they cover every version: at most `MAX_JOIN_PROOF` bytes, `MAX_PENDING_JOINS` joins in
all and `MAX_PENDING_JOINS_PER_SENDER` per sender, for `PARKED_TTL_MS`), and checks that chain
back to the creator (`check_chain`) before it takes the group; from then on it follows the
chain.

**Messages** are encrypted once with the sender's own sending chain (`GroupSenderKey`), signed
by it, then handed to each other member over its pairwise session. A member gives its chain to
the others (a distribution message, over the pairwise sessions) when it joins, to members
added later (from its current iteration: they cannot read what came before), and — a new
chain — whenever a member is removed: the removed member never receives the new chains, so
it cannot read what is sent after the removal even if it obtains the ciphertext. Receivers
keep the last few chains of each member (messages sent just before a rotation still open).

A payload that cannot be placed yet — a key or message from a peer the held state does not
list, naming a newer version than the one held; anything for a group not known yet — is parked
(at most `MAX_PARKED_PER_SENDER` per sender, `MAX_PARKED_PER_GROUP` per group,
`MAX_PARKED` in all, for `PARKED_TTL_MS`) and taken again whenever the group's state advances.
Anything else that does not fit is refused with a `GroupError` (counted in `Groups.stats`).

Group texts go into the normal history under the conversation ``group:<hex id>``:
`Peer.messages` yields them, `Groups.history` reads them, `Peer.search` finds them.

At rest (the profile's database, same file): states, our sending chains, the chains received,
the control payloads still to send, unfinished fan-outs and the parked payloads are sealed with
the row cipher. State changes commit together with the key changes and the payloads they cause
(an outbox of their own, emptied into `Peer.send_app` in order), so a crash never loses a
rotation or an announcement. A group text commits to our history with our advanced chain and
its fan-out (payload, members to reach); a fan-out cut short is finished at the next start.

Nothing here logs content, names or keys.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio

from teia.crypto import GroupReceiverKey, GroupSenderKey
from teia.errors import (
    GroupChangeRefused,
    GroupError,
    InvalidGroupMessage,
    NotGroupMember,
    TeiaError,
    UnknownGroup,
)
from teia.identity import PeerId
from teia.peer.db import MessageRow, PeerDatabase, now_ms
from teia.peer.groupwire import (
    GROUP_APP,
    MAX_GROUP_NAME,
    MAX_MEMBERS,
    GroupHeader,
    GroupJoin,
    GroupLeave,
    GroupMessage,
    GroupPayload,
    GroupState,
    GroupText,
    KeyDistribution,
    derive_group_id,
)

if TYPE_CHECKING:
    from teia.peer.peer import AppMessage, Peer

__all__ = ["GroupInfo", "GroupSent", "Groups", "conversation_of", "parse_group_id", "stored_groups"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUPS: Final = 4096
"""Groups a profile keeps (joined or left)."""
MAX_PARKED: Final = 1024
MAX_PARKED_PER_GROUP: Final = 256
MAX_PARKED_PER_SENDER: Final = 64
PARKED_TTL_MS: Final = 14 * 86_400_000
MAX_JOIN_PROOF: Final = 8 * 1024 * 1024
"""Bytes of headers proving a group's chain to a new member (~30,000 versions): an admin adds
nobody to a group whose proof is longer, and a joiner keeps no more of a paged join."""
MAX_PENDING_JOINS: Final = 8
"""Paged joins a profile keeps unfinished at once, and per sender (below)."""
MAX_PENDING_JOINS_PER_SENDER: Final = 2
_CHAINS_KEPT: Final = 4
"""Sending chains kept per member and group (messages sent before a rotation still open)."""
_FAN_OUT: Final = 64
"""Pairwise sends in flight at once during a fan-out."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS group_headers (
    group_id BLOB NOT NULL,
    version INTEGER NOT NULL,
    header BLOB NOT NULL,
    PRIMARY KEY (group_id, version)
);
CREATE TABLE IF NOT EXISTS group_states (
    group_id BLOB PRIMARY KEY,
    version INTEGER NOT NULL,
    member INTEGER NOT NULL,
    state BLOB NOT NULL,
    previous BLOB,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_sender_keys (group_id BLOB PRIMARY KEY, key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS group_receiver_keys (
    group_id BLOB NOT NULL,
    peer_id TEXT NOT NULL,
    chain_id INTEGER NOT NULL,
    key BLOB NOT NULL,
    added INTEGER NOT NULL,
    PRIMARY KEY (group_id, peer_id, chain_id)
);
CREATE TABLE IF NOT EXISTS group_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id BLOB NOT NULL,
    peer_id TEXT NOT NULL,
    token BLOB NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS group_fanout (
    message_id BLOB PRIMARY KEY,
    group_id BLOB NOT NULL,
    payload BLOB NOT NULL,
    peers TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS group_parked (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id BLOB NOT NULL,
    peer_id TEXT NOT NULL,
    message_id BLOB NOT NULL,
    needs INTEGER NOT NULL,
    data BLOB NOT NULL,
    sent_ms INTEGER NOT NULL,
    path TEXT NOT NULL,
    parked_ms INTEGER NOT NULL,
    UNIQUE (peer_id, message_id)
);
CREATE INDEX IF NOT EXISTS group_parked_by_group ON group_parked (group_id, needs);
CREATE TABLE IF NOT EXISTS group_join_pages (
    group_id BLOB NOT NULL,
    peer_id TEXT NOT NULL,
    state_hash BLOB NOT NULL,
    first INTEGER NOT NULL,
    count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    page BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, peer_id, state_hash, first)
);
"""


def conversation_of(group_id: bytes | str) -> str:
    """The history conversation of a group: ``group:<hex id>``."""
    return "group:" + (group_id.hex() if isinstance(group_id, bytes) else group_id)


def _header_ad(group_id: bytes, version: int) -> bytes:
    return b"group-header\0" + group_id + version.to_bytes(4, "big")


def _state_ad(group_id: bytes) -> bytes:
    return b"group-state\0" + group_id


def _previous_ad(group_id: bytes) -> bytes:
    return b"group-previous\0" + group_id


def _sender_ad(group_id: bytes) -> bytes:
    return b"group-sender\0" + group_id


def _receiver_ad(group_id: bytes, peer: str, chain_id: int) -> bytes:
    return b"group-receiver\0" + group_id + peer.encode() + b"\0" + chain_id.to_bytes(4, "big")


def _outbox_ad(group_id: bytes, peer: str, token: bytes) -> bytes:
    return b"group-outbox\0" + group_id + peer.encode() + b"\0" + token


def _fanout_ad(message_id: bytes) -> bytes:
    return b"group-fanout\0" + message_id


def _page_ad(group_id: bytes, peer: str, state_hash: bytes, first: int) -> bytes:
    where = peer.encode() + b"\0" + state_hash + first.to_bytes(4, "big")
    return b"group-join-page\0" + group_id + where


def _parked_ad(peer: str, message_id: bytes) -> bytes:
    return b"group-parked\0" + peer.encode() + b"\0" + message_id


# --- what the application sees ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group as this peer holds it."""

    group_id: str
    """Hex of the 16-byte group ID."""
    name: str
    version: int
    members: tuple[PeerId, ...]
    admins: tuple[PeerId, ...]
    joined: bool
    """Whether we are a member of the state held (False once removed)."""

    @property
    def conversation(self) -> str:
        """Its conversation in history (``group:<hex id>``)."""
        return conversation_of(self.group_id)

    @classmethod
    def of(cls, state: GroupState, joined: bool) -> GroupInfo:
        return cls(
            state.group_id.hex(),
            state.name,
            state.version,
            state.members,
            state.admins,
            joined,
        )


@dataclass(frozen=True, slots=True)
class GroupSent:
    """A group text sent: its ID in history, and the pairwise payload queued for each member
    (`Peer.wait_delivered` takes those)."""

    message_id: str
    deliveries: dict[PeerId, str]


@dataclass(frozen=True, slots=True)
class _Held:
    state: GroupState
    joined: bool
    previous: GroupState | None = None
    """The version before ``state`` (to settle a concurrent change of the same version)."""


@dataclass(frozen=True, slots=True)
class _Incoming:
    sender: PeerId
    message_id: bytes
    data: bytes
    sent_ms: int
    path: str


# --- the tables (called on the peer's database thread) -------------------------------------


class _Tables:
    """The group tables of one profile database; every method runs on the DB thread."""

    def __init__(self, db: PeerDatabase) -> None:
        self.db = db

    def setup(self) -> None:
        self.db.ensure_schema(_SCHEMA)
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM group_parked WHERE parked_ms < ?", (now_ms() - PARKED_TTL_MS,)
            )
            conn.execute(
                "DELETE FROM group_join_pages WHERE received_ms < ?", (now_ms() - PARKED_TTL_MS,)
            )

    def _held(self, group_id: bytes, member: int, sealed: bytes, previous: Any) -> _Held:
        raw = self.db.cipher.open(_state_ad(group_id), sealed)
        before = None
        if previous is not None:
            before = GroupState.decode(self.db.cipher.open(_previous_ad(group_id), previous))
        return _Held(GroupState.decode(raw), bool(member), before)

    def load(self, group_id: bytes) -> _Held | None:
        rows = self.db.read(
            "SELECT member, state, previous FROM group_states WHERE group_id = ?", (group_id,)
        )
        return self._held(group_id, rows[0][0], bytes(rows[0][1]), rows[0][2]) if rows else None

    def all(self) -> list[_Held]:
        rows = self.db.read(
            "SELECT group_id, member, state, previous FROM group_states ORDER BY rowid"
        )
        return [self._held(bytes(g), m, bytes(s), p) for g, m, s, p in rows]

    def count(self) -> int:
        return int(self.db.read("SELECT count(*) FROM group_states")[0][0])

    def headers(self, group_id: bytes, below: int) -> list[GroupHeader] | None:
        """The headers of versions 0 to ``below`` - 1, or None when one is missing."""
        rows = self.db.read(
            "SELECT version, header FROM group_headers WHERE group_id = ? AND version < ? "
            "ORDER BY version",
            (group_id, below),
        )
        if [int(v) for v, _ in rows] != list(range(below)):
            return None
        return [
            GroupHeader.decode(self.db.cipher.open(_header_ad(group_id, int(v)), bytes(h)))
            for v, h in rows
        ]

    def key_holders(self, group_id: bytes) -> int:
        """How many members' chains we hold for a group."""
        rows = self.db.read(
            "SELECT count(DISTINCT peer_id) FROM group_receiver_keys WHERE group_id = ?",
            (group_id,),
        )
        return int(rows[0][0])

    def sender_key(self, group_id: bytes) -> bytes | None:
        rows = self.db.read("SELECT key FROM group_sender_keys WHERE group_id = ?", (group_id,))
        return self.db.cipher.open(_sender_ad(group_id), bytes(rows[0][0])) if rows else None

    def receiver_key(self, group_id: bytes, peer: str, chain_id: int) -> bytes | None:
        rows = self.db.read(
            "SELECT key FROM group_receiver_keys WHERE group_id = ? AND peer_id = ? "
            "AND chain_id = ?",
            (group_id, peer, chain_id),
        )
        if not rows:
            return None
        return self.db.cipher.open(_receiver_ad(group_id, peer, chain_id), bytes(rows[0][0]))

    def receiver_keys(self, group_id: bytes) -> list[tuple[str, bytes]]:
        """Every chain held for a group: (peer, serialised receiver key)."""
        rows = self.db.read(
            "SELECT peer_id, chain_id, key FROM group_receiver_keys WHERE group_id = ?",
            (group_id,),
        )
        return [
            (str(p), self.db.cipher.open(_receiver_ad(group_id, str(p), int(c)), bytes(k)))
            for p, c, k in rows
        ]

    def _put_sender_key(self, conn: sqlite3.Connection, group_id: bytes, key: bytes) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO group_sender_keys (group_id, key) VALUES (?, ?)",
            (group_id, self.db.cipher.seal(_sender_ad(group_id), key)),
        )

    def _queue(
        self, conn: sqlite3.Connection, group_id: bytes, sends: Iterable[tuple[str, bytes]]
    ) -> None:
        for peer, payload in sends:
            token = secrets.token_bytes(16)
            conn.execute(
                "INSERT INTO group_outbox (group_id, peer_id, token, payload) VALUES (?, ?, ?, ?)",
                (
                    group_id,
                    peer,
                    token,
                    self.db.cipher.seal(_outbox_ad(group_id, peer, token), payload),
                ),
            )

    def commit_state(
        self,
        state: GroupState,
        joined: bool,
        *,
        previous: GroupState | None,
        sender_key: bytes | None,
        forget_peers: Sequence[str],
        sends: Sequence[tuple[str, bytes]],
        headers: Sequence[GroupHeader] = (),
    ) -> None:
        """A new state, with what it changes (our chain, chains dropped, payloads to send) and
        the headers of the chain (``headers``: those a join brought; the state's own always)."""
        group_id = state.group_id
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO group_headers (group_id, version, header) VALUES (?,?,?)",
                [
                    (
                        group_id,
                        h.version,
                        self.db.cipher.seal(_header_ad(group_id, h.version), h.encode()),
                    )
                    for h in (*headers, state.header())
                ],
            )
            sealed_previous = None
            if previous is not None:
                sealed_previous = self.db.cipher.seal(_previous_ad(group_id), previous.encode())
            conn.execute(
                "INSERT OR REPLACE INTO group_states (group_id, version, member, state, "
                "previous, updated_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    group_id,
                    state.version,
                    int(joined),
                    self.db.cipher.seal(_state_ad(group_id), state.encode()),
                    sealed_previous,
                    now_ms(),
                ),
            )
            if not joined:
                conn.execute("DELETE FROM group_sender_keys WHERE group_id = ?", (group_id,))
                conn.execute("DELETE FROM group_receiver_keys WHERE group_id = ?", (group_id,))
                conn.execute("DELETE FROM group_outbox WHERE group_id = ?", (group_id,))
            elif sender_key is not None:
                self._put_sender_key(conn, group_id, sender_key)
            conn.executemany(
                "DELETE FROM group_receiver_keys WHERE group_id = ? AND peer_id = ?",
                [(group_id, p) for p in forget_peers],
            )
            self._queue(conn, group_id, sends)

    def add_receiver_key(self, group_id: bytes, peer: str, chain_id: int, key: bytes) -> bool:
        """Keep a member's chain unless held already (a replay must not rewind it); only the
        newest `_CHAINS_KEPT` per member stay."""
        with self.db.transaction() as conn:
            if conn.execute(
                "SELECT 1 FROM group_receiver_keys WHERE group_id = ? AND peer_id = ? "
                "AND chain_id = ?",
                (group_id, peer, chain_id),
            ).fetchone():
                return False
            conn.execute(
                "INSERT INTO group_receiver_keys (group_id, peer_id, chain_id, key, added) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    group_id,
                    peer,
                    chain_id,
                    self.db.cipher.seal(_receiver_ad(group_id, peer, chain_id), key),
                    time.time_ns(),
                ),
            )
            conn.execute(
                "DELETE FROM group_receiver_keys WHERE group_id = ? AND peer_id = ? AND "
                "chain_id NOT IN (SELECT chain_id FROM group_receiver_keys WHERE group_id = ? "
                "AND peer_id = ? ORDER BY added DESC LIMIT ?)",
                (group_id, peer, group_id, peer, _CHAINS_KEPT),
            )
            return True

    def take_text(
        self, group_id: bytes, incoming: _Incoming, chain_id: int, key: bytes, text: str
    ) -> int | None:
        """A received group text into history, with the chain advanced past it."""
        peer = str(incoming.sender)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE group_receiver_keys SET key = ? WHERE group_id = ? AND peer_id = ? "
                "AND chain_id = ?",
                (
                    self.db.cipher.seal(_receiver_ad(group_id, peer, chain_id), key),
                    group_id,
                    peer,
                    chain_id,
                ),
            )
            return self.db.insert_history(
                conn,
                message_id=incoming.message_id,
                peer_id=peer,
                conversation=conversation_of(group_id),
                outgoing=False,
                sent_ms=incoming.sent_ms,
                text=text,
                state="received",
                path=incoming.path,
            )

    def sent_text(
        self,
        group_id: bytes,
        me: str,
        message_id: bytes,
        key: bytes,
        text: str,
        sent_ms: int,
        fanout: tuple[bytes, Sequence[str]],
    ) -> None:
        """Our group text into history, with our chain advanced past it and its fan-out
        (payload, members) to do, before it leaves."""
        payload, peers = fanout
        with self.db.transaction() as conn:
            self._put_sender_key(conn, group_id, key)
            conn.execute(
                "INSERT INTO group_fanout (message_id, group_id, payload, peers) "
                "VALUES (?, ?, ?, ?)",
                (
                    message_id,
                    group_id,
                    self.db.cipher.seal(_fanout_ad(message_id), payload),
                    json.dumps(list(peers)),
                ),
            )
            self.db.insert_history(
                conn,
                message_id=message_id,
                peer_id=me,
                conversation=conversation_of(group_id),
                outgoing=True,
                sent_ms=sent_ms,
                text=text,
                state="sent",
            )

    def fanouts(self) -> list[tuple[bytes, bytes, list[str]]]:
        """Fan-outs of our texts not finished: (message ID, payload, members left)."""
        rows = self.db.read("SELECT message_id, payload, peers FROM group_fanout LIMIT 1024")
        return [
            (
                bytes(m),
                self.db.cipher.open(_fanout_ad(bytes(m)), bytes(p)),
                [str(x) for x in json.loads(peers)],
            )
            for m, p, peers in rows
        ]

    def fanned(self, message_id: bytes, left: Sequence[str]) -> None:
        """A fan-out went as far as it could: done, or these members are left."""
        with self.db.transaction() as conn:
            if left:
                conn.execute(
                    "UPDATE group_fanout SET peers = ? WHERE message_id = ?",
                    (json.dumps(list(left)), message_id),
                )
            else:
                conn.execute("DELETE FROM group_fanout WHERE message_id = ?", (message_id,))

    def has_text(self, peer: str, message_id: bytes) -> bool:
        return self.db.message(peer, message_id, outgoing=False) is not None

    def outbox(self, group_id: bytes | None) -> list[tuple[int, bytes, str, bytes]]:
        """Control payloads still to send: (seq, group, peer, payload), in order."""
        if group_id is None:
            rows = self.db.read(
                "SELECT seq, group_id, peer_id, token, payload FROM group_outbox "
                "ORDER BY seq LIMIT 4096"
            )
        else:
            rows = self.db.read(
                "SELECT seq, group_id, peer_id, token, payload FROM group_outbox "
                "WHERE group_id = ? ORDER BY seq LIMIT 4096",
                (group_id,),
            )
        return [
            (
                int(s),
                bytes(g),
                str(p),
                self.db.cipher.open(_outbox_ad(bytes(g), str(p), bytes(t)), bytes(d)),
            )
            for s, g, p, t, d in rows
        ]

    def sent(self, seqs: Sequence[int]) -> None:
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM group_outbox WHERE seq = ?", [(s,) for s in seqs])

    def park(self, group_id: bytes, needs: int, incoming: _Incoming) -> None:
        peer = str(incoming.sender)
        with self.db.transaction() as conn:
            (total,) = conn.execute("SELECT count(*) FROM group_parked").fetchone()
            (in_group,) = conn.execute(
                "SELECT count(*) FROM group_parked WHERE group_id = ?", (group_id,)
            ).fetchone()
            (from_sender,) = conn.execute(
                "SELECT count(*) FROM group_parked WHERE peer_id = ?", (peer,)
            ).fetchone()
            if (
                total >= MAX_PARKED
                or in_group >= MAX_PARKED_PER_GROUP
                or from_sender >= MAX_PARKED_PER_SENDER
            ):
                raise GroupError("too many group payloads waiting for their group's state")
            conn.execute(
                "INSERT OR IGNORE INTO group_parked (group_id, peer_id, message_id, needs, data, "
                "sent_ms, path, parked_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    group_id,
                    peer,
                    incoming.message_id,
                    needs,
                    self.db.cipher.seal(_parked_ad(peer, incoming.message_id), incoming.data),
                    incoming.sent_ms,
                    incoming.path,
                    now_ms(),
                ),
            )

    def unpark(self, group_id: bytes, version: int) -> list[_Incoming]:
        """Take (and delete) the parked payloads of a group that its state ``version`` lets
        through, in arrival order."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT seq, peer_id, message_id, data, sent_ms, path FROM group_parked "
                "WHERE group_id = ? AND needs <= ? ORDER BY seq",
                (group_id, version),
            ).fetchall()
            conn.executemany("DELETE FROM group_parked WHERE seq = ?", [(r[0],) for r in rows])
        out = []
        for _, peer, mid, data, sent, path in rows:
            message_id = bytes(mid)
            with contextlib.suppress(TeiaError):
                out.append(
                    _Incoming(
                        PeerId.from_string(str(peer)),
                        message_id,
                        self.db.cipher.open(_parked_ad(str(peer), message_id), bytes(data)),
                        int(sent),
                        str(path),
                    )
                )
        return out

    def parked_count(self) -> int:
        return int(self.db.read("SELECT count(*) FROM group_parked")[0][0])

    def add_join_page(self, join: GroupJoin, sender: str) -> list[GroupHeader] | None:
        """Keep one page of a paged join from ``sender``; once the pages held for its state
        cover versions 0 to ``state.version`` - 1, take them out and return their headers in
        order (None until then). `GroupError` past the limits, nothing kept then."""
        group_id, state_hash = join.group_id, join.state.digest()
        page = join.encode()
        key = (group_id, sender, state_hash)
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM group_join_pages WHERE received_ms < ?", (now_ms() - PARKED_TTL_MS,)
            )
            pending = {
                (bytes(g), str(p), bytes(h))
                for g, p, h in conn.execute(
                    "SELECT DISTINCT group_id, peer_id, state_hash FROM group_join_pages"
                )
            }
            if key not in pending and (
                len(pending) >= MAX_PENDING_JOINS
                or sum(p == sender for _, p, _ in pending) >= MAX_PENDING_JOINS_PER_SENDER
            ):
                raise GroupError("too many group joins waiting for the rest of their pages")
            (held,) = conn.execute(
                "SELECT coalesce(sum(size), 0) FROM group_join_pages "
                "WHERE group_id = ? AND peer_id = ? AND state_hash = ?",
                key,
            ).fetchone()
            if held + len(page) > MAX_JOIN_PROOF:
                raise GroupError("a group join whose proof is over the limit")
            conn.execute(
                "INSERT OR IGNORE INTO group_join_pages (group_id, peer_id, state_hash, first, "
                "count, size, page, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *key,
                    join.first,
                    len(join.headers),
                    len(page),
                    self.db.cipher.seal(_page_ad(*key, join.first), page),
                    now_ms(),
                ),
            )
            rows = conn.execute(
                "SELECT first, count, page FROM group_join_pages "
                "WHERE group_id = ? AND peer_id = ? AND state_hash = ? ORDER BY first",
                key,
            ).fetchall()
            covered = 0
            for first, count, _ in rows:
                if first != covered:
                    return None  # a gap (a page still on its way) or pages that overlap
                covered += count
            if covered != join.state.version:
                return None
            conn.execute(
                "DELETE FROM group_join_pages WHERE group_id = ? AND peer_id = ? "
                "AND state_hash = ?",
                key,
            )
        headers: list[GroupHeader] = []
        for first, _, sealed in rows:
            opened = self.db.cipher.open(_page_ad(*key, int(first)), bytes(sealed))
            headers += GroupJoin.decode(opened).headers
        return headers

    def join_pages(self) -> int:
        """Pages of unfinished joins held."""
        return int(self.db.read("SELECT count(*) FROM group_join_pages")[0][0])


# --- the manager ----------------------------------------------------------------------------


class Groups:
    """The groups of one peer (``peer.groups``); see the module docstring.

    Groups are named by their hex ID (`GroupInfo.group_id`) or a `GroupInfo`; members by peer
    ID or contact name. Local changes need us to be an admin of the group (`NotGroupMember`).
    """

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._tables = _Tables(peer.profile.db)
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._held_cache: dict[bytes, _Held | None] = {}
        self.stats: dict[str, int] = {
            "changes": 0,
            "refused": 0,
            "parked": 0,
            "keys": 0,
            "received": 0,
            "sent": 0,
            "join_pages": 0,
            "left": 0,
        }
        """Counts (metadata only) for metrics and tests."""
        self._queued: set[str] = set()
        peer.on_app(GROUP_APP, self._handle)

    async def start(self) -> None:
        """Create the tables, drop expired parked payloads, send what a previous run left."""
        await self._db(self._tables.setup)
        async with self._lock:
            await self._flush(None)
            await self._resume_fan_outs()

    async def _db(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return await self._peer.run_db(fn, *args, **kwargs)

    # --- reading ------------------------------------------------------------------------------

    async def list(self) -> builtins.list[GroupInfo]:
        """Every group held, joined or left, in the order they became known."""
        return [GroupInfo.of(h.state, h.joined) for h in await self._db(self._tables.all)]

    async def get(self, group: GroupInfo | str) -> GroupInfo:
        """A group by hex ID; `UnknownGroup` if absent."""
        held = await self._held(group)
        return GroupInfo.of(held.state, held.joined)

    async def members(self, group: GroupInfo | str) -> builtins.list[PeerId]:
        return list((await self._held(group)).state.members)

    async def history(
        self, group: GroupInfo | str, *, limit: int = 100, before_seq: int | None = None
    ) -> builtins.list[MessageRow]:
        """The group's conversation, oldest first (ours and the others' texts)."""
        group_id = parse_group_id(group)
        db = self._peer.profile.db
        return await self._peer.run_db(
            db.history, conversation_of(group_id), limit=limit, before_seq=before_seq
        )

    async def wait_version(self, group: GroupInfo | str, version: int) -> GroupInfo:
        """Wait until we hold the group at ``version`` or later; bound it with
        ``anyio.fail_after``."""
        group_id = parse_group_id(group)
        while True:
            waiter = self._changed
            held = await self._load(group_id)
            if held is not None and held.state.version >= version:
                return GroupInfo.of(held.state, held.joined)
            await waiter.wait()

    async def _load(self, group_id: bytes) -> _Held | None:
        """The state held (cached: only this process writes the profile while online)."""
        if group_id in self._held_cache:
            return self._held_cache[group_id]
        held = await self._db(self._tables.load, group_id)
        if held is not None:  # absent groups are not cached: a stranger could fill the cache
            self._held_cache[group_id] = held
        return held

    async def wait_keys(self, group: GroupInfo | str, count: int) -> None:
        """Wait until we hold the sending chains of ``count`` other members (each member's
        chain arrives over its pairwise session after it joins); bound it with
        ``anyio.fail_after``."""
        group_id = parse_group_id(group)
        while True:
            waiter = self._changed
            if await self._db(self._tables.key_holders, group_id) >= count:
                return
            await waiter.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _held(self, group: GroupInfo | str) -> _Held:
        group_id = parse_group_id(group)
        held = await self._load(group_id)
        if held is None:
            raise UnknownGroup(f"no group {group_id.hex()}")
        return held

    # --- changing -----------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        members: Sequence[PeerId | str] = (),
        *,
        admins: Sequence[PeerId | str] = (),
    ) -> GroupInfo:
        """A new group with us as its first admin; ``members`` and ``admins`` (members too)
        join at once. Returns when the group and its announcements are committed (delivery
        runs in the background)."""
        me = self._peer.peer_id
        listed = _unique([me, *[await self._peer.resolve(m) for m in members]])
        chosen = _unique([me, *[await self._peer.resolve(a) for a in admins]])
        if not set(chosen) <= set(listed):
            raise GroupError("every admin must be a member")
        _check_name(name)
        nonce = secrets.token_bytes(16)
        state = GroupState(
            derive_group_id(me, nonce),
            0,
            b"",
            name,
            tuple(listed),
            tuple(chosen),
            me,
            now_ms(),
            nonce,
        ).signed(self._peer.identity)
        async with self._lock:
            if await self._db(self._tables.count) >= MAX_GROUPS:
                raise GroupError(f"a profile keeps at most {MAX_GROUPS} groups")
            await self._commit(None, state, announce=True)
        return GroupInfo.of(state, True)

    async def add(
        self, group: GroupInfo | str, members: Sequence[PeerId | str], *, admin: bool = False
    ) -> GroupInfo:
        """Add members (as admins too with ``admin=True``; adding existing members as admins
        promotes them)."""
        new = [await self._peer.resolve(m) for m in members]

        def change(state: GroupState) -> tuple[str, builtins.list[PeerId], builtins.list[PeerId]]:
            listed = _unique([*state.members, *new])
            return state.name, listed, _unique([*state.admins, *(new if admin else [])])

        return await self._change(group, change)

    async def remove(self, group: GroupInfo | str, members: Sequence[PeerId | str]) -> GroupInfo:
        """Remove members; every remaining member then moves to a new sending chain."""
        gone = {await self._peer.resolve(m) for m in members}
        return await self._change(group, _without(gone))

    async def rename(self, group: GroupInfo | str, name: str) -> GroupInfo:
        """Give the group a new name (at most 256 UTF-8 bytes)."""
        _check_name(name)
        return await self._change(group, lambda s: (name, list(s.members), list(s.admins)))

    async def leave(self, group: GroupInfo | str) -> GroupInfo:
        """Leave a group. An admin removes itself (a new version, as `remove` does; the only
        admin of a group with other members must make another member admin first). Any other
        member asks the admins to remove it (`GroupLeave`; the first admin to get it does) and
        leaves at once on its side: its keys are dropped, it can no longer send, and what the
        others send until its removal is refused. Leaving a group already left does nothing."""
        me = self._peer.peer_id
        async with self._lock:
            held = await self._held(group)
            current = held.state
            if not held.joined:
                return GroupInfo.of(current, False)
            if me in current.admins and len(current.members) > 1:
                if current.admins == (me,):
                    raise GroupError(
                        "the group's only admin cannot leave: make another member admin first"
                    )
                return await self._change_held(held, _without({me}))
            ask = GroupPayload(GroupLeave(current.group_id, current.version)).encode()
            sends = [(str(a), ask) for a in current.admins if a != me]
            await self._store(current, False, held.previous, sends=sends)
            return GroupInfo.of(current, False)

    async def _change(
        self,
        group: GroupInfo | str,
        change: Callable[[GroupState], tuple[str, builtins.list[PeerId], builtins.list[PeerId]]],
    ) -> GroupInfo:
        async with self._lock:
            return await self._change_held(await self._held(group), change)

    async def _change_held(
        self,
        held: _Held,
        change: Callable[[GroupState], tuple[str, builtins.list[PeerId], builtins.list[PeerId]]],
    ) -> GroupInfo:
        """Sign and commit the next version (under the lock)."""
        me = self._peer.peer_id
        current = held.state
        if not held.joined or me not in current.admins:
            raise NotGroupMember("only an admin of the group can change it")
        name, listed, chosen = change(current)
        if len(listed) > MAX_MEMBERS:
            raise GroupError(f"a group has at most {MAX_MEMBERS} members")
        state = GroupState(
            current.group_id,
            current.version + 1,
            current.digest(),
            name,
            tuple(listed),
            tuple(chosen),
            me,
            now_ms(),
        ).signed(self._peer.identity)
        await self._commit(held, state, announce=True)
        return GroupInfo.of(state, me in state.members)

    # --- sending ------------------------------------------------------------------------------

    async def send(self, group: GroupInfo | str, text: str) -> GroupSent:
        """Send a text to every other member: encrypted once with our sending chain, committed
        to our history, then queued pairwise for each member (delivered in the background)."""
        me = self._peer.peer_id
        message_id = self._peer.new_message_id()
        async with self._lock:
            held = await self._held(group)
            if not held.joined:
                raise NotGroupMember("we are not a member of this group")
            state = held.state
            await self._flush(state.group_id)
            raw = await self._db(self._tables.sender_key, state.group_id)
            if raw is None:
                raise GroupError("no sending chain for this group")
            key = GroupSenderKey.from_bytes(raw)
            plaintext = GroupText(state.group_id, message_id, text).encode()
            ciphertext = key.encrypt(plaintext)
            sent_ms = now_ms()
            payload = GroupPayload(
                GroupMessage(state.group_id, state.version, message_id, ciphertext)
            ).encode()
            others = [m for m in state.members if m != me]
            await self._db(
                self._tables.sent_text,
                state.group_id,
                str(me),
                message_id,
                key.to_bytes(),
                text,
                sent_ms,
                (payload, [str(m) for m in others]),
            )
            deliveries = await self._fan_out_text(message_id, payload, others)
            self.stats["sent"] += 1
        return GroupSent(message_id.hex(), deliveries)

    async def _fan_out_text(
        self, message_id: bytes, payload: bytes, members: Sequence[PeerId]
    ) -> dict[PeerId, str]:
        """Queue a text pairwise for ``members``, then record who is left (nobody, usually;
        everyone when cancelled: the next start sends it again)."""
        deliveries: dict[PeerId, str] = {}
        try:
            deliveries = await self._fan_out([(m, payload) for m in members])
        finally:
            with anyio.CancelScope(shield=True):
                left = [str(m) for m in members if m not in deliveries]
                await self._db(self._tables.fanned, message_id, left)
        return deliveries

    async def _resume_fan_outs(self) -> None:
        """Finish the fan-outs a previous run left (members who got one already ignore the
        second: it is in their history)."""
        for message_id, payload, peers in await self._db(self._tables.fanouts):
            members = []
            for peer in peers:
                with contextlib.suppress(TeiaError):
                    members.append(PeerId.from_string(peer))
            await self._fan_out_text(message_id, payload, members)

    async def _send(self, peer: PeerId, payload: bytes) -> str:
        message_id = await self._peer.send_app(peer, GROUP_APP, payload)
        if len(self._queued) < 100_000:
            self._queued.add(message_id)
        return message_id

    async def wait_delivered(self) -> None:
        """Wait until every pairwise payload queued by this process for groups (changes,
        keys, texts) is delivered or stored; bound it with ``anyio.fail_after``."""
        while self._queued:
            message_id = next(iter(self._queued))
            await self._peer.wait_delivered(message_id)
            self._queued.discard(message_id)

    async def _fan_out(self, sends: Sequence[tuple[PeerId, bytes]]) -> dict[PeerId, str]:
        """Queue each payload pairwise (a few at a time); the pairwise IDs."""
        out: dict[PeerId, str] = {}
        limiter = anyio.CapacityLimiter(_FAN_OUT)

        async def one(peer: PeerId, payload: bytes) -> None:
            async with limiter:
                try:
                    out[peer] = await self._send(peer, payload)
                except TeiaError as exc:
                    _log.warning("group payload not queued for a member: %s", type(exc).__name__)

        async with anyio.create_task_group() as tg:
            for peer, payload in sends:
                tg.start_soon(one, peer, payload)
        return out

    async def _flush(self, group_id: bytes | None) -> None:
        """Hand the control payloads still queued to `Peer.send_app`, in order (under the
        lock: they go out before any text that depends on them)."""
        while True:
            rows = await self._db(self._tables.outbox, group_id)
            if not rows:
                return
            # Each recipient's payloads go one by one, in order; recipients side by side.
            by_peer: dict[str, builtins.list[tuple[int, bytes]]] = {}
            for seq, _, peer, payload in rows:
                by_peer.setdefault(peer, []).append((seq, payload))
            done: builtins.list[int] = []
            failed: builtins.list[TeiaError] = []
            try:
                async with anyio.create_task_group() as tg:
                    for peer, items in by_peer.items():
                        tg.start_soon(self._flush_to, peer, items, done, failed)
            finally:
                if done:
                    with anyio.CancelScope(shield=True):
                        await self._db(self._tables.sent, done)
            if failed:
                # Kept for the next flush (the next change, text or start).
                _log.warning("group payloads left queued: %s", type(failed[0]).__name__)
                return

    async def _flush_to(
        self,
        peer: str,
        items: builtins.list[tuple[int, bytes]],
        done: builtins.list[int],
        failed: builtins.list[TeiaError],
    ) -> None:
        try:
            target = PeerId.from_string(peer)
            for seq, payload in items:
                await self._send(target, payload)
                done.append(seq)
        except TeiaError as exc:
            failed.append(exc)

    # --- the state machine --------------------------------------------------------------------

    async def _commit(
        self,
        held: _Held | None,
        state: GroupState,
        *,
        announce: bool,
        previous: GroupState | None = None,
        headers: Sequence[GroupHeader] = (),
    ) -> None:
        """Move a group from ``held`` to ``state`` (checked already; ``previous`` is the
        version before it, by default the one held; ``headers``, the chain a join brought):
        our chain, the chains of members who left, and the payloads that follow from it, in
        one transaction; then send them. Members new to the group get the state with the
        headers of every version before it (`GroupJoin`), so they can check it."""
        if previous is None and held is not None and state.prev_hash == held.state.digest():
            previous = held.state
        me = self._peer.peer_id
        joined = me in state.members
        was_joined = held is not None and held.joined
        before = set(held.state.members) if held is not None and was_joined else set()
        others = [m for m in state.members if m != me]
        sends: builtins.list[tuple[str, bytes]] = []
        if announce:
            seen = set(state.members) | (set(held.state.members) if held is not None else set())
            everyone = [m for m in _unique([*state.members, *seen]) if m != me]
            encoded = GroupPayload(state).encode()
            had = set(previous.members) if previous is not None else set()
            newcomers = {m for m in everyone if m not in had} if state.version else set()
            joining: builtins.list[bytes] = []
            if newcomers:
                chain = await self._db(self._tables.headers, state.group_id, state.version)
                if chain is None:
                    raise GroupError("this profile lacks the group's earlier versions")
                if sum(len(h.encode()) for h in chain) > MAX_JOIN_PROOF:
                    raise GroupError("the group's history is too long to prove to a new member")
                joining = [GroupPayload(page).encode() for page in GroupJoin.paged(state, chain)]
            sends += [
                (str(m), payload)
                for m in everyone
                for payload in (joining if m in newcomers else [encoded])
            ]
        sender_key: bytes | None = None
        gone = sorted(str(m) for m in before - set(state.members))
        if joined:
            raw = (
                None if not was_joined else await self._db(self._tables.sender_key, state.group_id)
            )
            if raw is None or gone:
                key = GroupSenderKey.generate()
                sender_key = key.to_bytes()
                targets = others
            else:
                key = GroupSenderKey.from_bytes(raw)
                targets = [m for m in others if m not in before]
            if targets:
                distribution = GroupPayload(
                    KeyDistribution(state.group_id, state.version, key.distribution_message())
                ).encode()
                sends += [(str(m), distribution) for m in targets]
        await self._store(
            state,
            joined,
            previous,
            sender_key=sender_key,
            forget_peers=gone,
            sends=sends,
            headers=headers,
        )

    async def _store(
        self,
        state: GroupState,
        joined: bool,
        previous: GroupState | None,
        *,
        sender_key: bytes | None = None,
        forget_peers: Sequence[str] = (),
        sends: Sequence[tuple[str, bytes]] = (),
        headers: Sequence[GroupHeader] = (),
    ) -> None:
        """Commit a group's state with what follows from it (`_Tables.commit_state`), then
        cache it, wake the waiters and send the payloads it queued."""
        await self._db(
            self._tables.commit_state,
            state,
            joined,
            previous=previous,
            sender_key=sender_key,
            forget_peers=forget_peers,
            sends=sends,
            headers=headers,
        )
        self._held_cache[state.group_id] = _Held(state, joined, previous)
        self.stats["changes"] += 1
        self._notify()
        await self._flush(state.group_id)

    async def _handle(self, message: AppMessage) -> None:
        incoming = _Incoming(
            message.sender, message.message_id, message.data, message.sent_ms, message.path
        )
        async with self._lock:
            try:
                group_id, advanced = await self._take(incoming)
            except TeiaError as exc:
                self.stats["refused"] += 1
                _log.info("group payload refused: %s", type(exc).__name__)
                raise
            if advanced:
                await self._drain(group_id)

    async def _drain(self, group_id: bytes) -> None:
        """Take again what was parked for a group whose state advanced (until nothing moves)."""
        while True:
            held = await self._load(group_id)
            if held is None:
                return
            waiting = await self._db(self._tables.unpark, group_id, held.state.version)
            if not waiting:
                return
            for incoming in waiting:
                with contextlib.suppress(TeiaError):  # a parked payload that now fails: gone
                    await self._take(incoming)

    async def _take(self, incoming: _Incoming) -> tuple[bytes, bool]:
        """Handle one payload; (its group, whether the group's state advanced)."""
        body = GroupPayload.decode(incoming.data).body
        if isinstance(body, GroupState):
            return body.group_id, await self._take_state(incoming, body)
        if isinstance(body, GroupJoin):
            return body.group_id, await self._take_join(incoming, body)
        if isinstance(body, KeyDistribution):
            await self._take_key(incoming, body)
        elif isinstance(body, GroupLeave):
            return body.group_id, await self._take_leave(incoming, body)
        else:
            await self._take_text(incoming, body)
        return body.group_id, False

    async def _park(self, group_id: bytes, needs: int, incoming: _Incoming) -> None:
        await self._db(self._tables.park, group_id, needs, incoming)
        self.stats["parked"] += 1

    async def _take_state(self, incoming: _Incoming, state: GroupState) -> bool:
        held = await self._load(state.group_id)
        sender = incoming.sender
        if held is not None and state.version <= held.state.version:
            if state.version == held.state.version and state.digest() == held.state.digest():
                return False  # what we hold already (a payload handed again)
            base = held.previous
            if (
                state.version == held.state.version
                and base is not None
                and state.prev_hash == base.digest()
                and state.signer in base.admins
                and (sender == state.signer or sender in base.members)
            ):
                # Two admins changed the same version at once: everyone keeps the state
                # with the smaller hash, so every member ends on the same one.
                if state.digest() < held.state.digest():
                    await self._commit(held, state, announce=False, previous=base)
                    return True
                raise GroupChangeRefused("a concurrent change that loses to the one held")
            raise GroupChangeRefused("a group state older than the one held (replayed or forked)")
        if held is not None and not held.joined and self._peer.peer_id not in state.members:
            return False  # a group we left (or were removed from) moving on without us
        if held is None or not held.joined:
            if state.version:
                # A later version joins only with the proof of its chain (`GroupJoin`), which
                # its signer sends new members; this one waits for that (a forged one forever).
                await self._park(state.group_id, state.version - 1, incoming)
                return False
            return await self._join(held, incoming, state, ())
        current = held.state
        if state.version > current.version + 1:
            await self._park(state.group_id, state.version - 1, incoming)
            return False
        if state.prev_hash != current.digest():
            raise GroupChangeRefused("a group change that does not extend the chain held")
        if state.signer not in current.admins:
            raise GroupChangeRefused("a group change not signed by an admin")
        if sender != state.signer and sender not in current.members:
            raise NotGroupMember("a group change passed on by a non-member")
        await self._commit(held, state, announce=False)
        return True

    async def _take_join(self, incoming: _Incoming, join: GroupJoin) -> bool:
        held = await self._load(join.group_id)
        if held is not None and held.joined:
            return await self._take_state(incoming, join.state)  # a member already
        if join.complete:
            return await self._join(held, incoming, join.state, join.headers)
        # One page of a join too long for one payload: kept until the pages cover the chain.
        self._check_joiner(incoming, join.state)
        headers = await self._db(self._tables.add_join_page, join, str(incoming.sender))
        if headers is None:
            self.stats["join_pages"] += 1
            return False
        return await self._join(held, incoming, join.state, headers)

    async def _take_leave(self, incoming: _Incoming, leave: GroupLeave) -> bool:
        """A member asks to be removed: an admin (a member still, and not the one asking)
        removes it at once. From anyone else, or about a group that no longer lists the
        sender, nothing happens (several admins get the same request)."""
        held = await self._load(leave.group_id)
        me = self._peer.peer_id
        sender = incoming.sender
        if held is None or not held.joined or me not in held.state.admins:
            return False
        if sender not in held.state.members or sender == me:
            return False
        if held.state.admins == (sender,):
            raise GroupError("the group's only admin cannot leave")
        await self._change_held(held, _without({sender}))
        self.stats["left"] += 1
        return True

    def _check_joiner(self, incoming: _Incoming, state: GroupState) -> None:
        if self._peer.peer_id not in state.members:
            raise NotGroupMember("a group state that does not list us")
        if state.signer != incoming.sender:
            raise GroupChangeRefused("a group is joined from the admin who signed its state")

    async def _join(
        self,
        held: _Held | None,
        incoming: _Incoming,
        state: GroupState,
        headers: Sequence[GroupHeader],
    ) -> bool:
        """Join (or re-join) from the admin who signed the state adding us, once the chain
        checks from the creator's version 0 to it (`check_chain`)."""
        self._check_joiner(incoming, state)
        check_chain(headers, state)
        if held is None and await self._db(self._tables.count) >= MAX_GROUPS:
            raise GroupError(f"a profile keeps at most {MAX_GROUPS} groups")
        await self._commit(held, state, announce=False, headers=headers)
        return True

    async def _placed(
        self, group_id: bytes, version: int, incoming: _Incoming
    ) -> GroupState | None:
        """The state a key or text from a member falls under; None when it was parked."""
        held = await self._load(group_id)
        if (
            held is not None
            and held.joined
            and incoming.sender in held.state.members
            and incoming.sender != self._peer.peer_id
        ):
            return held.state
        if held is None or version > held.state.version:
            await self._park(group_id, version, incoming)
            return None
        raise NotGroupMember("a group payload from a peer that is not a member")

    async def _take_key(self, incoming: _Incoming, body: KeyDistribution) -> None:
        state = await self._placed(body.group_id, body.version, incoming)
        if state is None:
            return
        key = GroupReceiverKey.from_distribution_message(body.distribution)
        if await self._db(
            self._tables.add_receiver_key,
            body.group_id,
            str(incoming.sender),
            key.chain_id,
            key.to_bytes(),
        ):
            self.stats["keys"] += 1
            self._notify()

    async def _take_text(self, incoming: _Incoming, body: GroupMessage) -> None:
        state = await self._placed(body.group_id, body.version, incoming)
        if state is None:
            return
        sender = str(incoming.sender)
        if await self._db(self._tables.has_text, sender, body.message_id):
            return  # handed again after a restart
        raw = await self._db(self._tables.receiver_key, body.group_id, sender, body.chain_id)
        if raw is None:
            if body.version > state.version:
                await self._park(body.group_id, body.version, incoming)
                return
            raise NotGroupMember("a group message on a chain we were not given")
        key = GroupReceiverKey.from_bytes(raw)
        text = GroupText.decode(key.decrypt(body.ciphertext))
        if text.group_id != body.group_id or text.message_id != body.message_id:
            raise InvalidGroupMessage("a group message whose inside does not match its outside")
        placed = _with_id(incoming, body.message_id)
        seq = await self._db(
            self._tables.take_text, body.group_id, placed, body.chain_id, key.to_bytes(), text.text
        )
        if seq is not None:
            self.stats["received"] += 1
            self._peer._history_changed()


# --- helpers ------------------------------------------------------------------------------------


def check_chain(headers: Sequence[GroupHeader], state: GroupState) -> None:
    """`GroupChangeRefused` unless ``headers`` are versions 0 to n - 1 of ``state``'s group,
    version 0 its creator's (the group ID derives from the signer) and signed by an admin of
    itself, and every later version — ``state`` last — names the hash of the one before and is
    signed by one of that one's admins. Signatures were checked when each was decoded."""
    links = [*headers, state.header()]
    first = links[0]
    if (
        first.version != 0
        or first.group_id != state.group_id
        or derive_group_id(first.signer, first.nonce) != state.group_id
        or first.signer not in first.admins
    ):
        raise GroupChangeRefused("the chain does not start with its creator's version 0")
    for before, after in itertools.pairwise(links):
        if (
            after.group_id != state.group_id
            or after.version != before.version + 1
            or after.prev_hash != before.digest()
        ):
            raise GroupChangeRefused("the chain is broken between two versions")
        if after.signer not in before.admins:
            raise GroupChangeRefused("the chain has a version not signed by an admin before it")


def parse_group_id(group: GroupInfo | str) -> bytes:
    """The 16-byte ID of a group given as a `GroupInfo`, hex, or ``group:<hex>``."""
    text = group.group_id if isinstance(group, GroupInfo) else group
    try:
        raw = bytes.fromhex(text.removeprefix("group:"))
    except ValueError:
        raise UnknownGroup(f"{text!r} is not a group ID") from None
    if len(raw) != 16:
        raise UnknownGroup(f"{text!r} is not a group ID")
    return raw


def _without(
    gone: set[PeerId],
) -> Callable[[GroupState], tuple[str, list[PeerId], list[PeerId]]]:
    """The change that takes ``gone`` off the members and admins (one admin stays)."""

    def change(state: GroupState) -> tuple[str, list[PeerId], list[PeerId]]:
        listed = [m for m in state.members if m not in gone]
        chosen = [a for a in state.admins if a not in gone]
        if not chosen:
            raise GroupError("a group keeps at least one admin")
        return state.name, listed, chosen

    return change


def _unique(peers: Iterable[PeerId]) -> list[PeerId]:
    return list(dict.fromkeys(peers))


def _check_name(name: str) -> None:
    if len(name.encode()) > MAX_GROUP_NAME:
        raise GroupError(f"a group name is at most {MAX_GROUP_NAME} UTF-8 bytes")


def _with_id(incoming: _Incoming, message_id: bytes) -> _Incoming:
    """The incoming payload under the group message's own ID (the same for every member)."""
    return _Incoming(incoming.sender, message_id, incoming.data, incoming.sent_ms, incoming.path)


def stored_groups(db: PeerDatabase) -> list[GroupInfo]:
    """The groups kept in a profile's database, read without going online."""
    tables = _Tables(db)
    tables.setup()
    return [GroupInfo.of(h.state, h.joined) for h in tables.all()]
