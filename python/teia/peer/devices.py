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

Linking (``/teia/devices/link/1.0.0``): the primary shows a short code (`LinkCode`: a 40-bit
one-time secret and the primary's UDP address, 20 characters of Crockford base32 in groups of
four, with a check character). The new device dials that address and both run a balanced PAKE
after CPace over X25519: the generator is hashed to the curve (Elligator 2) from the secret, both
peer IDs as the connection proved them (libp2p TLS) and the new device's fresh nonce; each side
sends ``X25519(y, G)``, derives the key from the other's share, and proves it with an HMAC over
the transcript (the primary first). A wrong code, or anyone in the middle (who sees other peer
IDs on each side), gets a key that does not match; the code cannot be tested offline from what
crosses the wire, so an attacker gets one guess per attempt, and the primary allows 3 attempts
per code (each run that reaches the primary's proof counts), then the code is dead: success odds
at most 3 / 2^40. A code expires after ``ttl`` (10 minutes by default) and is spent by its first
success (a replay finds no code). On success the primary signs the list with the new device
added, hands it over on the stream, announces it, and sends the history to the new device as
``teia.devices/history`` chunks over their pairwise session (end-to-end encrypted like any
message).

Nothing here logs content, keys or codes.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, get_args

import anyio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from teia.errors import (
    DeviceError,
    DeviceNotListed,
    InvalidChatMessage,
    InvalidDeviceList,
    InvalidLinkCode,
    InvalidMultiaddr,
    InvalidPeerId,
    LinkRefused,
    StaleDeviceList,
    TeiaError,
    TransportError,
    UnknownAccount,
)
from teia.identity import Identity, Multiaddr, PeerId
from teia.identity.keys import verify
from teia.peer.db import MessageRow, MessageState, PeerDatabase, now_ms
from teia.peer.wire import MAX_TEXT_BYTES

if TYPE_CHECKING:
    from teia.host.streams import NegotiatedStream
    from teia.peer.peer import AppHandler, AppMessage, Peer

__all__ = [
    "APP_HISTORY",
    "APP_LIST",
    "APP_MESSAGE",
    "LINK_PROTOCOL",
    "MAX_DEVICES",
    "MAX_DEVICE_LIST_SIZE",
    "DeviceList",
    "DeviceMessage",
    "Devices",
    "HistoryChunk",
    "HistoryRecord",
    "LinkCode",
    "ListPush",
]

_log = logging.getLogger(__name__)

APP_LIST: Final = "teia.devices/list"
APP_MESSAGE: Final = "teia.devices/msg"
APP_HISTORY: Final = "teia.devices/history"
LINK_PROTOCOL: Final = "/teia/devices/link/1.0.0"

MAX_DEVICES: Final = 16
_MAX_PEER_ID: Final = 64
_LIST_MAGIC: Final = b"TDL\x01"
_LIST_DOMAIN: Final = b"teia device list v1\x00"
_SIGNATURE: Final = 64
_KEY: Final = 32
MAX_DEVICE_LIST_SIZE: Final = 4 + _KEY + 8 + 8 + 1 + MAX_DEVICES * (1 + _MAX_PEER_ID) + _SIGNATURE

_MESSAGE_MAGIC: Final = b"TDM\x01"
_PUSH_MAGIC: Final = b"TDP\x01"
_HISTORY_MAGIC: Final = b"TDH\x01"
_MESSAGE_ID: Final = 16
KIND_MESSAGE: Final = 1
KIND_TRANSCRIPT: Final = 2
_MAX_HISTORY_RECORDS: Final = 4096
_HISTORY_CHUNK: Final = 120 * 1024
_MAX_HISTORY_TRANSFER: Final = 100_000
_MAX_CONVERSATION: Final = 256
_MAX_PATH: Final = 16
_STATES: Final[tuple[MessageState, ...]] = get_args(MessageState)
_MAX_KNOWN_ACCOUNTS: Final = 10_000

_LINK_ATTEMPTS: Final = 3
_LINK_TTL: Final = 600.0
_LINK_SECRET: Final = 5
_LINK_TIMEOUT: Final = 30.0
_MAX_LINK_ADDRS: Final = 8

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
"""


def account_id(account_key: bytes) -> PeerId:
    """The account ID of an account public key (its peer-ID form)."""
    return PeerId.from_public_key(account_key)


# --- codecs -----------------------------------------------------------------------------------


class _Reader:
    """Reads a byte string front to back; every shortfall is `InvalidDeviceList`."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._at = 0
        self._what = what

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise InvalidDeviceList(f"{self._what} is truncated")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def end(self) -> None:
        if self._at != len(self._data):
            raise InvalidDeviceList(f"{self._what} has trailing bytes")


def _device_id(raw: bytes, what: str) -> PeerId:
    try:
        device = PeerId.from_bytes(raw)
    except InvalidPeerId:
        raise InvalidDeviceList(f"{what} holds a device ID that does not parse") from None
    if device.public_key is None:
        raise InvalidDeviceList(f"{what} holds a device ID that is not an Ed25519 key")
    return device


@dataclass(frozen=True, slots=True)
class DeviceList:
    """An account's devices, signed by the account key. Build one with `sign`; `decode` checks
    the signature, so a `DeviceList` in hand is always genuine.

    Encoding (integers big-endian)::

        "TDL" 0x01 ‖ account key (32) ‖ version (8) ‖ issued_ms (8) ‖ count (1, 1 to 16)
        ‖ count * (length (1, ≤ 64) ‖ device peer ID bytes)   strictly ascending, no repeats
        ‖ Ed25519 signature (64) over "teia device list v1" 0x00 ‖ everything before it
    """

    account_key: bytes
    version: int
    issued_ms: int
    devices: tuple[PeerId, ...]
    signature: bytes

    @property
    def account(self) -> PeerId:
        """The account ID."""
        return account_id(self.account_key)

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    @staticmethod
    def _body(account_key: bytes, version: int, issued_ms: int, devices: Sequence[PeerId]) -> bytes:
        out = bytearray(_LIST_MAGIC)
        out += account_key + version.to_bytes(8, "big") + issued_ms.to_bytes(8, "big")
        out.append(len(devices))
        for device in devices:
            raw = device.to_bytes()
            out.append(len(raw))
            out += raw
        return bytes(out)

    @classmethod
    def sign(
        cls,
        account: Identity,
        version: int,
        devices: Sequence[PeerId],
        issued_ms: int | None = None,
    ) -> DeviceList:
        """A list of ``devices`` (1 to 16 distinct Ed25519 peer IDs) at ``version`` (≥ 1)."""
        ordered = tuple(sorted(set(devices), key=PeerId.to_bytes))
        if not 1 <= len(ordered) <= MAX_DEVICES:
            raise DeviceError(f"an account lists 1 to {MAX_DEVICES} devices, not {len(ordered)}")
        for device in ordered:
            if device.public_key is None or len(device.to_bytes()) > _MAX_PEER_ID:
                raise DeviceError(f"{device} is not an Ed25519 device ID")
        if not 1 <= version < 2**64:
            raise DeviceError("a device list version is a positive 64-bit number")
        issued = now_ms() if issued_ms is None else issued_ms
        body = cls._body(account.public_key, version, issued, ordered)
        return cls(account.public_key, version, issued, ordered, account.sign(_LIST_DOMAIN + body))

    def encode(self) -> bytes:
        """The signed list's bytes (at most `MAX_DEVICE_LIST_SIZE`)."""
        body = self._body(self.account_key, self.version, self.issued_ms, self.devices)
        return body + self.signature

    @classmethod
    def decode(cls, data: bytes) -> DeviceList:
        """Parse and check a signed list; `InvalidDeviceList` if anything is off, the
        signature included."""
        if len(data) > MAX_DEVICE_LIST_SIZE:
            raise InvalidDeviceList("a device list is oversize")
        reader = _Reader(data, "a device list")
        if reader.take(4) != _LIST_MAGIC:
            raise InvalidDeviceList("not a device list (bad magic or version)")
        account_key = reader.take(_KEY)
        version = reader.uint(8)
        issued_ms = reader.uint(8)
        count = reader.uint(1)
        if not 1 <= count <= MAX_DEVICES or version < 1:
            raise InvalidDeviceList(
                f"a device list has 1 to {MAX_DEVICES} devices and a version ≥ 1"
            )
        devices: list[PeerId] = []
        for _ in range(count):
            size = reader.uint(1)
            if size > _MAX_PEER_ID:
                raise InvalidDeviceList("a device ID in a device list is oversize")
            raw = reader.take(size)
            if devices and raw <= devices[-1].to_bytes():
                raise InvalidDeviceList("a device list's devices are not strictly ascending")
            devices.append(_device_id(raw, "a device list"))
        signature = reader.take(_SIGNATURE)
        reader.end()
        signed = bytes(data[: len(data) - _SIGNATURE])
        if not verify(account_key, _LIST_DOMAIN + signed, signature):
            raise InvalidDeviceList("a device list's signature is not its account key's")
        return cls(account_key, version, issued_ms, tuple(devices), signature)


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """A text fanned out to a device (``teia.devices/msg``).

    ``kind`` 1: a message to ``peer_account`` (the receiver's account); 2: a sent transcript
    for the sender's own other devices (``peer_account`` is who it was sent to). ``device_list``
    is the sender account's signed list. Encoding::

        "TDM" 0x01 ‖ kind (1) ‖ message ID (16) ‖ sent_ms (8) ‖ peer account key (32)
        ‖ list length (2) ‖ list ‖ text length (4, ≤ 64 KiB) ‖ UTF-8 text
    """

    kind: int
    message_id: bytes
    sent_ms: int
    peer_account: bytes
    device_list: DeviceList
    text: str

    def encode(self) -> bytes:
        listed = self.device_list.encode()
        text = self.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise InvalidChatMessage(f"a text is at most {MAX_TEXT_BYTES} bytes")
        return (
            _MESSAGE_MAGIC
            + bytes([self.kind])
            + self.message_id
            + self.sent_ms.to_bytes(8, "big")
            + self.peer_account
            + len(listed).to_bytes(2, "big")
            + listed
            + len(text).to_bytes(4, "big")
            + text
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceMessage:
        reader = _Reader(data, "a device message")
        if reader.take(4) != _MESSAGE_MAGIC:
            raise InvalidDeviceList("not a device message (bad magic or version)")
        kind = reader.uint(1)
        if kind not in (KIND_MESSAGE, KIND_TRANSCRIPT):
            raise InvalidDeviceList(f"unknown device message kind {kind}")
        message_id = reader.take(_MESSAGE_ID)
        sent_ms = reader.uint(8)
        peer_account = reader.take(_KEY)
        listed = reader.take(reader.uint(2))
        size = reader.uint(4)
        if size > MAX_TEXT_BYTES:
            raise InvalidDeviceList("a device message's text is oversize")
        raw = reader.take(size)
        reader.end()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise InvalidDeviceList("a device message's text is not UTF-8") from None
        return cls(kind, message_id, sent_ms, peer_account, DeviceList.decode(listed), text)


@dataclass(frozen=True, slots=True)
class ListPush:
    """A device list handed to a device (``teia.devices/list``); ``reply`` asks for the
    receiver's own list back. Encoding: ``"TDP" 0x01 ‖ reply (1) ‖ list``."""

    reply: bool
    device_list: DeviceList

    def encode(self) -> bytes:
        return _PUSH_MAGIC + bytes([int(self.reply)]) + self.device_list.encode()

    @classmethod
    def decode(cls, data: bytes) -> ListPush:
        reader = _Reader(data[:5], "a device list push")
        if reader.take(4) != _PUSH_MAGIC:
            raise InvalidDeviceList("not a device list push (bad magic or version)")
        flag = reader.uint(1)
        if flag > 1:
            raise InvalidDeviceList("a device list push has a bad flag")
        return cls(bool(flag), DeviceList.decode(data[5:]))


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One message of history handed to a newly linked device."""

    message_id: bytes
    peer_id: str
    conversation: str
    outgoing: bool
    sent_ms: int
    state: MessageState
    path: str | None
    text: str

    def encode(self) -> bytes:
        peer, conversation = self.peer_id.encode(), self.conversation.encode()
        path, text = (self.path or "").encode(), self.text.encode()
        return (
            self.message_id
            + bytes([int(self.outgoing), _STATES.index(self.state)])
            + self.sent_ms.to_bytes(8, "big")
            + bytes([len(peer)])
            + peer
            + len(conversation).to_bytes(2, "big")
            + conversation
            + bytes([len(path)])
            + path
            + len(text).to_bytes(4, "big")
            + text
        )

    @classmethod
    def read(cls, reader: _Reader) -> HistoryRecord:
        message_id = reader.take(_MESSAGE_ID)
        outgoing, state = reader.uint(1), reader.uint(1)
        if outgoing > 1 or state >= len(_STATES):
            raise InvalidDeviceList("a history record has a bad flag")
        sent_ms = reader.uint(8)
        peer = reader.take(reader.uint(1))
        conversation = reader.take(reader.uint(2))
        path = reader.take(reader.uint(1))
        size = reader.uint(4)
        if size > MAX_TEXT_BYTES or len(conversation) > _MAX_CONVERSATION or len(path) > _MAX_PATH:
            raise InvalidDeviceList("a history record is oversize")
        text = reader.take(size)
        try:
            return cls(
                message_id,
                peer.decode("ascii"),
                conversation.decode(),
                bool(outgoing),
                sent_ms,
                _STATES[state],
                path.decode("ascii") or None,
                text.decode(),
            )
        except UnicodeDecodeError:
            raise InvalidDeviceList("a history record is not text") from None


@dataclass(frozen=True, slots=True)
class HistoryChunk:
    """A run of history records (``teia.devices/history``); ``last`` ends the transfer.
    Encoding: ``"TDH" 0x01 ‖ last (1) ‖ count (2, ≤ 4096) ‖ records``."""

    last: bool
    records: tuple[HistoryRecord, ...]

    def encode(self) -> bytes:
        out = bytearray(_HISTORY_MAGIC)
        out.append(int(self.last))
        out += len(self.records).to_bytes(2, "big")
        for record in self.records:
            out += record.encode()
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> HistoryChunk:
        reader = _Reader(data, "a history chunk")
        if reader.take(4) != _HISTORY_MAGIC:
            raise InvalidDeviceList("not a history chunk (bad magic or version)")
        last, count = reader.uint(1), reader.uint(2)
        if last > 1 or count > _MAX_HISTORY_RECORDS:
            raise InvalidDeviceList("a history chunk has a bad flag or too many records")
        records = tuple(HistoryRecord.read(reader) for _ in range(count))
        reader.end()
        return cls(bool(last), records)


# --- the link code and the PAKE -----------------------------------------------------------------

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_ALIASES: Final = {"O": "0", "I": "1", "L": "1"}


def _base32(data: bytes) -> str:
    bits = int.from_bytes(data, "big") << (-len(data) * 8) % 5
    count = -(-len(data) * 8 // 5)
    return "".join(_CROCKFORD[(bits >> (5 * (count - 1 - i))) & 31] for i in range(count))


def _unbase32(text: str, size: int) -> bytes:
    count = -(-size * 8 // 5)
    if len(text) != count:
        raise InvalidLinkCode("a link code has 20 characters (39 with an IPv6 address)")
    value = 0
    for char in text:
        value = value * 32 + _CROCKFORD.index(char)
    pad = count * 5 - size * 8
    if value & ((1 << pad) - 1):
        raise InvalidLinkCode("a link code's last character is wrong")
    return (value >> pad).to_bytes(size, "big")


@dataclass(frozen=True, slots=True)
class LinkCode:
    """What the existing device shows: a one-time secret and where to reach it.

    ``secret`` (5 bytes) ‖ address (4 bytes IPv4 or 16 bytes IPv6) ‖ port (2) ‖ check (1: the
    first byte of SHA-256 of the rest), written in Crockford base32 in groups of four
    (``7Q2M-K4XD-9PHT-ZB3A-C8RW``; case, ``O``/``I``/``L`` for ``0``/``1``/``1``, spaces and
    dashes do not matter)."""

    secret: bytes
    host: str
    port: int

    def format(self) -> str:
        """The code as shown: groups of four characters joined by dashes."""
        raw = self.secret + ipaddress.ip_address(self.host).packed + self.port.to_bytes(2, "big")
        text = _base32(raw + hashlib.sha256(raw).digest()[:1])
        return "-".join(text[i : i + 4] for i in range(0, len(text), 4))

    @classmethod
    def parse(cls, code: str) -> LinkCode:
        """Read a typed code; `InvalidLinkCode` for anything but a well-formed one."""
        cleaned = "".join(c for c in code.upper() if c not in " -\t\n")
        cleaned = "".join(_CROCKFORD_ALIASES.get(c, c) for c in cleaned)
        if any(c not in _CROCKFORD for c in cleaned):
            raise InvalidLinkCode("a link code has letters and digits only")
        size = {20: 12, 39: 24}.get(len(cleaned))
        if size is None:
            raise InvalidLinkCode("a link code has 20 characters (39 with an IPv6 address)")
        raw = _unbase32(cleaned, size)
        body, check = raw[:-1], raw[-1:]
        if hashlib.sha256(body).digest()[:1] != check:
            raise InvalidLinkCode("the link code has a typo (its check character is wrong)")
        address = body[_LINK_SECRET:-2]
        return cls(
            body[:_LINK_SECRET],
            str(ipaddress.ip_address(address)),
            int.from_bytes(body[-2:], "big"),
        )


_P: Final = 2**255 - 19
_A: Final = 486662


def _is_square(x: int) -> bool:
    return x == 0 or pow(x, (_P - 1) // 2, _P) == 1


def _elligator2(r: int) -> int:
    """Map a field element to the u-coordinate of a Curve25519 point (Elligator 2, Z = 2)."""
    denominator = (1 + 2 * r * r) % _P
    x1 = (-_A * pow(denominator, _P - 2, _P)) % _P if denominator else (-_A) % _P
    if _is_square((x1 * x1 * x1 + _A * x1 * x1 + x1) % _P):
        return x1
    return (-x1 - _A) % _P


def _lv(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def link_generator(secret: bytes, new_device: PeerId, existing: PeerId, nonce: bytes) -> bytes:
    """The PAKE generator: a point hashed from the secret, both devices and the session."""
    digest = hashlib.sha512(
        b"teia link CPace X25519 v1"
        + _lv(secret)
        + _lv(new_device.to_bytes())
        + _lv(existing.to_bytes())
        + _lv(nonce)
    ).digest()
    return _elligator2(int.from_bytes(digest, "little") % _P).to_bytes(32, "little")


def _x25519(scalar: bytes, point: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(scalar).exchange(
            X25519PublicKey.from_public_bytes(point)
        )
    except ValueError:  # a low-order point: the product is the identity
        raise LinkRefused("the other device's key share is invalid") from None


def _link_keys(shared: bytes, nonce: bytes, share_new: bytes, share_existing: bytes) -> bytes:
    return hashlib.sha512(
        b"teia link key v1" + _lv(nonce) + shared + share_new + share_existing
    ).digest()[:32]


def _confirm(key: bytes, role: bytes, nonce: bytes, share_new: bytes, share_old: bytes) -> bytes:
    return hmac.new(key, role + nonce + share_new + share_old, hashlib.sha256).digest()


@dataclass
class _ActiveCode:
    secret: bytes
    expires: float
    attempts: int = 0


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


def _record_copies(db: PeerDatabase, message_id: bytes, copies: list[tuple[str, bytes]]) -> None:
    with db.transaction() as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO device_copies (message_id, device, copy_id) VALUES (?, ?, ?)",
            [(message_id, device, copy) for device, copy in copies],
        )


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
                r.state if r.state in _STATES else "received",
                r.path if r.path and len(r.path) <= _MAX_PATH else None,
                r.text,
            )
            for r in rows
            if len(r.conversation.encode()) <= _MAX_CONVERSATION and len(r.peer_id) < 256
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
        changed; loop on a condition around it (bound it with ``anyio.fail_after``)."""
        await self._changed.event.wait()

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
        await self._peer.send_app(target, APP_LIST, ListPush(True, mine).encode())

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
            await self._peer.send_app(target, APP_LIST, push)

    # --- fan-out ---------------------------------------------------------------------------

    async def send(self, account: PeerId | str, text: str) -> str:
        """Send ``text`` to every device of ``account`` and a transcript to our other devices;
        the logical message ID (hex). In our history under the account's conversation when
        this returns; each copy is delivered in the background (`wait_sent`)."""
        own = self._require_own()
        target = _as_peer_id(account)
        if target == account_id(own.account_key):
            raise DeviceError("cannot send to our own account")
        theirs = await self.device_list(target)
        if theirs is None:
            raise UnknownAccount(f"no device list known for account {target}")
        mine = await self.device_list()
        assert mine is not None
        message_id = secrets.token_bytes(_MESSAGE_ID)
        sent_ms = self._peer.profile.db.next_timestamp()
        message = DeviceMessage(KIND_MESSAGE, message_id, sent_ms, theirs.account_key, mine, text)
        payload = message.encode()  # size check before anything is written
        transcript = replace(message, kind=KIND_TRANSCRIPT).encode()
        db = self._peer.profile.db

        def record(conn_db: PeerDatabase) -> None:
            with conn_db.transaction() as conn:
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
        copies: list[tuple[str, bytes]] = []
        for device in theirs.devices:
            copy = await self._peer.send_app(device, APP_MESSAGE, payload)
            copies.append((str(device), bytes.fromhex(copy)))
        for device in mine.devices:
            if device != self._peer.peer_id:
                copy = await self._peer.send_app(device, APP_MESSAGE, transcript)
                copies.append((str(device), bytes.fromhex(copy)))
        await self._peer.run_db(_record_copies, db, message_id, copies)
        return message_id.hex()

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
                    await self._peer.send_app(device, APP_LIST, forward)
        if push.reply:
            answer = ListPush(False, mine).encode()
            for device in offered.devices:  # every device of theirs can then send to us
                await self._peer.send_app(device, APP_LIST, answer)

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
            _wake_messages(self._peer)

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
        secret = secrets.token_bytes(_LINK_SECRET)
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
                    nonce, scalar = secrets.token_bytes(16), secrets.token_bytes(32)
                    generator = link_generator(parsed.secret, me, existing, nonce)
                    share = _x25519(scalar, generator)
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
                    key = _link_keys(_x25519(scalar, theirs), nonce, share, theirs)
                    expected = _confirm(key, b"existing", nonce, share, theirs)
                    if not hmac.compare_digest(proof, expected):
                        raise LinkRefused(
                            "wrong code (or someone in the middle): check the code on the "
                            "existing device and try again"
                        )
                    addrs = "\n".join(str(a) for a in host.addrs[:_MAX_LINK_ADDRS]).encode()
                    await stream.send_message(_confirm(key, b"new", nonce, share, theirs) + addrs)
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
                scalar = secrets.token_bytes(32)
                share = _x25519(scalar, link_generator(code.secret, new, self._peer.peer_id, nonce))
                if theirs == share:
                    return
                key = _link_keys(_x25519(scalar, theirs), nonce, theirs, share)
                await stream.send_message(share + _confirm(key, b"existing", nonce, theirs, share))
                reply = await stream.receive_message(32 + 4096)
                expected = _confirm(key, b"new", nonce, theirs, share)
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
        try:
            await self._announce(granted)
            known = await self._peer.run_db(_known_lists, self._peer.profile.db)
            for held in known:
                if held.account_key != granted.account_key:
                    await self._peer.send_app(new, APP_LIST, ListPush(False, held).encode())
            await self._send_history(new)
        except TeiaError as exc:
            _log.warning("after linking a device: %s", type(exc).__name__)

    async def _send_history(self, new: PeerId) -> None:
        records = await self._peer.run_db(_history_records, self._peer.profile.db)
        chunk: list[HistoryRecord] = []
        size = 0
        for record in records:
            encoded = len(record.encode())
            if chunk and (size + encoded > _HISTORY_CHUNK or len(chunk) >= _MAX_HISTORY_RECORDS):
                await self._peer.send_app(
                    new, APP_HISTORY, HistoryChunk(False, tuple(chunk)).encode()
                )
                chunk, size = [], 0
            chunk.append(record)
            size += encoded
        await self._peer.send_app(new, APP_HISTORY, HistoryChunk(True, tuple(chunk)).encode())


def _as_peer_id(who: PeerId | str) -> PeerId:
    return who if isinstance(who, PeerId) else PeerId.from_string(who)


def _wake_messages(peer: Peer) -> None:
    """Wake `Peer.messages` readers: a text reached history outside the chat pipeline."""
    new, peer._new_message = peer._new_message, anyio.Event()
    new.set()
