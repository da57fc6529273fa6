"""Multi-device accounts (issue 8): one account, several devices, every message on each.

An **account** is an Ed25519 key pair. Its ID is the peer-ID form of its public key
(``12D3KooW…``, like a device's; `PeerId.from_public_key`), so it can be written, compared and
given a safety number like any peer. Each **device** stays what it was: a `Peer` with its own
identity and its own pairwise sessions. The account key signs a versioned **device list**
(`DeviceList`); that list is the only thing that says which devices speak for the account.

The account key lives only on the device that created the account, the **primary** (sealed in
``peer.db`` with the profile's row cipher, so the keystore passphrase guards it as it guards the
sessions). Linked devices hold the list, not the key. This is deliberate: a device that is
removed (lost, stolen, sold) must not be able to sign itself back onto the list, and rotating a
shared key after every removal would change the account's identity under every contact. The
price: only the primary links and removes devices, and losing it freezes the list (the account
keeps working with the devices it lists; a new account is the way out).

Fan-out (the Sesame model): `Devices.send` sends one copy of the text to every device on the
recipient account's current list and a *sent transcript* to every other device of our own
account, each copy over the pairwise session with that device (`Peer.send_app`: ratcheted,
retried, stored when the device is offline). Every copy carries the sender account's signed list,
so a receiver can check the sending device against the newest list it knows (the carried one or
a newer one it holds). Receivers file the text under one conversation per account (the account
ID) and deduplicate by the logical message ID, so each device shows each message once.

Lists travel as ``teia.devices/list`` payloads: to a device being introduced (which answers with
its own), and, whenever the primary changes the list, to every device of every account we know
and to our own devices (the removed one included, so it learns it was removed). A list replaces
the held one only if its version is higher; a list whose signature is not the account key's, an
older version, or one sent by a device that is not on it, is refused.

With bootstrap nodes configured, the account's newest list is also in the DHT under
``/teia-devices/ ‖ account ID`` (`teia.dht.devicelists`): every device puts it there after
joining and checks hourly, the primary right after every change and re-signs it (the next
version, the same devices) once it is half-way through its 7-day DHT lifetime. `Devices.lookup`
fetches a list from the DHT, so `Devices.send` reaches an account by its ID alone, and a sender
whose list is past half that lifetime asks for a newer one first (hourly at most per account).

Linking (``/teia/devices/link/1.0.0``): the primary shows a short code (`LinkCode`: a 40-bit
one-time secret and the primary's UDP address, 20 characters of Crockford base32 in groups of four,
with a check character). The new device dials that address and both run a balanced PAKE after CPace
over ristretto255 (in Rust, constant time, the scalar zeroized): the generator is hashed to the
group from the secret, both peer IDs as the connection proved them (libp2p TLS) and the new
device's fresh nonce; each side sends ``y·G``, derives the key from the other's share, and proves
it with an HMAC over the transcript (the primary first). A wrong code, or anyone in the middle (who
sees other peer IDs on each side), gets a key that does not match; the code cannot be tested
offline from what crosses the wire, so an attacker gets one guess per attempt, and the primary
allows 3 attempts per code (each run that reaches the primary's proof counts), then the code is
dead: success odds at most 3 / 2^40. A code expires after ``ttl`` (10 minutes by default) and is
spent by its first success (a replay finds no code). On success the primary signs the list with the
new device added, hands it over on the stream, announces it, and sends the history to the new
device as ``teia.devices/history`` chunks over their pairwise session (end-to-end encrypted like
any message).

Wire formats, the link code and the PAKE's pieces are in `teia.peer.devicewire`; the commands
(``teia device …``) in `teia.peer.devicecli`. Nothing here logs content, keys or codes.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import anyio

from teia.dht.devicelists import DEVICE_LIST_LIFETIME_MS, DeviceListRecord, device_list_key
from teia.errors import (
    DeviceError,
    DeviceNotListed,
    InvalidMultiaddr,
    InvalidPeerId,
    LinkRefused,
    StaleDeviceList,
    TeiaError,
    TransportError,
    UnknownAccount,
)
from teia.identity import Identity, Multiaddr, PeerId
from teia.peer.db import MessageRow, PeerDatabase, now_ms
from teia.peer.devicewire import (
    APP_HISTORY,
    APP_LIST,
    APP_MESSAGE,
    HISTORY_STATES,
    KIND_MESSAGE,
    KIND_TRANSCRIPT,
    LINK_PROTOCOL,
    LINK_SECRET_SIZE,
    MAX_CONVERSATION,
    MAX_DEVICE_LIST_SIZE,
    MAX_DEVICES,
    MAX_HISTORY_RECORDS,
    MAX_PATH,
    MESSAGE_ID_SIZE,
    DeviceList,
    DeviceMessage,
    HistoryChunk,
    HistoryRecord,
    LinkCode,
    ListPush,
    account_id,
    link_key,
    link_pake,
    link_proof,
    link_shared,
)

if TYPE_CHECKING:
    from teia.dht.node import DhtNode
    from teia.host.streams import NegotiatedStream
    from teia.peer.peer import AppHandler, AppMessage, Peer

__all__ = ["Devices", "StoredAccount", "stored_account"]

_log = logging.getLogger(__name__)

_HISTORY_CHUNK: Final = 120 * 1024
_MAX_HISTORY_TRANSFER: Final = 100_000
_MAX_KNOWN_ACCOUNTS: Final = 10_000
_LINK_ATTEMPTS: Final = 3
_LINK_TTL: Final = 600.0
_LINK_TIMEOUT: Final = 30.0
_MAX_LINK_ADDRS: Final = 8
_DHT_QUORUM: Final = 3
"""A DHT lookup of a device list takes the newest among the first three answers."""
_DHT_CHECK_S: Final = 3600.0
"""How often a device looks whether its account's list needs publishing again, and how often
at most a sender asks the DHT for a newer list of an account whose list is getting old."""
_DHT_ERRORS: Final = (TeiaError, TransportError, OSError, TimeoutError)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS device_account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    account_key BLOB NOT NULL,
    secret BLOB,
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS device_lists (
    account TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    list BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_copies (
    message_id BLOB NOT NULL,
    device TEXT NOT NULL,
    copy_id BLOB NOT NULL,
    PRIMARY KEY (message_id, device)
);
CREATE TABLE IF NOT EXISTS device_fanout (
    message_id BLOB PRIMARY KEY,
    payload BLOB NOT NULL,
    transcript BLOB NOT NULL,
    pending TEXT NOT NULL
);
"""


