"""`Peer`: a profile brought online — sending, receiving, receipts, history, contacts.

``async with Peer.open(profile_dir, passphrase=…) as peer:`` starts a QUIC host on the
profile's listen addresses, serves ``/teia/chat/1.0.0`` and ``/teia/prekeys/1.0.0``, joins the
DHT and publishes its record (when bootstrap nodes are configured), uploads a prekey bundle to
the store nodes (when configured) and fetches what they hold for it, then resumes delivering
whatever the outbox still holds.

Sending (`Peer.send`) only writes: the text into history (sealed) and into the outbox, in one
transaction; it returns at once with the message ID. A delivery task per recipient empties the
outbox in order: it encrypts what is not yet encrypted (X3DH on first contact, with a bundle
from the recipient itself or from the store nodes; then the Double Ratchet), the sessions and
envelopes committed together before anything leaves, then picks a path — an existing
connection; a direct dial to addresses from the contacts, the host's address book or the DHT;
an address on a relay; else a deposit on the store nodes — and retries every
``retry_interval`` seconds until the envelope is delivered (acknowledged by the recipient once
it is in its history) or stored. The path and latency of each delivery are recorded.

Receiving (``/teia/chat/1.0.0`` from connections, and the store inboxes when coming online):
the envelope's sender must be the connection's peer (for stored envelopes, the sealed
envelope's claimed sender, which the session then authenticates); a message ID already in
history is acknowledged again and not decrypted; a prekey message whose identity key is not
the sender's is refused; decryption is transactional (the crypto core leaves a session
untouched on any error) and its result — history row, session state, the consumed one-time
prekey — is committed in one transaction before the acknowledgement goes out (or, for stored
envelopes, before the store is told to delete them).

Application payloads (`send_app`, `on_app`) ride the same pipeline: sealed in the outbox,
ratcheted, delivered or stored, deduplicated, acknowledged. On arrival a payload is committed
with the session state into ``app_inbox`` and handed to the handler registered for its
application name, in arrival order, then forgotten; a handler that raises `TeiaError` refuses
it (counted in ``stats``). A process that dies before its handler finished sees the payload
again when it reopens, so handlers are idempotent (by message ID). Groups, devices and
attachments are built this way.

Nothing here logs message content, keys or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import anyio
import anyio.abc
import trio

from teia.crypto import (
    OneTimePrekey,
    PrekeyBundle,
    Session,
    SignedPrekey,
    is_prekey_message,
    parse_prekey_message,
)
from teia.errors import (
    ContactIdentityChanged,
    CryptoError,
    DeliveryError,
    InvalidChatMessage,
    InvalidPeerId,
    ProfileError,
    StoreError,
    TeiaError,
    TransportError,
    UnknownContact,
)
from teia.host.holepunch import HolePunchConfig
from teia.host.host import Host
from teia.host.streams import NegotiatedStream
from teia.identity import Multiaddr, PeerId
from teia.peer.attachments import PROTOCOL as ATTACHMENT_PROTOCOL
from teia.peer.attachments import Attachments
from teia.peer.broadcast import Broadcast
from teia.peer.db import (
    Contact,
    MessageRow,
    OutboxItem,
    PeerDatabase,
    SessionSnapshot,
    now_ms,
)
from teia.peer.groups import Groups
from teia.peer.profile import PeerConfig, Profile, default_profile_dir
from teia.peer.safety import safety_number
from teia.peer.wire import (
    CHAT_PROTOCOL,
    MAX_ENVELOPE_SIZE,
    PREKEY_PROTOCOL,
    AckStatus,
    ChatAck,
    ChatEnvelope,
    Kind,
    Plaintext,
    check_app_name,
    open_sealed,
    seal_to,
)

if TYPE_CHECKING:
    from teia.dht.node import DhtNode
    from teia.peer.devices import Devices

__all__ = [
    "AppHandler",
    "AppMessage",
    "Delivered",
    "IdentityChanged",
    "Message",
    "Peer",
    "PeerEvent",
    "Read",
    "Retracted",
    "SessionStarted",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

Path_ = Literal["direct", "relayed", "stored"]
DEFAULT_HOLEPUNCH = HolePunchConfig()
"""How peers upgrade relayed connections unless told otherwise: to public addresses only."""
_BATCH = 256
_STREAM_ERRORS = (
    TransportError,
    OSError,
    TimeoutError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
_SPK_RETENTION_MS = 30 * 86_400_000
# Offset of the initiator's base key EK_A in a serialised session (docs/crypto.md).
_SESSION_BASE_KEY = slice(66, 98)


# --- what the application sees ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A message received, as `Peer.messages` yields it."""

    seq: int
    """Position in this peer's history (increasing)."""
    message_id: str
    """Hex of the 16-byte message ID."""
    sender: PeerId
    conversation: str
    text: str
    sent_ms: int
    """The sender's clock."""
    received_ms: int
    path: str
    """How it arrived: ``direct``, ``relayed`` or ``stored``."""

    @classmethod
    def from_row(cls, row: MessageRow) -> Message:
        return cls(
            row.seq,
            row.message_id.hex(),
            PeerId.from_string(row.peer_id),
            row.conversation,
            row.text,
            row.sent_ms,
            row.received_ms or 0,
            row.path or "direct",
        )


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message of ours reached the recipient's history (or a store, ``path == "stored"``)."""

    message_id: str
    peer: PeerId
    path: str
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """A contact name now points at another identity: verify before trusting it."""

    name: str
    old_peer: PeerId
    new_peer: PeerId


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """A peer started a new session with us (``reset``: replacing an existing one)."""

    peer: PeerId
    reset: bool


@dataclass(frozen=True, slots=True)
class Read:
    """``peer`` read these texts of ours (its read receipt; `Peer.mark_read` on its side)."""

    peer: PeerId
    message_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Retracted:
    """``peer`` took back a text it had sent us (`Peer.retract` on its side): emptied here."""

    peer: PeerId
    message_id: str


PeerEvent = Delivered | IdentityChanged | SessionStarted | Read | Retracted

APP_RETRACT: Final = "teia.retract"
"""Deleting a text for everyone: the 16-byte ID of one of the sender's own texts."""

APP_READ: Final = "teia.read"
"""Read receipts: the 16-byte IDs of texts read, 1 to `MAX_READ_IDS` of them."""
MAX_READ_IDS: Final = 256


def _text_id(message_id: str) -> bytes:
    try:
        raw = bytes.fromhex(message_id)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise DeliveryError(f"{message_id!r} is not a message ID (32 hex digits)")
    return raw


def queue_retraction(profile: Profile, message_id: str) -> None:
    """`Peer.retract` from a process that does not have the profile online: the text is
    emptied here and the notice queued in the outbox for the process that has it online."""
    raw = _text_id(message_id)
    db = profile.db
    row = db.outgoing_message(raw)
    if row is None or row.conversation != row.peer_id:
        raise DeliveryError(f"no text {message_id} of ours to retract")
    if db.retract(row.peer_id, True, raw):
        db.queue_app(row.peer_id, APP_RETRACT, raw)


def encode_read(message_ids: Sequence[bytes]) -> bytes:
    """A read receipt's payload: the message IDs, 16 bytes each."""
    if not 1 <= len(message_ids) <= MAX_READ_IDS or any(len(m) != 16 for m in message_ids):
        raise InvalidChatMessage(f"a read receipt names 1 to {MAX_READ_IDS} 16-byte IDs")
    return b"".join(message_ids)


def decode_read(data: bytes) -> list[bytes]:
    """The message IDs of a read receipt; `InvalidChatMessage` for anything else."""
    if not data or len(data) % 16 or len(data) > 16 * MAX_READ_IDS:
        raise InvalidChatMessage("a read receipt is 1 to 256 16-byte message IDs")
    return [data[i : i + 16] for i in range(0, len(data), 16)]


@dataclass(frozen=True, slots=True)
class AppMessage:
    """An application payload received (see `Peer.send_app`)."""

    sender: PeerId
    message_id: bytes
    app: str
    data: bytes
    sent_ms: int
    """The sender's clock."""
    path: str
    """How it arrived: ``direct``, ``relayed`` or ``stored``."""


AppHandler = Callable[[AppMessage], Awaitable[None]]
"""Takes one application payload; raises `TeiaError` to refuse it. Keep it short: long work
belongs in a task (`Peer.task_group`)."""


