"""End-to-end encryption support for Matrix clients: device keys, one-time and fallback keys,
device-list changes and to-device messages (client-server API, local users).

The server only carries keys and ciphertext for the clients: it never holds a private key and
never sees the plaintext of an encrypted room (clients encrypt with Olm/Megolm, sending the
room keys to each other's devices as encrypted to-device messages). What it does:

- ``POST /keys/upload``: a device publishes its identity keys (``device_keys``, for its own
  user and device only), one-time keys and fallback keys; the answer counts the one-time keys
  left per algorithm.
- ``POST /keys/query``: the device keys of users (all their devices, or the ones named).
- ``POST /keys/claim``: takes one one-time key per device asked (a fallback key when none is
  left; it stays usable until replaced).
- ``GET /keys/changes``: users whose devices changed between two sync tokens.
- ``PUT /sendToDevice/{type}/{txn}``: messages to devices (``*``: every device of a user),
  idempotent per transaction ID; queued per device and handed out by sync in order, deleted
  once the device's next sync shows it has them.
- ``/sync`` carries ``to_device``, ``device_lists`` (``changed``: users sharing a room whose
  keys changed, and users who joined a shared room), ``device_one_time_keys_count`` and
  ``device_unused_fallback_key_types``.

Bounds: 100 users' keys a query or claim (more: `M_LIMIT_EXCEEDED`), 1,000 one-time keys held
per device, 1,000 to-device targets a request, 10,000 messages waiting per device (past that
the sender gets `M_LIMIT_EXCEEDED` and nothing is queued); every body is already bounded by
the request size limit.

Over federation (`teia.homeserver.federation`): queries and claims for users of other servers
are asked of those servers (``/user/keys/query``, ``/user/keys/claim``; 10 s each, in
parallel; one that fails is listed under ``failures``), to-device messages for their users go
as ``m.direct_to_device`` EDUs, and a local user's device change goes to every server sharing a
room with it as ``m.device_list_update`` (the receiver marks the user changed for its users).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from teia.errors import MatrixError
from teia.homeserver.storage import Database, Tx

__all__ = [
    "MAX_PENDING_TO_DEVICE",
    "MAX_QUERY_USERS",
    "E2eeStore",
    "check_device_keys",
    "local_targets",
    "remote_failures",
]

MAX_QUERY_USERS: Final = 100
MAX_ONE_TIME_KEYS: Final = 1_000
MAX_TO_DEVICE_TARGETS: Final = 1_000
MAX_PENDING_TO_DEVICE: Final = 10_000
TO_DEVICE_BATCH: Final = 100
MAX_ID: Final = 255


def _invalid(message: str, errcode: str = "M_INVALID_PARAM", status: int = 400) -> MatrixError:
    return MatrixError(status, errcode, message)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise _invalid(f"{what} must be a non-empty string of at most {MAX_ID}")
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_device_keys(keys: Any, user_id: str, device_id: str) -> dict[str, Any]:
    """The ``device_keys`` of an upload: an object for this very user and device, with its
    algorithms, keys and signatures (what clients verify; the server only checks the shape)."""
    if not isinstance(keys, dict):
        raise _invalid("device_keys must be an object")
    if keys.get("user_id") != user_id or keys.get("device_id") != device_id:
        raise _invalid("device_keys are for the uploading user and device only")
    algorithms = keys.get("algorithms")
    if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
        raise _invalid("device_keys.algorithms must be a list of strings")
    key_map = keys.get("keys")
    if not isinstance(key_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in key_map.items()
    ):
        raise _invalid("device_keys.keys must map key IDs to keys")
    if not isinstance(keys.get("signatures"), dict):
        raise _invalid("device_keys.signatures must be an object")
    return {k: v for k, v in keys.items() if k != "unsigned"}


def _split_key_id(key_id: Any) -> tuple[str, str]:
    text = _text(key_id, "a key ID")
    algorithm, colon, name = text.partition(":")
    if not colon or not algorithm or not name:
        raise _invalid("a key ID is ALGORITHM:ID")
    return algorithm, name


def _key_map(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be an object")
    for key_id, key in value.items():
        _split_key_id(key_id)
        if not isinstance(key, str | dict):
            raise _invalid(f"{what}: a key is a string or an object")
    return value


@dataclass(frozen=True, slots=True)
class SyncE2ee:
    """What one sync of one device carries from these tables."""

    to_device: list[dict[str, Any]]
    to_device_at: int
    """The device's to-device position after them (its sync token's part)."""
    more: bool
    """More to-device messages wait (the sync should return at once)."""
    keys_at: int
    changed: list[str]
    one_time_key_counts: dict[str, int]
    unused_fallback_types: list[str]


class E2eeStore:
    """The E2EE tables of the homeserver database (see the module docstring).

    A sync that has nothing new costs no database call: the newest to-device and device-change
    positions and each device's key counts are kept in memory once read (invalidated by the
    writes of this process, the one process of its database), and a device's messages are
    deleted once, when its sync token first shows it has them (and once for each device after
    a restart, for what an earlier process handed out)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._max_to_device: int | None = None
        self._max_change: int | None = None
        self._counts: dict[tuple[str, str], tuple[dict[str, int], list[str]]] = {}
        self._unacked: dict[tuple[str, str], int] = {}
        self._cleaned: set[tuple[str, str]] = set()

    # keys ----------------------------------------------------------------------------------

    async def upload(
        self, user_id: str, device_id: str, body: dict[str, Any]
    ) -> tuple[dict[str, int], bool]:
        """Store what a device uploads; (one-time key counts, whether its device keys
        changed)."""
        device_keys = body.get("device_keys")
        keys = None if device_keys is None else check_device_keys(device_keys, user_id, device_id)
        one_time = _key_map(body.get("one_time_keys"), "one_time_keys")
        fallback = _key_map(body.get("fallback_keys"), "fallback_keys")

        def fn(tx: Tx) -> tuple[dict[str, int], bool]:
            changed = False
            if keys is not None:
                encoded = _canonical(keys)
                row = tx.one(
                    "SELECT keys FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
                if row is None or row[0] != encoded:
                    tx.run(
                        "DELETE FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
                        (user_id, device_id),
                    )
                    tx.run(
                        "INSERT INTO e2e_device_keys (user_id, device_id, keys) VALUES (?, ?, ?)",
                        (user_id, device_id, encoded),
                    )
                    tx.run("INSERT INTO e2e_device_changes (user_id) VALUES (?)", (user_id,))
                    changed = True
            if one_time:
                (held,) = tx.one(
                    "SELECT count(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                ) or (0,)
                if held + len(one_time) > MAX_ONE_TIME_KEYS:
                    raise _invalid(f"a device holds at most {MAX_ONE_TIME_KEYS} one-time keys")
                for key_id, key in one_time.items():
                    algorithm, name = _split_key_id(key_id)
                    encoded = _canonical(key)
                    row = tx.one(
                        "SELECT key_json FROM e2e_one_time_keys WHERE user_id = ? AND "
                        "device_id = ? AND algorithm = ? AND key_id = ?",
                        (user_id, device_id, algorithm, name),
                    )
                    if row is not None:
                        if row[0] != encoded:
                            raise _invalid(f"one-time key {key_id} exists already")
                        continue
                    tx.run(
                        "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, "
                        "key_json) VALUES (?, ?, ?, ?, ?)",
                        (user_id, device_id, algorithm, name, encoded),
                    )
            for key_id, key in fallback.items():
                algorithm, name = _split_key_id(key_id)
                tx.run(
                    "DELETE FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? "
                    "AND algorithm = ?",
                    (user_id, device_id, algorithm),
                )
                tx.run(
                    "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, "
                    "key_json, used) VALUES (?, ?, ?, ?, ?, 0)",
                    (user_id, device_id, algorithm, name, _canonical(key)),
                )
            return _counts(tx, user_id, device_id), changed

        try:
            return await self.db.run(fn, write=True)
        finally:
            self._counts.pop((user_id, device_id), None)
            self._max_change = None

    async def query(self, wanted: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        """Device keys of local users: user → device → keys (all devices when none named)."""

        def fn(tx: Tx) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for user_id, devices in wanted.items():
                rows = tx.query(
                    "SELECT device_id, keys FROM e2e_device_keys WHERE user_id = ? "
                    "ORDER BY device_id",
                    (user_id,),
                )
                chosen = {
                    str(device): json.loads(keys)
                    for device, keys in rows
                    if not devices or device in devices
                }
                out[user_id] = chosen
            return out

        return await self.db.run(fn)

    async def claim(self, wanted: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
        """One one-time key per (user, device, algorithm) asked, removed as it is handed out;
        the device's fallback key of that algorithm when it has none left."""

        def fn(tx: Tx) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for user_id, devices in wanted.items():
                for device_id, algorithm in devices.items():
                    row = tx.one(
                        "SELECT key_id, key_json FROM e2e_one_time_keys WHERE user_id = ? "
                        "AND device_id = ? AND algorithm = ? ORDER BY key_id LIMIT 1",
                        (user_id, device_id, algorithm),
                    )
                    if row is not None:
                        tx.run(
                            "DELETE FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? "
                            "AND algorithm = ? AND key_id = ?",
                            (user_id, device_id, algorithm, row[0]),
                        )
                    else:
                        row = tx.one(
                            "SELECT key_id, key_json FROM e2e_fallback_keys WHERE user_id = ? "
                            "AND device_id = ? AND algorithm = ?",
                            (user_id, device_id, algorithm),
                        )
                        if row is None:
                            continue
                        tx.run(
                            "UPDATE e2e_fallback_keys SET used = 1 WHERE user_id = ? "
                            "AND device_id = ? AND algorithm = ?",
                            (user_id, device_id, algorithm),
                        )
                    out.setdefault(user_id, {})[device_id] = {
                        f"{algorithm}:{row[0]}": json.loads(row[1])
                    }
            return out

        try:
            return await self.db.run(fn, write=True)
        finally:
            for user_id, devices in wanted.items():
                for device_id in devices:
                    self._counts.pop((user_id, device_id), None)

    async def forget_device(self, user_id: str, device_id: str) -> None:
        """A device logged out: its keys and waiting messages go; its user's list changed."""

        def fn(tx: Tx) -> None:
            gone = 0
            for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys"):
                gone += tx.run(
                    f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?",  # noqa: S608
                    (user_id, device_id),
                )
            tx.run(
                "DELETE FROM to_device WHERE user_id = ? AND device_id = ?", (user_id, device_id)
            )
            if gone:
                tx.run("INSERT INTO e2e_device_changes (user_id) VALUES (?)", (user_id,))

        try:
            await self.db.run(fn, write=True)
        finally:
            key = (user_id, device_id)
            self._counts.pop(key, None)
            self._unacked.pop(key, None)
            self._cleaned.discard(key)
            self._max_change = None

    # device lists --------------------------------------------------------------------------

    async def note_change(self, user_id: str) -> None:
        """Record that ``user_id``'s devices changed (a remote user's, told by its server)."""
        try:
            await self.db.run(
                lambda tx: tx.run(
                    "INSERT INTO e2e_device_changes (user_id) VALUES (?)", (user_id,)
                ),
                write=True,
            )
        finally:
            self._max_change = None

    async def max_change(self) -> int:
        """The newest device-change position (kept in memory once read)."""
        cached = self._max_change
        if cached is None:
            row = await self.db.run(lambda tx: tx.one("SELECT max(stream) FROM e2e_device_changes"))
            cached = int(row[0]) if row is not None and row[0] is not None else 0
            if self._max_change is None:
                self._max_change = cached
        return cached

    async def _newest_to_device(self) -> int:
        cached = self._max_to_device
        if cached is None:
            row = await self.db.run(lambda tx: tx.one("SELECT max(stream) FROM to_device"))
            cached = int(row[0]) if row is not None and row[0] is not None else 0
            if self._max_to_device is None:
                self._max_to_device = cached
        return cached

    async def changed_users(self, user_id: str, after: int, upto: int) -> list[str]:
        """Users whose device keys changed in (``after``, ``upto``] and who are ``user_id``
        or share a joined room with it."""
        return await self.db.run(lambda tx: _changed_users(tx, user_id, after, upto))

    async def sharing_users(self, user_id: str) -> list[str]:
        """``user_id`` and every user sharing a joined room with it."""

        def fn(tx: Tx) -> list[str]:
            rows = tx.query(
                "SELECT DISTINCT m2.user_id FROM memberships m1 JOIN memberships m2 "
                "ON m1.room_id = m2.room_id WHERE m1.user_id = ? AND m1.membership = 'join' "
                "AND m2.membership = 'join'",
                (user_id,),
            )
            return sorted({user_id, *(str(r[0]) for r in rows)})

        return await self.db.run(fn)

    # to-device -----------------------------------------------------------------------------

    async def send_to_device(
        self,
        sender: str,
        sender_device: str,
        txn_id: str,
        event_type: str,
        messages: dict[str, dict[str, Any]],
        now_ms: int,
    ) -> tuple[bool, list[str]]:
        """Queue messages for local devices (``*``: all of a user's); (whether this
        transaction is new, the users reached)."""

        def fn(tx: Tx) -> tuple[bool, list[str]]:
            seen = tx.one(
                "SELECT 1 FROM to_device_txns WHERE sender = ? AND device_id = ? AND txn_id = ?",
                (sender, sender_device, txn_id),
            )
            if seen is not None:
                return False, []
            tx.run(
                "INSERT INTO to_device_txns (sender, device_id, txn_id, created_ts) "
                "VALUES (?, ?, ?, ?)",
                (sender, sender_device, txn_id, now_ms),
            )
            reached: set[str] = set()
            for user_id, devices in messages.items():
                for device_id, content in devices.items():
                    targets = _devices_of(tx, user_id) if device_id == "*" else [device_id]
                    for target in targets:
                        (waiting,) = tx.one(
                            "SELECT count(*) FROM to_device WHERE user_id = ? AND device_id = ?",
                            (user_id, target),
                        ) or (0,)
                        if waiting >= MAX_PENDING_TO_DEVICE:
                            raise _invalid(
                                f"{user_id}'s device {target} has too many messages waiting",
                                "M_LIMIT_EXCEEDED",
                                429,
                            )
                        tx.run(
                            "INSERT INTO to_device (user_id, device_id, sender, type, content) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (user_id, target, sender, event_type, _canonical(content)),
                        )
                        reached.add(user_id)
            return True, sorted(reached)

        try:
            return await self.db.run(fn, write=True)
        finally:
            self._max_to_device = None

    async def sync_info(
        self, user_id: str, device_id: str, since: tuple[int, int] | None
    ) -> SyncE2ee:
        """A device's sync: its to-device messages after ``since`` (to-device position,
        device-list position; None for an initial sync), deleting those the position shows it
        has; users whose devices changed; its one-time key counts. One database call at most,
        none when nothing moved."""
        key = (user_id, device_id)
        td_since, keys_since = (0, None) if since is None else since
        td_max = await self._newest_to_device()
        keys_max = await self.max_change()
        delete_upto = 0
        if td_since > 0:
            unacked = self._unacked.get(key)
            if key not in self._cleaned or (unacked is not None and td_since >= unacked):
                delete_upto = td_since
        read_messages = td_since < td_max
        read_changes = keys_since is not None and keys_since < keys_max
        cached = self._counts.get(key)
        if not (delete_upto or read_messages or read_changes) and cached is not None:
            return SyncE2ee([], td_since, False, keys_max, [], cached[0], cached[1])

        def fn(
            tx: Tx,
        ) -> tuple[list[tuple[Any, ...]], list[str], tuple[dict[str, int], list[str]] | None]:
            if delete_upto:
                tx.run(
                    "DELETE FROM to_device WHERE user_id = ? AND device_id = ? AND stream <= ?",
                    (user_id, device_id, delete_upto),
                )
            rows: list[tuple[Any, ...]] = []
            if read_messages:
                rows = tx.query(
                    "SELECT stream, sender, type, content FROM to_device WHERE user_id = ? "
                    "AND device_id = ? AND stream > ? ORDER BY stream LIMIT ?",
                    (user_id, device_id, td_since, TO_DEVICE_BATCH + 1),
                )
            changed = (
                _changed_users(tx, user_id, keys_since, keys_max)
                if read_changes and keys_since is not None
                else []
            )
            counts = None
            if cached is None:
                unused = tx.query(
                    "SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? "
                    "AND device_id = ? AND used = 0 ORDER BY algorithm",
                    (user_id, device_id),
                )
                counts = (_counts(tx, user_id, device_id), [str(r[0]) for r in unused])
            return rows, changed, counts

        rows, changed, counts = await self.db.run(fn, write=bool(delete_upto))
        if delete_upto:
            self._cleaned.add(key)
            if self._unacked.get(key, delete_upto + 1) <= delete_upto:
                del self._unacked[key]
        if counts is not None:
            self._counts[key] = counts
        else:
            assert cached is not None
            counts = cached
        more = len(rows) > TO_DEVICE_BATCH
        rows = rows[:TO_DEVICE_BATCH]
        events = [
            {"sender": str(sender), "type": str(kind), "content": json.loads(content)}
            for _, sender, kind, content in rows
        ]
        # Past every message written before this sync began (none of this device's is left
        # unread below it), unless a batch was cut short.
        at = int(rows[-1][0]) if more else max(td_since, td_max, *(int(r[0]) for r in rows))
        if events:
            self._unacked[key] = at
        return SyncE2ee(events, at, more, keys_max, changed, counts[0], counts[1])


def _changed_users(tx: Tx, user_id: str, after: int, upto: int) -> list[str]:
    rows = tx.query(
        "SELECT DISTINCT c.user_id FROM e2e_device_changes c "
        "WHERE c.stream > ? AND c.stream <= ? AND (c.user_id = ? OR c.user_id IN ("
        "SELECT m2.user_id FROM memberships m1 JOIN memberships m2 "
        "ON m1.room_id = m2.room_id WHERE m1.user_id = ? AND m1.membership = 'join' "
        "AND m2.membership = 'join')) ORDER BY c.user_id",
        (after, upto, user_id, user_id),
    )
    return [str(r[0]) for r in rows]


def _counts(tx: Tx, user_id: str, device_id: str) -> dict[str, int]:
    rows = tx.query(
        "SELECT algorithm, count(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? "
        "GROUP BY algorithm",
        (user_id, device_id),
    )
    return {str(algorithm): int(count) for algorithm, count in rows}


def _devices_of(tx: Tx, user_id: str) -> list[str]:
    rows = tx.query(
        "SELECT device_id FROM access_tokens WHERE user_id = ? UNION "
        "SELECT device_id FROM e2e_device_keys WHERE user_id = ?",
        (user_id, user_id),
    )
    return sorted(str(r[0]) for r in rows)


def local_targets(
    messages: Any, is_local: Any, *, limit: int = MAX_TO_DEVICE_TARGETS
) -> dict[str, dict[str, Any]]:
    """The ``messages`` of a sendToDevice body, checked, with only local users kept."""
    if not isinstance(messages, dict):
        raise _invalid("messages must be an object")
    out: dict[str, dict[str, Any]] = {}
    count = 0
    for user_id, devices in messages.items():
        _text(user_id, "a user ID")
        if not isinstance(devices, dict):
            raise _invalid("messages map users to devices")
        for device_id, content in devices.items():
            _text(device_id, "a device ID")
            if not isinstance(content, dict):
                raise _invalid("a to-device message's content is an object")
            count += 1
        if count > limit:
            raise _invalid(f"at most {limit} devices a request", "M_LIMIT_EXCEEDED", 429)
        if is_local(user_id):
            out[user_id] = devices
    return out


def remote_failures(users: Iterable[str], is_local: Any, server_of: Any) -> dict[str, Any]:
    """``failures`` of a query or claim: the servers of remote users (not fetched yet)."""
    return {
        server_of(user): {"status": 503, "message": "keys of remote users are not fetched yet"}
        for user in users
        if not is_local(user)
    }