# --- database -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Own:
    account_key: bytes
    signer: Identity | None
    removed: bool


def _secret_ad(account_key: bytes) -> bytes:
    return b"device-account\0" + account_key


def _load_own(db: PeerDatabase) -> _Own | None:
    rows = db.read("SELECT account_key, secret, removed FROM device_account WHERE id = 1")
    if not rows:
        return None
    key, sealed, removed = bytes(rows[0][0]), rows[0][1], bool(rows[0][2])
    signer = None
    if sealed is not None:
        signer = Identity.from_seed(db.cipher.open(_secret_ad(key), bytes(sealed)))
    return _Own(key, signer, removed)


def _save_own(db: PeerDatabase, own: _Own, first_list: DeviceList) -> None:
    sealed = None
    if own.signer is not None:
        sealed = db.cipher.seal(_secret_ad(own.account_key), own.signer.private_seed)
    with db.transaction() as conn:
        if conn.execute("SELECT 1 FROM device_account").fetchone() is not None:
            raise DeviceError("this device already belongs to an account")
        conn.execute(
            "INSERT INTO device_account (id, account_key, secret, removed) VALUES (1, ?, ?, 0)",
            (own.account_key, sealed),
        )
        _write_list(conn, first_list)


def _write_list(conn: Any, device_list: DeviceList) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO device_lists (account, version, list, updated_ms) "
        "VALUES (?, ?, ?, ?)",
        (str(device_list.account), device_list.version, device_list.encode(), now_ms()),
    )


def _read_list(db: PeerDatabase, account: PeerId) -> DeviceList | None:
    rows = db.read("SELECT list FROM device_lists WHERE account = ?", (str(account),))
    return DeviceList.decode(bytes(rows[0][0])) if rows else None


def _store_list(
    db: PeerDatabase, offered: DeviceList, strict: bool, me: PeerId
) -> tuple[DeviceList, bool]:
    """Keep ``offered`` if it is newer than what we hold; (the list now held, whether it
    changed). ``strict`` refuses an older or conflicting one (`StaleDeviceList`)."""
    with db.transaction() as conn:
        row = conn.execute(
            "SELECT list FROM device_lists WHERE account = ?", (str(offered.account),)
        ).fetchone()
        held = DeviceList.decode(bytes(row[0])) if row is not None else None
        if held is None and conn.execute("SELECT count(*) FROM device_lists").fetchone()[0] >= (
            _MAX_KNOWN_ACCOUNTS
        ):
            raise DeviceError("too many accounts known; forget some first")
        if held is None or offered.version > held.version:
            _write_list(conn, offered)
            own = conn.execute("SELECT account_key FROM device_account WHERE id = 1").fetchone()
            if own is not None and bytes(own[0]) == offered.account_key:
                conn.execute(
                    "UPDATE device_account SET removed = ? WHERE id = 1",
                    (int(me not in offered),),
                )
            return offered, True
        if strict and (offered.version < held.version or offered.encode() != held.encode()):
            raise StaleDeviceList(
                f"device list version {offered.version} of {offered.account} is not newer "
                f"than the version {held.version} held"
            )
        return held, False


def _known_lists(db: PeerDatabase) -> list[DeviceList]:
    return [DeviceList.decode(bytes(r[0])) for r in db.read("SELECT list FROM device_lists")]


def _fanout_ad(message_id: bytes, what: bytes) -> bytes:
    return b"device-fanout\0" + what + b"\0" + message_id