@dataclass(frozen=True, slots=True)
class _Incoming:
    peer: PeerId
    envelope: ChatEnvelope
    path: Path_


class _MessageIds:
    """Message IDs: 6 bytes of wall-clock milliseconds (big-endian, never going back within
    this process) then 10 bytes from the system's CSPRNG.

    History is indexed by (peer, direction, message ID) on both sides: with random IDs each
    message landed on a random leaf of that index, so a batch of 64 dirtied ~64 pages for
    the commit (and for every checkpoint after it); time-ordered IDs append at the end of the
    peer's range. The time is no news to anyone who sees an ID: the envelope and the store's
    deposit carry the sending time, and 80 random bits keep IDs unguessable. The random part
    comes from a 4 KiB read (one system call per 409 IDs): each call releases the GIL, and on
    a busy peer the database thread then holds it for a while."""

    __slots__ = ("_buffer", "_last_ms", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        self._last_ms = 0

    def take(self) -> bytes:
        if self._offset + 10 > len(self._buffer):
            self._buffer, self._offset = os.urandom(4090), 0
        start = self._offset
        self._offset = start + 10
        self._last_ms = max(self._last_ms, time.time_ns() // 1_000_000)
        return self._last_ms.to_bytes(6, "big") + self._buffer[start : start + 10]


class _Call:
    """A database call queued for `_DatabaseThread`."""

    __slots__ = ("error", "finished", "fn", "result", "wake")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.wake = anyio.Event()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None


class _DatabaseThread:
    """The peer's database calls, one at a time and in the order they were queued, on one
    worker thread of its own (never on the event loop: the architecture's rule).

    A call is queued synchronously (`submit`), so its place in the order is fixed before the
    caller yields: a commit queued before an event is emitted is in the database for any call
    made after seeing the event. The thread takes calls as they come and, after each, has the
    event loop wake its caller (``run_sync_soon`` / ``call_soon_threadsafe``): no thread is
    borrowed from a pool and handed back per call, which takes about 60 µs off the round trip
    (85 µs here, against 145 µs through ``anyio.to_thread.run_sync``); a message costs one
    round trip on each side.

    Cancellation works as with one `to_thread.run_sync` per call: a call not started yet is
    withdrawn, a started one is waited for. `close` stops the thread once what is queued ran.
    """

    def __init__(self) -> None:
        self._pending: deque[_Call | None] = deque()  # None: stop
        self._queue_lock = threading.Lock()
        self._signal = threading.Event()
        # Under _queue_lock: the thread found nothing queued and waits, or is about to. Only
        # then does `submit` signal it (a signal costs a lock and a notify, ~2 µs a call).
        self._idle = True
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        with self._queue_lock:
            self._pending.append(call)
            wake, self._idle = self._idle, False
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, args=(_loop_callback(),), name="teia-peer-db", daemon=True
            )
            self._thread.start()
            wake = True
        if wake:
            self._signal.set()
        return call

    async def run(self, fn: Callable[[], T]) -> T:
        call = self.submit(fn)
        await self.wait(call)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    async def wait(self, call: _Call) -> None:
        """Until ``call`` ran (its outcome is in ``call``)."""
        try:
            await call.wake.wait()
        except BaseException:
            if not call.finished:
                with self._queue_lock:
                    try:
                        self._pending.remove(call)  # not started: it never runs
                        withdrawn = True
                    except ValueError:
                        withdrawn = False
                if not withdrawn:
                    with anyio.CancelScope(shield=True):
                        await call.wake.wait()  # running now: as to_thread does, wait for it
            raise

    async def close(self) -> None:
        """Stop the thread after the calls queued so far (a later `submit` starts another)."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        with self._queue_lock:
            self._pending.append(None)
            self._idle = False
        self._signal.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join)

    def _work(self, soon: Callable[[Callable[[], object]], object]) -> None:
        """The thread: run queued calls in order, waking each caller on the loop."""
        while True:
            self._signal.wait()
            self._signal.clear()
            while True:
                with self._queue_lock:
                    if not self._pending:
                        self._idle = True
                        break
                    call = self._pending.popleft()
                if call is None:
                    return
                try:
                    call.result = call.fn()
                except BaseException as exc:
                    call.error = exc
                call.finished = True
                try:
                    soon(call.wake.set)
                except RuntimeError:  # the event loop is gone: nobody is waiting
                    return


def _loop_callback() -> Callable[[Callable[[], object]], object]:
    """Run a callable on the current event loop from another thread, without waiting."""
    try:
        return trio.lowlevel.current_trio_token().run_sync_soon
    except RuntimeError:  # not in trio: asyncio, the other backend anyio runs on
        return asyncio.get_running_loop().call_soon_threadsafe


# --- the peer -------------------------------------------------------------------------------


class Peer:
    """A chat peer on a profile; see the module docstring. Build it with `Peer.open`."""

    def __init__(self, profile: Profile, host: Host) -> None:
        self.profile = profile
        self.host = host
        self.identity = profile.identity
        self.config: PeerConfig = profile.config
        self._database = _DatabaseThread()
        self._ids = _MessageIds()
        self._merging_search = False
        self._sessions: dict[PeerId, list[Session]] = {}
        self._locks: dict[PeerId, anyio.Lock] = {}
        self._wake: dict[PeerId, anyio.Event] = {}
        self._workers: set[PeerId] = set()
        self._queues: dict[PeerId, list[OutboxItem]] = {}
        self._unsaved: dict[PeerId, list[dict[str, Any]]] = {}
        self._saving: dict[PeerId, anyio.Event] = {}
        self._names: dict[str, PeerId] = {}
        self._texts: dict[PeerId, str] = {}
        self._versions: dict[PeerId, int] = {}
        self._stale: set[PeerId] = set()
        """Peers whose outbox may hold what their delivery task's memory queue does not."""
        self._links: dict[PeerId, tuple[NegotiatedStream, Any]] = {}
        self._queued_at: dict[bytes, float] = {}
        self._delivered_waiters: dict[bytes, anyio.Event] = {}
        self._acked: dict[bytes, tuple[str | None, float | None]] = {}
        """Acknowledged, the commit saying so still running: (path, latency ms)."""
        self._new_message = anyio.Event()
        self._events: Broadcast[PeerEvent] = Broadcast()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._relay_ips = {relay.server[0] for relay in self.config.relay_configs()}
        self._opened_seq = 0
        self._dht: Any = None
        self._published = anyio.Event()
        self._dht_joined = anyio.Event()
        self._store: Any = None
        self._apps: dict[str, AppHandler] = {}
        self._app_wake = anyio.Event()
        self.devices: Devices
        """This device's account: device list, fan-out, linking (`teia.peer.devices`)."""
        self.stats: dict[str, int] = {
            "refused": 0,
            "duplicates": 0,
            "received": 0,
            "app_taken": 0,
            "app_refused": 0,
            "app_failed": 0,
            "app_unknown": 0,
        }
        """Counts (metadata only) for metrics and tests."""
        self.attachments = Attachments(self)
        """File transfers (`teia.peer.attachments`)."""
        self.groups = Groups(self)
        """Groups: create, change, send to (`teia.peer.groups`)."""

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        profile: Profile | Path | str | None = None,
        *,
        passphrase: str | bytes | None = None,
        listen: Sequence[str] | None = None,
        dial_timeout: float = 5.0,
        apps: Mapping[str, AppHandler] | None = None,
        holepunch: HolePunchConfig | None = DEFAULT_HOLEPUNCH,
    ) -> AsyncIterator[Peer]:
        """Open a profile directory (or use an opened `Profile`) and bring the peer online.

        ``passphrase`` opens the keystore (needed unless a `Profile` is given); ``listen``
        overrides the profile's listen addresses; ``apps`` registers application handlers
        before anything arrives (see `on_app`); ``holepunch`` says how relayed connections are
        upgraded to direct ones (None: never; docs/nat.md). Usable from trio and asyncio
        programs.
        """
        if not isinstance(profile, Profile):
            if passphrase is None:
                raise ProfileError("a passphrase is needed to open the profile's keystore")
            directory = Path(profile) if profile is not None else default_profile_dir()
            opened = await anyio.to_thread.run_sync(Profile.open, directory, passphrase)
            owned = True
        else:
            opened, owned = profile, False
        try:
            config = opened.config
            with opened.online():
                async with cls._online(
                    opened, listen or config.listen, dial_timeout, apps or {}, holepunch
                ) as peer:
                    yield peer
        finally:
            if owned:
                opened.close()

    @classmethod
    @asynccontextmanager
    async def _online(
        cls,
        opened: Profile,
        listen: Sequence[str],
        dial_timeout: float,
        apps: Mapping[str, AppHandler],
        holepunch: HolePunchConfig | None,
    ) -> AsyncIterator[Peer]:
        config = opened.config
        async with (
            Host(
                opened.identity,
                listen=list(listen),
                relays=config.relay_configs(),
                dial_timeout=dial_timeout,
                # direct = false means no direct path at all, punched ones included.
                holepunch=holepunch if config.direct else None,
            ) as host,
            contextlib.AsyncExitStack() as stack,
        ):
            peer = cls(opened, host)
            try:
                peer.on_app(APP_READ, peer._on_read)
                peer.on_app(APP_RETRACT, peer._on_retract)
                for app, handler in apps.items():
                    peer.on_app(app, handler)
                from teia.peer.devices import Devices

                peer.devices = await Devices.attach(peer)
                if config.bootstrap:
                    from teia.dht.core import Mode
                    from teia.dht.node import DhtNode

                    peer._dht = await stack.enter_async_context(DhtNode(host, mode=Mode.CLIENT))
                async with anyio.create_task_group() as tg:
                    peer._task_group = tg
                    try:
                        await peer._start()
                        yield peer
                    finally:
                        tg.cancel_scope.cancel()
                        peer._task_group = None
                        peer._events.close()
                        if peer._store is not None:
                            with anyio.CancelScope(shield=True):
                                await peer._store.client.aclose()
            finally:
                await peer._database.close()

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._database.run(partial(fn, *args, **kwargs))

    async def _start(self) -> None:
        db = self.profile.db
        self._opened_seq = await self._db(db.last_seq)
        await self._ensure_prekeys()
        self.host.set_handler(CHAT_PROTOCOL, self._serve_chat)
        self.host.set_handler(PREKEY_PROTOCOL, self._serve_prekeys)
        self.host.set_handler(ATTACHMENT_PROTOCOL, self.attachments.serve)
        if self.config.store_nodes:
            self._setup_store()
        if self.config.bootstrap:
            await self._setup_dht()
        assert self._task_group is not None
        await self.attachments.start()
        await self.groups.start()
        await self.devices.resume()
        self._task_group.start_soon(self._dispatch_apps)
        if self._store is not None:
            await self._publish_bundle()
            await self.fetch_stored()
            self._task_group.start_soon(self._poll_store)
        await self._scan_outbox()
        await self.attachments.adopt_queued()
        self._task_group.start_soon(self._watch_outbox)
        self._task_group.start_soon(self._keep_prekeys)

    async def _scan_outbox(self) -> None:
        for peer_id in await self._db(self.profile.db.outbox_peers):
            with contextlib.suppress(InvalidPeerId):
                peer = PeerId.from_string(peer_id)
                if peer not in self._workers:
                    self._kick(peer)
                else:
                    # Maybe queued by another process: the running task reads the database
                    # once its memory queue is empty.
                    self._stale.add(peer)

    async def _watch_outbox(self) -> None:
        """Pick up what other processes queued (``teia send`` and ``teia file send`` while
        this peer runs)."""
        while True:
            await anyio.sleep(self.config.retry_interval)
            await self._scan_outbox()
            await self.attachments.adopt_queued()

    # --- who and where --------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        """Where others can reach this peer (``…/p2p/<id>``), relayed addresses included."""
        return self.host.addrs

    @property
    def pending_recipients(self) -> int:
        """Recipients with envelopes still in the outbox (a delivery task running)."""
        return len(self._workers)

    # --- contacts -------------------------------------------------------------------------

    async def add_contact(
        self, peer: PeerId | str, name: str | None = None, addrs: Sequence[str] = ()
    ) -> Contact:
        """Add (or update) a contact. Binding ``name`` to a different identity than before
        marks the new contact ``unverified-changed`` and emits `IdentityChanged`."""
        peer_id = peer if isinstance(peer, PeerId) else PeerId.from_string(peer)
        key = peer_id.public_key
        if key is None:
            raise InvalidPeerId(f"{peer_id} does not embed its public key (not Ed25519)")
        for addr in addrs:
            Multiaddr(addr)  # validate
        self._names.clear()
        contact, previous = await self._db(
            self.profile.db.upsert_contact, self._text(peer_id), key, name=name, addrs=addrs
        )
        if addrs:
            self.host.peerstore.add(
                peer_id, [Multiaddr(a) for a in addrs], ttl=float("inf"), now=anyio.current_time()
            )
        if previous is not None and name is not None:
            self._emit(IdentityChanged(name, PeerId.from_string(previous.peer_id), peer_id))
        return contact

    async def contacts(self) -> list[Contact]:
        return await self._db(self.profile.db.contacts)

    async def contact(self, who: PeerId | str) -> Contact:
        """A contact by name or peer ID; `UnknownContact` if absent."""
        db = self.profile.db
        found = await self._db(db.contact_by_name, str(who)) if isinstance(who, str) else None
        if found is None:
            with contextlib.suppress(InvalidPeerId):
                peer_id = who if isinstance(who, PeerId) else PeerId.from_string(who)
                found = await self._db(db.contact, self._text(peer_id))
        if found is None:
            raise UnknownContact(f"no contact {who}")
        return found

    async def verify_contact(self, who: PeerId | str) -> Contact:
        """Mark a contact verified (after comparing safety numbers)."""
        contact = await self.contact(who)
        self._names.clear()
        await self._db(self.profile.db.set_trust, contact.peer_id, "verified")
        return await self.contact(contact.peer_id)

    def safety_number(self, peer: PeerId | str) -> str:
        """The 60-digit safety number between us and ``peer``."""
        peer_id = peer if isinstance(peer, PeerId) else PeerId.from_string(peer)
        key = peer_id.public_key
        if key is None:
            raise InvalidPeerId(f"{peer_id} does not embed its public key")
        return safety_number(
            self.identity.public_key, self.peer_id.to_bytes(), key, peer_id.to_bytes()
        )

    async def resolve(self, who: PeerId | str) -> PeerId:
        """A peer ID from a contact name or a peer ID; refuses a name whose identity changed
        and was not verified since (`ContactIdentityChanged`)."""
        if isinstance(who, PeerId):
            return who
        cached = self._names.get(who)
        if cached is not None:
            return cached
        peer_id = await self._db(resolve_recipient, self.profile.db, who)
        if len(self._names) < 10_000:
            self._names[who] = peer_id
        return peer_id

    # --- history --------------------------------------------------------------------------

    async def history(
        self, who: PeerId | str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[MessageRow]:
        """The conversation with ``who``, oldest first."""
        peer_id = await self.resolve(who)
        return await self._db(
            self.profile.db.history, self._text(peer_id), limit=limit, before_seq=before_seq
        )

    async def mark_read(self, who: PeerId | str, message_ids: Sequence[str] | None = None) -> int:
        """Mark texts from ``who`` as read (all unread ones, or those named by hex ID) and,
        unless ``read_receipts`` is off, tell ``who`` (a ``teia.read`` payload per 256 IDs: its
        texts turn ``read`` there and it gets a `Read` event); how many were newly read."""
        peer_id = await self.resolve(who)
        wanted = None if message_ids is None else [bytes.fromhex(m) for m in message_ids]
        total = 0
        while True:
            marked = await self._db(
                self.profile.db.mark_read_incoming, self._text(peer_id), wanted, MAX_READ_IDS
            )
            if marked and self.config.read_receipts:
                await self.send_app(peer_id, APP_READ, encode_read(marked))
            total += len(marked)
            if wanted is not None:
                wanted = wanted[MAX_READ_IDS:]
                if not wanted:
                    return total
            elif len(marked) < MAX_READ_IDS:
                return total

    async def retract(self, message_id: str) -> str | None:
        """Delete one of our texts for everyone: emptied in our history at once and in the
        recipient's when the notice reaches it (a ``teia.retract`` payload, delivered like a
        text, through the store if need be; it gets a `Retracted` event); the notice's
        message ID (`wait_delivered`), None when the text was retracted already. What the
        recipient already read or copied cannot be taken back. `DeliveryError` for an ID that
        is not one of our texts."""
        raw = _text_id(message_id)
        row = await self._db(self.profile.db.outgoing_message, raw)
        if row is None or row.conversation != row.peer_id:
            raise DeliveryError(f"no text {message_id} of ours to retract")
        if not await self._db(self.profile.db.retract, row.peer_id, True, raw):
            return None
        return await self.send_app(PeerId.from_string(row.peer_id), APP_RETRACT, raw)

    async def _on_retract(self, message: AppMessage) -> None:
        if len(message.data) != 16:
            raise InvalidChatMessage("a retraction names one 16-byte message ID")
        sender = self._text(message.sender)
        if await self._db(self.profile.db.retract, sender, False, message.data):
            self._emit(Retracted(message.sender, message.data.hex()))

    async def _on_read(self, message: AppMessage) -> None:
        ids = decode_read(message.data)
        marked = await self._db(self.profile.db.mark_read_outgoing, self._text(message.sender), ids)
        if marked:
            self._emit(Read(message.sender, tuple(m.hex() for m in marked)))

    async def search(self, query: str, *, limit: int = 100) -> list[MessageRow]:
        """Messages containing every word of ``query``, newest first."""
        return await self._db(self.profile.db.search, query, limit=limit)

    # --- sending --------------------------------------------------------------------------

    async def send(self, to: PeerId | str, text: str) -> str:
        """Queue ``text`` for ``to`` (peer ID or contact name); returns the message ID (hex).

        It is in history and the outbox when this returns (encrypted already when a session
        exists: history, envelope and session state in one transaction; concurrent calls for
        one recipient share a transaction); delivery runs in the background
        (`wait_delivered`, `events`).
        """
        peer_id = await self._recipient(to)
        plaintext = Plaintext(text).encode()  # size check before anything is written
        return await self._queue(peer_id, Kind.TEXT, plaintext, text, self._text(peer_id))

    async def send_app(self, to: PeerId | str, app: str, data: bytes) -> str:
        """Queue an application payload for ``to``: ``data`` (at most `MAX_APP_DATA` bytes)
        for the handler registered under ``app`` on the other side (`on_app`). It travels
        like a text — end-to-end encrypted, retried, stored when the recipient is offline —
        but leaves no text in history; `wait_delivered` works on the returned ID (hex)."""
        peer_id = await self._recipient(to)
        plaintext = Plaintext(app=check_app_name(app), data=data).encode()
        return await self._queue(peer_id, Kind.APP, plaintext, "", "")

    def on_app(self, app: str, handler: AppHandler) -> None:
        """Register (or replace) the handler for application payloads named ``app``.

        Payloads whose application has no handler when they come up are dropped (counted as
        ``app_unknown``): register with ``Peer.open(apps=…)`` to see those that arrive while
        the peer starts."""
        self._apps[check_app_name(app)] = handler
        self._app_wake.set()

    def new_message_id(self) -> bytes:
        """A new 16-byte message ID: time-ordered, then 80 random bits (`_MessageIds`)."""
        return self._ids.take()

    @property
    def dht(self) -> DhtNode | None:
        """The peer's DHT client, or None when no bootstrap nodes are configured."""
        dht: DhtNode | None = self._dht
        return dht

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The peer's task group, for work that lives as long as the peer is open."""
        if self._task_group is None:
            raise DeliveryError("the peer is not open")
        return self._task_group

    async def run_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a database call on the peer's one database thread (calls run in order)."""
        return await self._db(fn, *args, **kwargs)

    async def _recipient(self, to: PeerId | str) -> PeerId:
        peer_id = await self.resolve(to)
        if peer_id == self.peer_id:
            raise DeliveryError("cannot send to ourselves")
        if peer_id.public_key is None:
            raise InvalidPeerId(f"{peer_id} does not embed its public key")
        return peer_id

    async def _queue(
        self, peer_id: PeerId, kind: Kind, plaintext: bytes, text: str, conversation: str
    ) -> str:
        message_id = self.new_message_id()
        self._queued_at[message_id] = time.perf_counter()
        lock = self._lock(peer_id)
        if peer_id in self._sessions and not lock.locked():
            # Nothing to await: this runs as if under the lock, without its two checkpoints.
            record = self._encrypt_record(peer_id, message_id, kind, plaintext, text, conversation)
        else:
            async with lock:
                await self._load_sessions(peer_id)
                record = self._encrypt_record(
                    peer_id, message_id, kind, plaintext, text, conversation
                )
        await self._save_sends(peer_id, record)
        self._kick(peer_id)
        return message_id.hex()

    def _encrypt_record(
        self,
        peer_id: PeerId,
        message_id: bytes,
        kind: Kind,
        plaintext: bytes,
        text: str,
        conversation: str,
    ) -> dict[str, Any]:
        """Under the peer's lock (or with nothing awaited), sessions loaded: encrypt when a
        session exists and hand the record to the group commit."""
        sessions = self._sessions[peer_id]
        sent_ms = self.profile.db.next_timestamp()
        envelope = None
        if sessions:
            body = sessions[0].encrypt(plaintext)
            self._changed(peer_id)
            envelope = ChatEnvelope(
                message_id, self.peer_id.to_bytes(), "", sent_ms, kind, body
            ).encode()
        record: dict[str, Any] = {
            "message_id": message_id,
            "sent_ms": sent_ms,
            "text": text,
            "kind": int(kind),
            "plaintext": plaintext,
            "envelope": envelope,
            "conversation": conversation,
        }
        self._unsaved.setdefault(peer_id, []).append(record)
        return record

    def _take_unsaved(self, peer: PeerId) -> tuple[list[dict[str, Any]], SessionSnapshot | None]:
        """Under the peer's lock (or with nothing awaited): what is queued for the commit."""
        batch = self._unsaved.pop(peer, [])
        states = None
        if any(r["envelope"] is not None for r in batch):
            states = self._snapshot(peer)
        return batch, states

    async def _save_sends(self, peer: PeerId, record: dict[str, Any]) -> None:
        """Group commit: whoever finds no commit running commits everything queued so far for
        ``peer`` (with the session state after the last of them); the others wait for it."""
        while "saved" not in record:
            running = self._saving.get(peer)
            if running is not None:
                await running.wait()
                continue
            done = self._saving[peer] = anyio.Event()
            batch: list[dict[str, Any]] = []
            try:
                lock = self._lock(peer)
                if lock.locked():
                    async with lock:
                        batch, states = self._take_unsaved(peer)
                else:
                    batch, states = self._take_unsaved(peer)
                await self._db(
                    self.profile.db.queue_many, self._text(peer), self._text(peer), batch, states
                )
                self._index_search_soon()
            except BaseException as exc:
                async with self._lock(peer):
                    # Envelopes made after this batch came from the state that was not saved:
                    # they fail too, and the session is read again from the database.
                    batch += self._unsaved.pop(peer, [])
                    self._sessions.pop(peer, None)
                for r in batch:
                    r["saved"] = exc
                raise
            else:
                queue = self._queues.setdefault(peer, [])
                for r in batch:
                    r["saved"] = None
                    queue.append(
                        OutboxItem(
                            self._text(peer),
                            r["message_id"],
                            r["kind"],
                            None if r["envelope"] else r["plaintext"],
                            r["envelope"],
                            0,
                            r["sent_ms"],
                        )
                    )
            finally:
                self._saving.pop(peer, None)
                done.set()
        if isinstance(record["saved"], BaseException):
            raise DeliveryError("the message could not be saved") from record["saved"]

    async def wait_delivered(self, message_id: str) -> MessageRow:
        """Wait until our message reaches ``delivered`` or ``stored``; bound it with
        ``anyio.fail_after``."""
        raw = bytes.fromhex(message_id)
        while True:
            waiter = self._delivered_waiters.setdefault(raw, anyio.Event())
            row = await self._db(self.profile.db.outgoing_message, raw)
            if row is None:
                raise DeliveryError(f"no outgoing message {message_id}")
            acked = self._acked.get(raw)
            if acked is not None and row.state not in ("delivered", "stored", "read", "retracted"):
                # Acknowledged, its commit queued but not done when the row was read.
                path, latency = acked
                row = replace(
                    row,
                    state="delivered",
                    path=path or row.path,
                    latency_ms=row.latency_ms if latency is None else latency,
                )
            if row.state in ("delivered", "stored", "read", "retracted"):
                self._delivered_waiters.pop(raw, None)
                return row
            await waiter.wait()

    def _kick(self, peer: PeerId) -> None:
        wake = self._wake.get(peer)
        if wake is None:
            wake = self._wake[peer] = anyio.Event()
        wake.set()
        if peer not in self._workers and self._task_group is not None:
            self._workers.add(peer)
            self._task_group.start_soon(self._deliver_loop, peer)

    async def _deliver_loop(self, peer: PeerId) -> None:
        """Empty the outbox for ``peer``: what `send` handed over in memory while things go
        well, the database's outbox at the start, after any failure and when something was
        queued around the memory (`_stale`)."""
        db = self.profile.db
        queue = self._queues.setdefault(peer, [])
        from_db = not queue
        # IDs read from the database since the last time the memory queue was used: the queue
        # may hold them too (committed before that read, handed over after it).
        taken: set[bytes] = set()
        reading = False
        try:
            while True:
                self._wake[peer] = anyio.Event()
                if from_db:
                    if not reading:
                        queue[:] = [item for item in queue if item.message_id not in taken]
                        taken = set()
                        reading = True
                    self._stale.discard(peer)
                    # Acknowledged deliveries were queued for commit before this read (calls
                    # run in order), so they are not read back as undelivered.
                    page = await self._db(db.outbox, self._text(peer), limit=_BATCH)
                    items = [item for item in page if item.message_id not in taken]
                    taken.update(item.message_id for item in items)
                    # A full page: read on until the database has nothing older than the queue.
                    from_db = reading = len(page) >= _BATCH
                    if not items:
                        continue
                else:
                    items = [item for item in queue[:_BATCH] if item.message_id not in taken]
                    del queue[:_BATCH]
                    if not items:
                        if queue:
                            continue
                        if peer in self._stale:
                            from_db = True
                            continue
                        return
                try:
                    await self._deliver(peer, items)
                    continue
                except (DeliveryError, TeiaError, *_STREAM_ERRORS) as exc:
                    _log.info("delivery to %s deferred: %s", peer, type(exc).__name__)
                    from_db, reading = True, False  # read again what failed
                    await self._db(
                        db.note_attempt,
                        self._text(peer),
                        [i.message_id for i in items],
                        type(exc).__name__,
                    )
                with anyio.move_on_after(self.config.retry_interval):
                    await self._wake[peer].wait()
        finally:
            self._workers.discard(peer)

    async def _deliver(self, peer: PeerId, items: list[OutboxItem]) -> None:
        if any(item.envelope is None for item in items):
            items = await self._encrypt(peer, items)
        try:
            path = await self._connect(peer)
        except DeliveryError:
            if self._store is None:
                raise
            await self._deposit(peer, items)
            return
        try:
            await self._send_on_stream(peer, items, path)
        except (TransportError, anyio.EndOfStream, anyio.BrokenResourceError):
            # A kept stream may have died with its connection: once more on a fresh one.
            await self._connect(peer)
            await self._send_on_stream(peer, items, self._path_of(peer))

    async def _encrypt(self, peer: PeerId, items: list[OutboxItem]) -> list[OutboxItem]:
        """Encrypt every item without an envelope, committing sessions and envelopes first."""
        async with self._lock(peer):
            sessions = await self._load_sessions(peer)
            if not sessions:
                sessions = [await self._initiate(peer)]
                self._sessions[peer] = sessions
            session = sessions[0]
            self._changed(peer)
            done: list[OutboxItem] = []
            envelopes: list[tuple[bytes, bytes]] = []
            for item in items:
                if item.envelope is not None:
                    done.append(item)
                    continue
                assert item.plaintext is not None
                body = session.encrypt(item.plaintext)
                envelope = ChatEnvelope(
                    item.message_id,
                    self.peer_id.to_bytes(),
                    "",
                    item.created_ms,
                    Kind(item.kind),
                    body,
                ).encode()
                envelopes.append((item.message_id, envelope))
                done.append(item.with_envelope(envelope))
            try:
                await self._db(
                    self.profile.db.set_envelopes, self._text(peer), envelopes, self._snapshot(peer)
                )
            except BaseException:
                self._sessions.pop(peer, None)  # reload the committed state next time
                raise
            return done

    async def _initiate(self, peer: PeerId) -> Session:
        """X3DH with a bundle from the peer itself, else from the store nodes."""
        bundle: PrekeyBundle | None = None
        with contextlib.suppress(DeliveryError, *_STREAM_ERRORS, CryptoError, InvalidChatMessage):
            await self._connect(peer)
            stream = await self.host.open_stream(peer, PREKEY_PROTOCOL)
            try:
                with anyio.fail_after(10):
                    await stream.send_message(b"")
                    raw = await stream.receive_message(4096)
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            bundle = PrekeyBundle.from_bytes(raw) if raw else None
        if bundle is None and self._store is not None:
            bundle = await self._bundle_from_store(peer)
        if bundle is None:
            raise DeliveryError(f"no prekey bundle for {peer} yet (not reachable, no store)")
        if bundle.identity_key != peer.public_key:
            raise DeliveryError(f"the prekey bundle offered for {peer} is not that peer's")
        return Session.initiate(self.identity.private_seed, bundle)

    async def _chat_stream(self, peer: PeerId) -> NegotiatedStream:
        """The stream we keep open to ``peer`` for envelopes (one negotiation, many batches)."""
        kept = self._links.get(peer)
        if kept is not None:
            stream, connection = kept
            if connection is self.host.connection_to(peer):
                return stream
            # Closed, or the host found a better connection (a punched direct one): move.
            del self._links[peer]
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        stream = await self.host.open_stream(peer, CHAT_PROTOCOL)
        self._links[peer] = (stream, self.host.connection_to(peer))
        return stream

    def _drop_stream(self, peer: PeerId) -> None:
        kept = self._links.pop(peer, None)
        if kept is not None:
            kept[0].reset()

    async def _send_on_stream(self, peer: PeerId, items: list[OutboxItem], path: Path_) -> None:
        deliveries: list[tuple[bytes, str | None, float | None]] = []
        refused: list[bytes] = []
        stream = await self._chat_stream(peer)
        try:
            with anyio.fail_after(30):
                await stream.send(b"".join(_frame(item.envelope or b"") for item in items))
                for item in items:
                    ack = ChatAck.decode(await stream.receive_message(64))
                    if ack.message_id != item.message_id:
                        raise InvalidChatMessage("acknowledgement out of order")
                    if ack.status is AckStatus.DELIVERED:
                        deliveries.append((item.message_id, path, self._latency(item)))
                    else:
                        refused.append(item.message_id)
        except BaseException:
            self._drop_stream(peer)
            if deliveries:
                with anyio.CancelScope(shield=True):
                    await self._record_deliveries(peer, deliveries)
            raise
        if deliveries and self._task_group is not None:
            # Neither the next batch nor the `Delivered` events wait for this commit: the
            # commit is queued first, so whoever reads the database after an event sees it.
            self._task_group.start_soon(
                self._finish_recording, *self._recording_call(peer, deliveries)
            )
        elif deliveries:
            await self._record_deliveries(peer, deliveries)
        if refused:
            # The recipient could not read them (it lost its session, say): drop the envelopes
            # so the texts are encrypted again, in a new session, on the next attempt.
            await self._db(self.profile.db.reset_envelopes, self._text(peer), refused)
            async with self._lock(peer):
                self._sessions[peer] = []
                self._changed(peer)
                await self._db(
                    self.profile.db.save_sessions, self._text(peer), self._snapshot(peer)
                )
            raise DeliveryError(f"{len(refused)} envelope(s) refused by {peer}")

    async def _record_deliveries(
        self, peer: PeerId, deliveries: list[tuple[bytes, str | None, float | None]]
    ) -> None:
        await self._finish_recording(*self._recording_call(peer, deliveries))

    def _recording_call(
        self, peer: PeerId, deliveries: list[tuple[bytes, str | None, float | None]]
    ) -> tuple[list[bytes], _Call]:
        """Queue the commit of acknowledged deliveries, then tell waiters and subscribers at
        once (`_finish_recording` waits for the commit). The sender's own bookkeeping is not
        on the latency path: should the process die first, the envelopes stay in the outbox
        and are sent again, and the recipient acknowledges them again without a duplicate.
        Database calls run in order, so any read queued after this sees the commit."""
        call = self._database.submit(
            partial(self.profile.db.mark_delivered, self._text(peer), deliveries)
        )
        ids = [message_id for message_id, _, _ in deliveries]
        for message_id, path, latency in deliveries:
            self._acked[message_id] = (path, latency)
        self._after_delivery(peer, deliveries)
        return ids, call

    async def _finish_recording(self, ids: list[bytes], call: _Call) -> None:
        try:
            with anyio.CancelScope(shield=True):  # a short commit, wanted even at shutdown
                await self._database.wait(call)
            if call.error is not None:
                raise call.error
        finally:
            for message_id in ids:
                self._acked.pop(message_id, None)

    def _latency(self, item: OutboxItem) -> float:
        started = self._queued_at.pop(item.message_id, None)
        if started is not None:
            return (time.perf_counter() - started) * 1000
        return float(max(0, now_ms() - item.created_ms))

    def _after_delivery(
        self, peer: PeerId, deliveries: Sequence[tuple[bytes, str | None, float | None]]
    ) -> None:
        for message_id, path, latency in deliveries:
            waiter = self._delivered_waiters.pop(message_id, None)
            if waiter is not None:
                waiter.set()
            if self._events:
                self._emit(Delivered(message_id.hex(), peer, path or "direct", latency))

    # --- paths ----------------------------------------------------------------------------

    def _path_of(self, peer: PeerId) -> Path_:
        connection = self.host.connection_to(peer)  # the one new streams go on
        if connection is None:
            return "direct"
        # Through one of our allocations, or from the peer's (datagrams from a relay's IP).
        return "relayed" if connection.is_relayed else "direct"

    async def _connect(self, peer: PeerId) -> Path_:
        """Make sure there is a connection to ``peer``: an existing one, a direct dial, then
        a dial through our relay allocation — to the addresses we know, then (when those fail
        or there are none) to fresh ones from the DHT; `DeliveryError` when no path works."""
        if self.host.is_connected(peer):
            return self._path_of(peer)
        known: list[Multiaddr] = []
        contact = await self._db(self.profile.db.contact, self._text(peer))
        if contact is not None:
            known += [Multiaddr(a) for a in contact.addrs]
        known += self.host.peerstore.addrs(peer, now=anyio.current_time())
        tried: set[Multiaddr] = set()
        path = await self._dial_any(peer, known, tried)
        if path is None and self._dht is not None:
            found: list[Multiaddr] = []
            with contextlib.suppress(TeiaError, TimeoutError):
                with anyio.fail_after(15):
                    found = await self._dht.find_peer(peer)
            path = await self._dial_any(peer, found, tried)
        if path is None:
            raise DeliveryError(f"no path to {peer} right now")
        return path

    async def _dial_any(
        self, peer: PeerId, candidates: list[Multiaddr], tried: set[Multiaddr]
    ) -> Path_ | None:
        unique = [
            a for a in dict.fromkeys(c.without_peer_id() for c in candidates) if a not in tried
        ]
        tried.update(unique)
        attempts: list[tuple[bool, Path_]] = []
        if self.config.direct:
            attempts.append((False, "direct"))
        if self._relay_ips:
            attempts.append((True, "relayed"))
        for via_relay, path in attempts:
            for addr in unique:
                try:
                    await self.host.connect(addr.with_peer_id(peer), via_relay=via_relay)
                    return path
                except (*_STREAM_ERRORS, TeiaError) as exc:
                    _log.debug("dial to %s failed: %s", peer, type(exc).__name__)
        return None

    # --- receiving ------------------------------------------------------------------------

    async def _serve_chat(self, stream: NegotiatedStream) -> None:
        peer = stream.remote_peer_id
        if peer is None:
            return
        path = self._path_of(peer)
        while True:
            try:
                first = await stream.receive_message(MAX_ENVELOPE_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, TransportError):
                return  # the sender closed, reset or lost the connection: what arrived is kept
            # A batch: this frame and those already here behind it, in one commit.
            batch = [first]
            while len(batch) < _BATCH:
                frame = stream.receive_message_nowait(MAX_ENVELOPE_SIZE)
                if frame is None:
                    break
                batch.append(frame)
            acks = await self._receive_batch(peer, batch, path)
            await stream.send(b"".join(_frame(ack.encode()) for ack in acks))

    async def _receive_batch(self, peer: PeerId, frames: list[bytes], path: Path_) -> list[ChatAck]:
        """Take a batch of frames from one stream; the answers, in the frames' order."""
        decoded: list[ChatEnvelope | None] = []
        for frame in frames:
            try:
                decoded.append(ChatEnvelope.decode(frame))
            except InvalidChatMessage:
                self.stats["refused"] += 1
                decoded.append(None)
        taken = iter(await self._take(peer, [e for e in decoded if e is not None], path))
        return [
            ChatAck(b"", AckStatus.REFUSED)
            if e is None
            else ChatAck(e.message_id, AckStatus.DELIVERED if next(taken) else AckStatus.REFUSED)
            for e in decoded
        ]

    async def _receive(self, incoming: _Incoming) -> bool:
        """Decrypt, persist, and say whether the envelope is now in history."""
        (ok,) = await self._take(incoming.peer, [incoming.envelope], incoming.path)
        return ok

    async def _take(self, peer: PeerId, envelopes: list[ChatEnvelope], path: Path_) -> list[bool]:
        """Decrypt a batch from ``peer`` and commit it in one transaction (history rows,
        sessions, consumed one-time prekeys); True for each envelope now in history."""
        db = self.profile.db
        results: list[bool] = [False] * len(envelopes)
        if not envelopes:
            return results
        if not self.config.accept_unknown and await self._db(db.contact, self._text(peer)) is None:
            self.stats["refused"] += len(envelopes)
            return results
        records: list[dict[str, Any]] = []
        owners: list[int] = []
        events: list[PeerEvent] = []
        receipts: list[bytes] = []
        texts = 0
        async with self._lock(peer):
            working = [s.copy() for s in await self._load_sessions(peer)]
            in_batch: set[bytes] = set()
            for index, envelope in enumerate(envelopes):
                if envelope.sender != peer.to_bytes():
                    self.stats["refused"] += 1
                    continue
                if envelope.message_id in in_batch:
                    results[index] = True
                    continue
                try:
                    opened = await self._decrypt(peer, envelope.body, working)
                    plaintext = Plaintext.decode(opened[0]) if opened is not None else None
                except (CryptoError, InvalidChatMessage, ProfileError):
                    opened = plaintext = None
                if opened is None or plaintext is None:
                    # Not readable: an envelope we already hold (a retry, a replay), or bad.
                    if await self._db(db.has_incoming, self._text(peer), envelope.message_id):
                        self.stats["duplicates"] += 1
                        results[index] = True
                    else:
                        self.stats["refused"] += 1
                    continue
                _, working, used_opk, started, base_key = opened
                is_text = envelope.kind is Kind.TEXT
                is_app = envelope.kind is Kind.APP and bool(plaintext.app)
                records.append(
                    {
                        "message_id": envelope.message_id,
                        "conversation": self._text(peer),
                        "sent_ms": envelope.timestamp_ms,
                        "text": plaintext.text if is_text else None,
                        "receipts": plaintext.receipts if envelope.kind is Kind.RECEIPT else (),
                        "used_one_time_prekey": used_opk,
                        "base_key": base_key,
                        "app": (plaintext.app, plaintext.data) if is_app else None,
                    }
                )
                owners.append(index)
                in_batch.add(envelope.message_id)
                if started is not None:
                    events.append(SessionStarted(peer, reset=started))
                if envelope.kind is Kind.RECEIPT:
                    receipts.extend(plaintext.receipts)
            if not records:
                return results
            self._sessions[peer] = working
            self._changed(peer)
            try:
                seqs = await self._db(
                    db.record_incoming,
                    peer_id=self._text(peer),
                    identity_key=peer.public_key or b"",
                    records=records,
                    sessions=self._snapshot(peer),
                    path=path,
                )
            except BaseException:
                self._sessions.pop(peer, None)
                raise
        self._index_search_soon()
        for index, record, seq in zip(owners, records, seqs, strict=True):
            results[index] = True
            if seq is None:
                self.stats["duplicates"] += 1
            else:
                self.stats["received"] += 1
                texts += record["text"] is not None
        for event in events:
            self._emit(event)
        if any(r["used_one_time_prekey"] is not None for r in records):
            self._top_up_soon()
        if texts:
            new, self._new_message = self._new_message, anyio.Event()
            new.set()
        if any(r["app"] is not None for r in records):
            self._app_wake.set()
        if receipts:
            self._after_delivery(peer, [(r, None, None) for r in receipts])
        return results

    async def _decrypt(
        self, peer: PeerId, body: bytes, sessions: list[Session]
    ) -> tuple[bytes, list[Session], int | None, bool | None, bytes | None] | None:
        """(plaintext, sessions after, one-time prekey consumed, new session: reset?, its base
        key), or None when it does not decrypt. ``sessions`` are working copies: the crypto
        core leaves a session untouched when it refuses a message."""
        prekey = is_prekey_message(body)
        base_key: bytes | None = None
        if prekey:
            info = parse_prekey_message(body)
            if info.identity_key != peer.public_key:
                return None  # a prekey message in someone else's name
            base_key = info.base_key
        for index, session in enumerate(sessions):
            try:
                plaintext = session.decrypt(body)
            except CryptoError:
                continue
            if index:
                # The peer answers in our older session: it becomes the current one again.
                sessions.insert(0, sessions.pop(index))
            return plaintext, sessions, None, None, None
        if not prekey:
            return None
        assert base_key is not None
        if any(s.to_bytes()[_SESSION_BASE_KEY] == base_key for s in sessions):
            return None  # a replay of a session we already hold
        db = self.profile.db
        if await self._db(db.seen_base_key, self._text(peer), base_key):
            return None  # a replay of an older session
        spk = await self._db(db.signed_prekey, info.signed_prekey_id)
        opk_id = info.one_time_prekey_id
        opk = await self._db(db.one_time_prekey, opk_id) if opk_id is not None else None
        if spk is None or (opk_id is not None and opk is None):
            return None
        session, plaintext = Session.accept(self.identity.private_seed, spk, opk, body)
        return plaintext, [session, *sessions[:1]], opk_id, bool(sessions), base_key

    async def _load_sessions(self, peer: PeerId) -> list[Session]:
        cached = self._sessions.get(peer)
        if cached is None:
            states, version = await self._db(self._read_sessions, self._text(peer))
            cached = self._sessions[peer] = [Session.from_bytes(s) for s in states]
            self._versions[peer] = max(version, self._versions.get(peer, 0))
        return cached

    def _read_sessions(self, peer: str) -> tuple[list[bytes], int]:
        db = self.profile.db
        return db.sessions(peer), db.session_version(peer)

    def _index_search_soon(self) -> None:
        """Queue the move of recent search tokens into the index when it is due; nobody
        waits for it (`PeerDatabase.merge_search`)."""
        if self._merging_search or not self.profile.db.search_merge_due:
            return
        self._merging_search = True
        self._database.submit(self._merge_search)

    def _merge_search(self) -> None:
        """On the database thread."""
        try:
            self.profile.db.merge_search()
        except (sqlite3.Error, ProfileError) as exc:  # search still reads the unmerged table
            _log.warning("search index merge failed: %s", type(exc).__name__)
        finally:
            self._merging_search = False

    def _changed(self, peer: PeerId) -> None:
        """The sessions with ``peer`` changed in memory (call under its lock)."""
        self._versions[peer] = self._versions.get(peer, 0) + 1

    def _snapshot(self, peer: PeerId) -> SessionSnapshot:
        return self._versions.get(peer, 0), [s.to_bytes() for s in self._sessions.get(peer, [])]

    def _text(self, peer: PeerId) -> str:
        """``str(peer)``, remembered: base58 is costly on every message's path."""
        text = self._texts.get(peer)
        if text is None:
            if len(self._texts) >= 10_000:
                self._texts.clear()
            text = self._texts[peer] = str(peer)
        return text

    def _lock(self, peer: PeerId) -> anyio.Lock:
        lock = self._locks.get(peer)
        if lock is None:
            lock = self._locks[peer] = anyio.Lock()
        return lock

    async def _dispatch_apps(self) -> None:
        """Hand application payloads to their handlers, in arrival order, one at a time."""
        db = self.profile.db
        cursor = 0
        while True:
            self._app_wake = anyio.Event()
            rows = await self._db(db.app_pending, cursor)
            if not rows:
                cursor = 0
                await self._app_wake.wait()
                continue
            for row in rows:
                cursor = row.seq
                handler = self._apps.get(row.app)
                try:
                    if handler is None:
                        self.stats["app_unknown"] += 1
                        _log.info("application payload for unknown app %r dropped", row.app)
                    else:
                        await handler(
                            AppMessage(
                                PeerId.from_string(row.peer_id),
                                row.message_id,
                                row.app,
                                row.data,
                                row.sent_ms,
                                row.path,
                            )
                        )
                        self.stats["app_taken"] += 1
                except TeiaError as exc:
                    self.stats["app_refused"] += 1
                    _log.info("%s payload refused: %s", row.app, type(exc).__name__)
                except Exception as exc:  # a handler's bug must not stop the others
                    self.stats["app_failed"] += 1
                    _log.warning("%s handler failed: %s", row.app, type(exc).__name__)
                await self._db(db.app_done, row.seq)

    def _history_changed(self) -> None:
        """Wake `messages` readers: a feature put a row into history."""
        new, self._new_message = self._new_message, anyio.Event()
        new.set()

    async def messages(self, *, since_seq: int | None = None) -> AsyncIterator[Message]:
        """Messages received, in history order, forever (break out of the loop to stop).

        Starts after ``since_seq``, by default at what history held when the peer opened, so
        nothing that arrives while the program starts is missed.
        """
        cursor = self._opened_seq if since_seq is None else since_seq
        while True:
            waiter = self._new_message
            rows = await self._db(self.profile.db.messages_after, cursor)
            for row in rows:
                cursor = row.seq
                yield Message.from_row(row)
            if not rows:
                await waiter.wait()

    @asynccontextmanager
    async def events(
        self, buffer: int = 1024
    ) -> AsyncIterator[anyio.abc.ObjectReceiveStream[PeerEvent]]:
        """``async with peer.events() as events: async for event in events:`` — deliveries,
        identity changes, new sessions (dropped when the consumer falls ``buffer`` behind)."""
        async with self._events.subscribe(buffer) as receive:
            yield receive

    def _emit(self, event: PeerEvent) -> None:
        self._events.emit(event)

    # --- prekeys --------------------------------------------------------------------------

    async def _ensure_prekeys(self) -> None:
        """A signed prekey younger than ``signed_prekey_days`` (older ones kept for
        `_SPK_RETENTION_MS` after their replacement), and enough one-time prekeys."""
        db = self.profile.db
        ages = await self._db(db.signed_prekey_ages)
        now = now_ms()
        rotated = False
        if not ages or now - ages[0][1] >= self.config.signed_prekey_days * 86_400_000:
            prekey_id = await self._db(db.next_counter, "signed_prekey_id")
            spk = SignedPrekey.generate(self.identity.private_seed, prekey_id)
            await self._db(db.add_signed_prekey, spk)
            rotated = bool(ages)
            ages = [(prekey_id, now), *ages]
        # A replaced key goes once its successor is older than the retention time.
        expired = [
            old_id
            for (_, newer_created), (old_id, _) in itertools.pairwise(ages)
            if now - newer_created >= _SPK_RETENTION_MS
        ]
        if expired:
            await self._db(db.delete_signed_prekeys, expired)
        await self._top_up()
        if rotated and self._store is not None:
            await self._publish_bundle()

    async def _keep_prekeys(self) -> None:
        while True:
            await anyio.sleep(3600)
            try:
                await self._ensure_prekeys()
            except (TeiaError, *_STREAM_ERRORS) as exc:
                _log.info("prekey upkeep failed: %s", type(exc).__name__)

    async def _top_up(self) -> None:
        db = self.profile.db
        want = self.config.one_time_prekeys
        fresh = await self._db(db.fresh_one_time_prekeys)
        if fresh * 2 > want:
            return
        count = want - fresh
        first = await self._db(db.next_counter, "one_time_prekey_id", count)
        keys = [OneTimePrekey.generate(first + i) for i in range(count)]
        await self._db(db.add_one_time_prekeys, keys)
        if self._store is not None:
            await self._publish_bundle()

    def _top_up_soon(self) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(self._top_up_logged)

    async def _top_up_logged(self) -> None:
        try:
            await self._top_up()
        except (TeiaError, *_STREAM_ERRORS) as exc:
            _log.info("prekey top-up failed: %s", type(exc).__name__)

    async def _bundle(self, with_one_time: bool) -> PrekeyBundle:
        db = self.profile.db
        spk = await self._db(db.signed_prekey)
        assert spk is not None
        opk: tuple[int, bytes] | None = None
        if with_one_time:
            handed = await self._db(db.hand_out_one_time_prekeys, 1)
            opk = handed[0] if handed else None
        return PrekeyBundle(
            self.identity.public_key,
            spk.id,
            spk.public_key,
            spk.signature,
            opk[0] if opk else None,
            opk[1] if opk else None,
        )

    async def _serve_prekeys(self, stream: NegotiatedStream) -> None:
        with anyio.fail_after(10):
            await stream.receive_message(16)
            bundle = await self._bundle(with_one_time=True)
            await stream.send_message(bundle.to_bytes())
        self._top_up_soon()

    # --- DHT and store --------------------------------------------------------------------

    async def _setup_dht(self) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(self._join_dht)

        def republish(_: list[Multiaddr]) -> None:
            if self._task_group is not None:
                self._task_group.start_soon(self._publish_record)

        self.host.on_relayed_addrs_change(republish)

    async def _join_dht(self) -> None:
        try:
            with anyio.fail_after(30):
                await self._dht.bootstrap([Multiaddr(a) for a in self.config.bootstrap])
            await self._publish_record()
        except (TeiaError, *_STREAM_ERRORS) as exc:
            _log.warning("joining the DHT failed: %s", type(exc).__name__)
        finally:
            self._dht_joined.set()
        await self.devices.keep_published()

    async def wait_dht_joined(self) -> None:
        """Wait until this peer's first attempt to join the DHT is over (successful or not;
        at most 30 s after opening). Returns at once without bootstrap nodes."""
        if self._dht is not None:
            await self._dht_joined.wait()

    async def _publish_record(self) -> None:
        with contextlib.suppress(TeiaError, *_STREAM_ERRORS):
            with anyio.fail_after(30):
                await self._dht.publish_record(protocols=[CHAT_PROTOCOL, PREKEY_PROTOCOL])
                self._published.set()

    async def wait_published(self) -> None:
        """Wait until this peer's record is in the DHT (bound it with ``anyio.fail_after``;
        it never happens without bootstrap nodes)."""
        await self._published.wait()

    def _setup_store(self) -> None:
        from teia.store import ReplicatedStoreClient, StaticMembership, StoreClient
        from teia.store.membership import StoreNodeInfo

        nodes = [StoreNodeInfo.from_multiaddr(a) for a in self.config.store_nodes]
        replication = min(3, len(nodes))
        self._store = ReplicatedStoreClient(
            StoreClient(self.host),
            StaticMembership(nodes),
            replication=replication,
            write_quorum=min(2, replication),
        )

    async def _publish_bundle(self) -> None:
        """Upload the bundle and a share of fresh one-time prekeys to the store nodes."""
        bundle = await self._bundle(with_one_time=False)
        keys = await self._db(self.profile.db.hand_out_one_time_prekeys, 50)
        blobs = [prekey_id.to_bytes(4, "big") + public for prekey_id, public in keys]
        try:
            with anyio.fail_after(30):
                await self._store.put_bundle(self.identity, bundle.to_bytes(), blobs)
        except (StoreError, *_STREAM_ERRORS) as exc:
            _log.info("bundle upload failed: %s", type(exc).__name__)

    async def _bundle_from_store(self, peer: PeerId) -> PrekeyBundle | None:
        from teia.store import inbox_for

        assert peer.public_key is not None
        try:
            with anyio.fail_after(30):
                answer = await self._store.get_bundle(inbox_for(peer.public_key))
        except (StoreError, *_STREAM_ERRORS):
            return None
        if answer is None:
            return None
        try:
            base = PrekeyBundle.from_bytes(answer.bundle)
            if len(answer.one_time_prekey) == 36:
                return PrekeyBundle(
                    base.identity_key,
                    base.signed_prekey_id,
                    base.signed_prekey,
                    base.signed_prekey_signature,
                    int.from_bytes(answer.one_time_prekey[:4], "big"),
                    answer.one_time_prekey[4:],
                )
            return base
        except CryptoError:
            return None

    async def _deposit(self, peer: PeerId, items: list[OutboxItem]) -> None:
        from teia.store import Envelope, inbox_for

        assert peer.public_key is not None
        inbox = inbox_for(peer.public_key)
        envelopes = [
            Envelope(
                inbox,
                item.message_id,
                seal_to(peer.public_key, item.envelope or b""),
                item.created_ms,
            )
            for item in items
        ]
        with anyio.fail_after(30):
            await self._store.deposit(envelopes)
        latency = [self._latency(item) for item in items]
        await self._db(
            self.profile.db.mark_stored, self._text(peer), [i.message_id for i in items], latency
        )
        self._after_delivery(
            peer, [(i.message_id, "stored", lat) for i, lat in zip(items, latency, strict=True)]
        )

    async def fetch_stored(self) -> int:
        """Fetch our store inboxes: decrypt, persist, then acknowledge. Returns how many new
        messages were taken. (Runs when the peer opens; call it again to poll.)"""
        if self._store is None:
            return 0
        try:
            with anyio.fail_after(60):
                envelopes = await self._store.fetch_all(self.identity)
        except (StoreError, *_STREAM_ERRORS) as exc:
            _log.info("store fetch failed: %s", type(exc).__name__)
            return 0
        taken: list[bytes] = []
        receipts: dict[PeerId, list[bytes]] = {}
        new = 0
        for stored in envelopes:
            try:
                envelope = ChatEnvelope.decode(
                    open_sealed(self.identity.private_seed, stored.payload)
                )
                sender = PeerId.from_bytes(envelope.sender)
            except (InvalidChatMessage, InvalidPeerId):
                taken.append(stored.message_id)  # garbage for us: never readable, drop it
                self.stats["refused"] += 1
                continue
            before = self.stats["received"]
            ok = await self._receive(_Incoming(sender, envelope, "stored"))
            new += self.stats["received"] - before
            taken.append(stored.message_id)
            if ok and envelope.kind in (Kind.TEXT, Kind.APP):
                receipts.setdefault(sender, []).append(envelope.message_id)
        if taken:
            with contextlib.suppress(StoreError, *_STREAM_ERRORS):
                with anyio.fail_after(30):
                    await self._store.ack(self.identity, taken)
        for sender, ids in receipts.items():
            await self._queue_receipt(sender, ids)
        return new

    async def _poll_store(self) -> None:
        while True:
            await anyio.sleep(self.config.store_poll_interval)
            await self.fetch_stored()

    async def _queue_receipt(self, peer: PeerId, message_ids: list[bytes]) -> None:
        await self._db(
            self.profile.db.queue_outgoing,
            peer_id=self._text(peer),
            conversation=self._text(peer),
            message_id=self.new_message_id(),
            sent_ms=self.profile.db.next_timestamp(),
            text=None,
            kind=int(Kind.RECEIPT),
            plaintext=Plaintext(receipts=tuple(message_ids)).encode(),
        )
        self._stale.add(peer)
        self._kick(peer)


def resolve_recipient(db: PeerDatabase, who: str) -> PeerId:
    """A contact name or a peer ID (text) to a peer ID; `ContactIdentityChanged` for a name
    whose identity changed since it was last verified, `UnknownContact` otherwise."""
    contact = db.contact_by_name(who)
    if contact is not None:
        if contact.trust == "unverified-changed":
            raise ContactIdentityChanged(
                f"contact {who} changed identity; compare safety numbers, then verify it"
            )
        return PeerId.from_string(contact.peer_id)
    try:
        return PeerId.from_string(who)
    except InvalidPeerId:
        raise UnknownContact(f"{who} is neither a contact name nor a peer ID") from None


def _frame(data: bytes) -> bytes:
    from teia.host.protobuf import encode_uvarint

    return encode_uvarint(len(data)) + data