def _record_copies(
    db: PeerDatabase,
    message_id: bytes,
    copies: list[tuple[str, bytes]],
    left: Sequence[tuple[str, bool]] = (),
) -> None:
    """The copies queued for a message, and the fan-out left to do (none: forgotten)."""
    with db.transaction() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO device_copies (message_id, device, copy_id) VALUES (?, ?, ?)",
            [(message_id, device, copy) for device, copy in copies],
        )
        if left:
            conn.execute(
                "UPDATE device_fanout SET pending = ? WHERE message_id = ?",
                (json.dumps([[device, transcript] for device, transcript in left]), message_id),
            )
        else:
            conn.execute("DELETE FROM device_fanout WHERE message_id = ?", (message_id,))


def _fanouts(db: PeerDatabase) -> list[tuple[bytes, bytes, bytes, list[tuple[str, bool]]]]:
    """Fan-outs a previous run did not finish: (message ID, payload, transcript, left)."""
    out = []
    for mid, payload, transcript, pending in db.read(
        "SELECT message_id, payload, transcript, pending FROM device_fanout LIMIT 1024"
    ):
        message_id = bytes(mid)
        out.append(
            (
                message_id,
                db.cipher.open(_fanout_ad(message_id, b"m"), bytes(payload)),
                db.cipher.open(_fanout_ad(message_id, b"t"), bytes(transcript)),
                [(str(device), bool(transcript)) for device, transcript in json.loads(pending)],
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class StoredAccount:
    """A profile's account as its database holds it (`stored_account`)."""

    account: PeerId
    primary: bool
    """Whether this device holds the account key."""
    removed: bool
    devices: DeviceList | None


def stored_account(db: PeerDatabase) -> StoredAccount | None:
    """The account of a profile, read without going online (``teia device list``)."""
    db.ensure_schema(_SCHEMA)
    rows = db.read("SELECT account_key, secret IS NOT NULL, removed FROM device_account")
    if not rows:
        return None
    account = account_id(bytes(rows[0][0]))
    return StoredAccount(account, bool(rows[0][1]), bool(rows[0][2]), _read_list(db, account))


def _history_records(db: PeerDatabase) -> list[HistoryRecord]:
    out: list[HistoryRecord] = []
    for conversation, _, _ in db.conversations():
        rows: list[MessageRow] = db.history(conversation, limit=_MAX_HISTORY_TRANSFER)
        out += [
            HistoryRecord(
                r.message_id,
                r.peer_id,
                r.conversation,
                r.outgoing,
                r.sent_ms,
                r.state if r.state in HISTORY_STATES else "received",
                r.path if r.path and len(r.path) <= MAX_PATH else None,
                r.text,
            )
            for r in rows
            if len(r.conversation.encode()) <= MAX_CONVERSATION and len(r.peer_id) < 256
        ]
    out.sort(key=lambda r: r.sent_ms)
    return out[-_MAX_HISTORY_TRANSFER:]


def _insert_records(db: PeerDatabase, records: Sequence[HistoryRecord], path: str | None) -> int:
    added = 0
    with db.transaction() as conn:
        for r in records:
            seq = db.insert_history(
                conn,
                message_id=r.message_id,
                peer_id=r.peer_id,
                conversation=r.conversation,
                outgoing=r.outgoing,
                sent_ms=r.sent_ms,
                text=r.text,
                state=r.state,
                path=path or r.path,
            )
            added += seq is not None
    return added


@dataclass
class _ActiveCode:
    secret: bytes
    expires: float
    attempts: int = 0


# --- the account on a peer ----------------------------------------------------------------------


@dataclass
class _Waiters:
    event: anyio.Event = field(default_factory=anyio.Event)

    def fire(self) -> None:
        self.event.set()
        self.event = anyio.Event()


class Devices:
    """This device's account: its signed device list, fan-out to accounts, linking and
    removing devices. Every open `Peer` has one as ``peer.devices``; see the module docstring.
    """

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._own: _Own | None = None
        self._code: _ActiveCode | None = None
        self._changed = _Waiters()
        self._history_done = anyio.Event()
        self.history_received = 0
        """Messages taken from a history transfer (after `link`)."""
        self.refusals: collections.Counter[str] = collections.Counter()
        """Refused device payloads by error name (metadata only)."""
        self.taken: collections.Counter[str] = collections.Counter()
        """Device payloads taken, by application name (metadata only)."""
        self.clock: Callable[[], float] = time.monotonic
        """The clock link codes expire by (tests replace it)."""
        self.linked: list[PeerId] = []
        """Devices this primary linked while open (their history queued)."""
        self._linked = _Waiters()
        self._queued: set[str] = set()
        self._looked_up: collections.OrderedDict[PeerId, float] = collections.OrderedDict()
        self.published = 0
        """Times this device put its account's list in the DHT (metadata only)."""
        self.published_version = 0
        """The highest version of our list that DHT nodes took from this device."""
        self._publishing = 0
        self._publish_lock = anyio.Lock()

    @classmethod
    async def attach(cls, peer: Peer) -> Devices:
        """Create the tables, load the account and register the handlers (before the peer
        starts taking payloads)."""
        devices = cls(peer)
        db = peer.profile.db
        await peer.run_db(db.ensure_schema, _SCHEMA)
        devices._own = await peer.run_db(_load_own, db)
        peer.on_app(APP_LIST, devices._guard(devices._on_list))
        peer.on_app(APP_MESSAGE, devices._guard(devices._on_message))
        peer.on_app(APP_HISTORY, devices._guard(devices._on_history))
        peer.host.set_handler(LINK_PROTOCOL, devices._serve_link)
        return devices

    # --- state ---------------------------------------------------------------------------

    @property
    def account(self) -> PeerId | None:
        """Our account ID, or None before `create_account` / `link`."""
        return None if self._own is None else account_id(self._own.account_key)

    @property
    def is_primary(self) -> bool:
        """Whether this device holds the account key (links and removes devices)."""
        return self._own is not None and self._own.signer is not None

    @property
    def removed(self) -> bool:
        """Whether this device was removed from its account's list."""
        return self._own is not None and self._own.removed

    async def device_list(self, account: PeerId | str | None = None) -> DeviceList | None:
        """The newest list held for ``account`` (by default ours), or None."""
        target = self.account if account is None else _as_peer_id(account)
        if target is None:
            return None
        return await self._peer.run_db(_read_list, self._peer.profile.db, target)

    async def changed(self) -> None:
        """Wait until the next device payload has been handled (taken or refused) or a list
        changed. Around a condition that itself awaits, use `until` instead: a change that
        happens while the condition is being evaluated would be missed here."""
        await self._changed.event.wait()

    async def until(self, condition: Callable[[], bool | Awaitable[bool]]) -> None:
        """Wait until ``condition()`` (plain or awaitable) holds: checked now and after every
        change, none missed between a check and the wait (bound it with ``anyio.fail_after``)."""
        while True:
            waiter = self._changed.event  # taken before the check: a change during it counts
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await waiter.wait()

    async def wait_account(self, account: PeerId | str, *, version: int = 1) -> DeviceList:
        """Wait until a list of at least ``version`` is held for ``account``."""
        target = _as_peer_id(account)
        while True:
            waiter = self._changed.event
            held = await self.device_list(target)
            if held is not None and held.version >= version:
                return held
            await waiter.wait()

    async def wait_history(self) -> int:
        """After `link`: wait until the history transfer ended; messages taken."""
        await self._history_done.wait()
        return self.history_received

    async def wait_linked(self) -> PeerId:
        """On the primary, after `link_code`: wait until a device has linked and its history
        is queued; that device."""
        while not self.linked:
            await self._linked.event.wait()
        return self.linked[-1]

    async def wait_delivered(self) -> None:
        """Wait until every payload this device queued for the account (copies, lists,
        history) is delivered or stored, and the list being put in the DHT is put (or failed)
        (bound it with ``anyio.fail_after``)."""
        while self._queued:
            message_id = next(iter(self._queued))
            await self._peer.wait_delivered(message_id)
            self._queued.discard(message_id)
        await self.until(lambda: self._publishing == 0)

    async def _send_app(self, device: PeerId, app: str, data: bytes) -> str:
        message_id = await self._peer.send_app(device, app, data)
        if len(self._queued) < 100_000:
            self._queued.add(message_id)
        return message_id

    def _require_own(self) -> _Own:
        if self._own is None:
            raise DeviceError("this device has no account: create one or link this device")
        if self._own.removed:
            raise DeviceError("this device was removed from its account")
        return self._own

    def _require_signer(self) -> Identity:
        own = self._require_own()
        if own.signer is None:
            raise DeviceError("only the account's primary device (holding its key) does this")
        return own.signer

    async def _reload(self) -> None:
        self._own = await self._peer.run_db(_load_own, self._peer.profile.db)

    # --- account and list ----------------------------------------------------------------

    async def create_account(self) -> PeerId:
        """Make a new account with this device as its primary and only device; its ID."""
        if self._own is not None:
            raise DeviceError("this device already belongs to an account")
        signer = Identity.generate()
        first = DeviceList.sign(signer, 1, [self._peer.peer_id])
        own = _Own(signer.public_key, signer, False)
        await self._peer.run_db(_save_own, self._peer.profile.db, own, first)
        self._own = own
        self._changed.fire()
        self._publish_soon()
        return first.account

    async def introduce(self, device: PeerId | str) -> None:
        """Send our list to ``device`` (a device of another account, reachable as any peer)
        and ask for its account's list back (`wait_account`)."""
        own = self._require_own()
        mine = await self.device_list()
        assert mine is not None
        target = _as_peer_id(device)
        if account_id(own.account_key) == target:
            raise DeviceError("introduce a device, not an account")
        await self._send_app(target, APP_LIST, ListPush(True, mine).encode())

    async def remove(self, device: PeerId | str) -> DeviceList:
        """Take ``device`` off our list (primary only): nothing sent after this reaches it
        from us, and from others once the new list reached them (it is sent to them now)."""
        signer = self._require_signer()
        target = _as_peer_id(device)
        if target == self._peer.peer_id:
            raise DeviceError("the primary device cannot remove itself")
        current = await self.device_list()
        assert current is not None
        if target not in current:
            raise DeviceError(f"{target} is not on this account's list")
        updated = DeviceList.sign(
            signer, current.version + 1, [d for d in current.devices if d != target]
        )
        await self._adopt(updated)
        self._publish_soon()
        await self._announce(updated, also=[target])
        return updated

    async def _adopt(self, updated: DeviceList) -> None:
        await self._peer.run_db(
            _store_list, self._peer.profile.db, updated, True, self._peer.peer_id
        )
        self._changed.fire()

    async def _announce(self, updated: DeviceList, also: Sequence[PeerId] = ()) -> None:
        """Send our new list to our other devices (and ``also``) and every known account."""
        known = await self._peer.run_db(_known_lists, self._peer.profile.db)
        targets = dict.fromkeys([*updated.devices, *also])
        for held in known:
            if held.account_key != updated.account_key:
                targets.update(dict.fromkeys(held.devices))
        targets.pop(self._peer.peer_id, None)
        push = ListPush(False, updated).encode()
        for target in targets:
            await self._send_app(target, APP_LIST, push)

    # --- the DHT ---------------------------------------------------------------------------

    async def lookup(self, account: PeerId | str) -> DeviceList | None:
        """Ask the DHT for ``account``'s device list (without a DHT, only what is held); keep
        it if it is newer than the one held; the newest list held now, or None.

        This is how a device reaches an account it was never introduced to: by its ID alone.
        """
        target = _as_peer_id(account)
        dht = self._peer.dht
        if dht is not None:
            await self._peer.wait_dht_joined()
            self._looked_up[target] = self.clock()
            self._looked_up.move_to_end(target)
            while len(self._looked_up) > 4096:
                self._looked_up.popitem(last=False)
            found = await dht.get_value(device_list_key(target), quorum=_DHT_QUORUM)
            if isinstance(found, DeviceListRecord) and found.peer_id == target:
                _, changed = await self._peer.run_db(
                    _store_list,
                    self._peer.profile.db,
                    found.device_list,
                    False,
                    self._peer.peer_id,
                )
                if changed and self._own is not None and target == self.account:
                    await self._reload()
                if changed:
                    self._changed.fire()
        return await self.device_list(target)

    def _ask_dht(self, held: DeviceList) -> bool:
        """Whether a send should first ask the DHT for a newer list than ``held``: only past
        half its DHT lifetime (a live primary has re-signed by then), once an hour at most."""
        if self._peer.dht is None or now_ms() < held.issued_ms + DEVICE_LIST_LIFETIME_MS // 2:
            return False
        asked = self._looked_up.get(held.account)
        return asked is None or self.clock() - asked >= _DHT_CHECK_S

    async def publish(self) -> int:
        """Put our account's newest list in the DHT; on how many nodes it was stored.

        The primary first re-signs the list (the next version, the same devices, sent to our
        other devices) once it is past half its DHT lifetime, so a live account never drops
        out of the DHT. Any other device publishes the list it holds (the nodes keep the
        newest they were given), unless that list is past its lifetime. 0 without a DHT or an
        account. One publication at a time (two would re-sign the same version twice).
        """
        dht = self._peer.dht
        if dht is None or self._own is None or self._own.removed:
            return 0
        await self._peer.wait_dht_joined()
        async with self._publish_lock:
            return await self._publish(dht)

    async def _publish(self, dht: DhtNode) -> int:
        assert self._own is not None
        current = await self.device_list()
        assert current is not None
        now = now_ms()
        if self._own.signer is not None and now >= current.issued_ms + (
            DEVICE_LIST_LIFETIME_MS // 2
        ):
            current = DeviceList.sign(self._own.signer, current.version + 1, current.devices)
            await self._adopt(current)
            # Our other devices take it too (others get it carried on our next message).
            push = ListPush(False, current).encode()
            for device in current.devices:
                if device != self._peer.peer_id:
                    await self._send_app(device, APP_LIST, push)
        if now > current.issued_ms + DEVICE_LIST_LIFETIME_MS:
            return 0
        stored = await dht.put_value(DeviceListRecord.of(current))
        self.published += 1
        if stored:
            self.published_version = max(self.published_version, current.version)
        self._changed.fire()
        return stored

    def _publish_soon(self) -> None:
        if self._peer.dht is not None:
            self._publishing += 1  # counted at once: `wait_delivered` waits for it
            self._peer.task_group.start_soon(self._publish_quietly, True)

    async def _publish_quietly(self, counted: bool = False) -> None:
        try:
            await self.publish()
        except _DHT_ERRORS as exc:
            _log.warning("publishing the device list failed: %s", type(exc).__name__)
        finally:
            if counted:
                self._publishing -= 1
                self._changed.fire()

    async def keep_published(self) -> None:
        """Publish our list now and check every hour whether it needs it again (runs for as
        long as the peer; the peer starts it once it has joined the DHT)."""
        while True:
            await self._publish_quietly()
            await anyio.sleep(_DHT_CHECK_S)

    # --- fan-out ---------------------------------------------------------------------------

    async def send(self, account: PeerId | str, text: str) -> str:
        """Send ``text`` to every device of ``account`` and a transcript to our other devices;
        the logical message ID (hex). An account whose list we do not hold (or hold an old one
        of) is looked up in the DHT first; `UnknownAccount` if there is no list either way.
        In our history under the account's conversation when this returns; each copy is
        delivered in the background (`wait_sent`)."""
        own = self._require_own()
        target = _as_peer_id(account)
        if target == account_id(own.account_key):
            raise DeviceError("cannot send to our own account")
        theirs = await self.device_list(target)
        if theirs is None or self._ask_dht(theirs):
            with contextlib.suppress(*_DHT_ERRORS):
                theirs = await self.lookup(target)
        if theirs is None:
            raise UnknownAccount(f"no device list known for account {target}")
        mine = await self.device_list()
        assert mine is not None
        message_id = secrets.token_bytes(MESSAGE_ID_SIZE)
        sent_ms = self._peer.profile.db.next_timestamp()
        message = DeviceMessage(KIND_MESSAGE, message_id, sent_ms, theirs.account_key, mine, text)
        payload = message.encode()  # size check before anything is written
        transcript = replace(message, kind=KIND_TRANSCRIPT).encode()
        db = self._peer.profile.db
        pending = [(str(device), False) for device in theirs.devices] + [
            (str(device), True) for device in mine.devices if device != self._peer.peer_id
        ]

        def record(conn_db: PeerDatabase) -> None:
            # The text and the fan-out still to do, in one transaction: a crash before every
            # copy is queued leaves the rest for the next start (`resume`).
            with conn_db.transaction() as conn:
                conn.execute(
                    "INSERT INTO device_fanout (message_id, payload, transcript, pending) "
                    "VALUES (?, ?, ?, ?)",
                    (
                        message_id,
                        conn_db.cipher.seal(_fanout_ad(message_id, b"m"), payload),
                        conn_db.cipher.seal(_fanout_ad(message_id, b"t"), transcript),
                        json.dumps([[device, is_transcript] for device, is_transcript in pending]),
                    ),
                )
                conn_db.insert_history(
                    conn,
                    message_id=message_id,
                    peer_id=str(target),
                    conversation=str(target),
                    outgoing=True,
                    sent_ms=sent_ms,
                    text=text,
                    state="sent",
                )

        await self._peer.run_db(record, db)
        await self._fan_out(message_id, payload, transcript, pending)
        return message_id.hex()

    async def _fan_out(
        self, message_id: bytes, payload: bytes, transcript: bytes, pending: list[tuple[str, bool]]
    ) -> None:
        """Queue each copy pairwise, then record the copies and what is left (nothing, unless
        cancelled or a device's ID is unusable)."""
        copies: list[tuple[str, bytes]] = []
        left = list(pending)
        try:
            for device, is_transcript in pending:
                with contextlib.suppress(InvalidPeerId):
                    copy = await self._send_app(
                        PeerId.from_string(device),
                        APP_MESSAGE,
                        transcript if is_transcript else payload,
                    )
                    copies.append((device, bytes.fromhex(copy)))
                left.remove((device, is_transcript))
        finally:
            with anyio.CancelScope(shield=True):
                await self._peer.run_db(
                    _record_copies, self._peer.profile.db, message_id, copies, left
                )

    async def resume(self) -> None:
        """Finish the fan-outs of messages a previous run recorded but did not queue for every
        device (a device that already has its copy keeps one: copies are deduplicated by the
        logical message ID)."""
        for message_id, payload, transcript, left in await self._peer.run_db(
            _fanouts, self._peer.profile.db
        ):
            await self._fan_out(message_id, payload, transcript, left)

    async def wait_sent(self, message_id: str) -> dict[PeerId, MessageRow]:
        """Wait until every copy of a message sent with `send` is delivered or stored; each
        device's copy (bound it with ``anyio.fail_after``)."""
        rows = await self._peer.run_db(
            self._peer.profile.db.read,
            "SELECT device, copy_id FROM device_copies WHERE message_id = ?",
            (bytes.fromhex(message_id),),
        )
        return {
            PeerId.from_string(str(device)): await self._peer.wait_delivered(bytes(copy).hex())
            for device, copy in rows
        }

    # --- receiving -----------------------------------------------------------------------

    def _guard(self, handler: AppHandler) -> AppHandler:
        async def guarded(message: AppMessage) -> None:
            try:
                await handler(message)
                self.taken[message.app] += 1
            except TeiaError as exc:
                self.refusals[type(exc).__name__] += 1
                raise
            finally:
                self._changed.fire()

        return guarded

    async def _on_list(self, message: AppMessage) -> None:
        push = ListPush.decode(message.data)
        offered = push.device_list
        first_hand = message.sender in offered
        if not first_hand:
            # Only our own devices pass on other accounts' lists.
            mine = await self.device_list()
            if mine is None or message.sender not in mine:
                raise DeviceNotListed(f"{message.sender} sent a list it is not on")
        _, changed = await self._peer.run_db(
            _store_list, self._peer.profile.db, offered, True, self._peer.peer_id
        )
        if self._own is None:
            return
        if offered.account_key == self._own.account_key:
            await self._reload()
            return
        mine = await self.device_list()
        if mine is None or self._own.removed:
            return
        if changed and first_hand:
            # Our other devices learn it too (they take it from us, one of theirs).
            forward = ListPush(False, offered).encode()
            for device in mine.devices:
                if device != self._peer.peer_id:
                    await self._send_app(device, APP_LIST, forward)
        if push.reply:
            answer = ListPush(False, mine).encode()
            for device in offered.devices:  # every device of theirs can then send to us
                await self._send_app(device, APP_LIST, answer)

    async def _on_message(self, message: AppMessage) -> None:
        own = self._require_own()
        fanned = DeviceMessage.decode(message.data)
        held, _ = await self._peer.run_db(
            _store_list, self._peer.profile.db, fanned.device_list, False, self._peer.peer_id
        )
        if held.account_key == own.account_key:
            await self._reload()
            own = self._require_own()
        if message.sender not in held:
            raise DeviceNotListed(
                f"{message.sender} is not on the current list of account {held.account}"
            )
        sender_account = held.account
        if fanned.kind == KIND_MESSAGE:
            if fanned.peer_account != own.account_key:
                raise DeviceError("a message for another account")
            peer_id, outgoing = sender_account, False
        else:
            if held.account_key != own.account_key or message.sender == self._peer.peer_id:
                raise DeviceNotListed("a transcript from a device of another account")
            peer_id, outgoing = account_id(fanned.peer_account), True
        record = HistoryRecord(
            fanned.message_id,
            str(peer_id),
            str(peer_id),
            outgoing,
            fanned.sent_ms,
            "sent" if outgoing else "received",
            None,
            fanned.text,
        )
        added = await self._peer.run_db(
            _insert_records, self._peer.profile.db, [record], None if outgoing else message.path
        )
        if added and not outgoing:
            self._peer._history_changed()

    async def _on_history(self, message: AppMessage) -> None:
        own = self._require_own()
        mine = await self.device_list()
        if mine is None or message.sender not in mine or message.sender == self._peer.peer_id:
            raise DeviceNotListed(f"history from {message.sender}, not one of our devices")
        del own
        chunk = HistoryChunk.decode(message.data)
        self.history_received += await self._peer.run_db(
            _insert_records, self._peer.profile.db, chunk.records, None
        )
        if chunk.last:
            self._history_done.set()

    # --- linking ---------------------------------------------------------------------------

    def link_code(self, *, ttl: float = _LINK_TTL, address: tuple[str, int] | None = None) -> str:
        """A one-time code to show to the user for linking a new device (primary only);
        it replaces any earlier code and expires after ``ttl`` seconds. ``address`` (host,
        port) is where the new device dials us, by default our first listen address."""
        self._require_signer()
        if address is None:
            direct = [a for a in self._peer.host.addrs if a not in self._peer.host.relayed_addrs]
            if not direct:
                raise DeviceError("no listen address to put in a link code")
            address = direct[0].to_udp_address()
        secret = secrets.token_bytes(LINK_SECRET_SIZE)
        self._code = _ActiveCode(secret, self.clock() + ttl)
        return LinkCode(secret, address[0], address[1]).format()

    def cancel_link_code(self) -> None:
        """Forget the code shown (it can no longer be used)."""
        self._code = None

    async def link(self, code: str) -> DeviceList:
        """Join the account of the device showing ``code``: prove the code, get the signed
        list with this device on it; the history follows (`wait_history`).
        `InvalidLinkCode` for a typo, `LinkRefused` for a wrong, expired or used code."""
        if self._own is not None:
            raise DeviceError("this device already belongs to an account")
        parsed = LinkCode.parse(code)
        host = self._peer.host
        me = self._peer.peer_id
        try:
            with anyio.fail_after(_LINK_TIMEOUT):
                existing = await self._dial(parsed)
                stream = await host.open_stream(existing, LINK_PROTOCOL)
                try:
                    nonce = secrets.token_bytes(16)
                    run = link_pake(parsed.secret, me, existing, nonce)
                    share = run.share
                    await stream.send_message(nonce + share)
                    answer = await stream.receive_message(128)
                    if len(answer) != 64:
                        raise LinkRefused(
                            "the code is expired, already used, or was tried too often; "
                            "show a new code on the existing device"
                        )
                    theirs, proof = answer[:32], answer[32:]
                    if theirs == share:
                        raise LinkRefused("the other device's key share is invalid")
                    key = link_key(link_shared(run, theirs), nonce, share, theirs)
                    expected = link_proof(key, b"existing", nonce, share, theirs)
                    if not hmac.compare_digest(proof, expected):
                        raise LinkRefused(
                            "wrong code (or someone in the middle): check the code on the "
                            "existing device and try again"
                        )
                    addrs = "\n".join(str(a) for a in host.addrs[:_MAX_LINK_ADDRS]).encode()
                    await stream.send_message(link_proof(key, b"new", nonce, share, theirs) + addrs)
                    granted = DeviceList.decode(await stream.receive_message(MAX_DEVICE_LIST_SIZE))
                    if me not in granted or existing not in granted:
                        raise LinkRefused("the list handed over does not hold both devices")
                    own = _Own(granted.account_key, None, False)
                    await self._peer.run_db(_save_own, self._peer.profile.db, own, granted)
                    self._own = own
                    await stream.send_message(b"ok")
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
        except (TimeoutError, TransportError, anyio.EndOfStream, OSError) as exc:
            if self._own is not None:
                return granted  # saved; only the last "ok" was lost
            raise LinkRefused(
                f"the existing device did not complete the link ({type(exc).__name__})"
            ) from None
        await self._peer.add_contact(
            existing, None, [str(Multiaddr.from_udp(parsed.host, parsed.port))]
        )
        self._changed.fire()
        return granted

    async def _dial(self, parsed: LinkCode) -> PeerId:
        """Who listens at the code's address: an open connection to it, else a new one (an
        address without a peer ID; the PAKE, bound to the peer ID proven, says who it is)."""
        host = self._peer.host
        for connection in host.connections:
            remote = connection.remote_address
            if not connection.is_closed and remote and remote[:2] == (parsed.host, parsed.port):
                with contextlib.suppress(TransportError):
                    peer: PeerId = connection.remote_peer.peer_id
                    return peer
        connection = await host.connect(Multiaddr.from_udp(parsed.host, parsed.port))
        dialed: PeerId = connection.remote_peer.peer_id
        return dialed

    async def _serve_link(self, stream: NegotiatedStream) -> None:
        new = stream.remote_peer_id
        if new is None or new.public_key is None:
            return
        try:
            with anyio.fail_after(_LINK_TIMEOUT):
                opening = await stream.receive_message(64)
                code = self._code
                if code is None or self.clock() >= code.expires or code.attempts >= _LINK_ATTEMPTS:
                    self._code = None  # expired or used up: dead for good
                    await stream.send_message(b"")
                    return
                if len(opening) != 48 or self._own is None or self._own.signer is None:
                    await stream.send_message(b"")
                    return
                code.attempts += 1  # counted before anything that depends on the code leaves
                nonce, theirs = opening[:16], opening[16:]
                run = link_pake(code.secret, new, self._peer.peer_id, nonce)
                share = run.share
                if theirs == share:
                    return
                key = link_key(link_shared(run, theirs), nonce, theirs, share)
                await stream.send_message(
                    share + link_proof(key, b"existing", nonce, theirs, share)
                )
                reply = await stream.receive_message(32 + 4096)
                expected = link_proof(key, b"new", nonce, theirs, share)
                if not hmac.compare_digest(reply[:32], expected):
                    _log.info("a link attempt failed (%d of %d)", code.attempts, _LINK_ATTEMPTS)
                    return
                if self._code is not code:
                    return  # another attempt won, or the code was cancelled
                self._code = None
                granted = await self._grant(new)
                await stream.send_message(granted.encode())
                # The new device has saved its account before anything else is sent to it.
                with contextlib.suppress(TimeoutError, anyio.EndOfStream, TransportError):
                    with anyio.fail_after(10):
                        await stream.receive_message(8)
        except (TimeoutError, TeiaError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            _log.info("a link attempt ended: %s", type(exc).__name__)
            return
        addrs: list[str] = []
        for line in reply[32:].decode(errors="replace").splitlines()[:_MAX_LINK_ADDRS]:
            with contextlib.suppress(InvalidMultiaddr):
                addrs.append(str(Multiaddr(line)))
        with contextlib.suppress(TeiaError):
            await self._peer.add_contact(new, None, addrs)
        self._peer.task_group.start_soon(self._after_link, granted, new)

    async def _grant(self, new: PeerId) -> DeviceList:
        signer = self._require_signer()
        current = await self.device_list()
        assert current is not None
        if new in current:
            return current
        if len(current.devices) >= MAX_DEVICES:
            raise DeviceError(f"an account has at most {MAX_DEVICES} devices")
        updated = DeviceList.sign(signer, current.version + 1, [*current.devices, new])
        await self._adopt(updated)
        return updated

    async def _after_link(self, granted: DeviceList, new: PeerId) -> None:
        self._publish_soon()
        try:
            await self._announce(granted)
            known = await self._peer.run_db(_known_lists, self._peer.profile.db)
            for held in known:
                if held.account_key != granted.account_key:
                    await self._send_app(new, APP_LIST, ListPush(False, held).encode())
            await self._send_history(new)
            self.linked.append(new)
            self._linked.fire()
        except TeiaError as exc:
            _log.warning("after linking a device: %s", type(exc).__name__)

    async def _send_history(self, new: PeerId) -> None:
        records = await self._peer.run_db(_history_records, self._peer.profile.db)
        chunk: list[HistoryRecord] = []
        size = 0
        for record in records:
            encoded = len(record.encode())
            if chunk and (size + encoded > _HISTORY_CHUNK or len(chunk) >= MAX_HISTORY_RECORDS):
                await self._send_app(new, APP_HISTORY, HistoryChunk(False, tuple(chunk)).encode())
                chunk, size = [], 0
            chunk.append(record)
            size += encoded
        await self._send_app(new, APP_HISTORY, HistoryChunk(True, tuple(chunk)).encode())


def _as_peer_id(who: PeerId | str) -> PeerId:
    return who if isinstance(who, PeerId) else PeerId.from_string(who)
