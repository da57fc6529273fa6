"""Wire formats of multi-device accounts (`teia.peer.devices`): the signed device list, the
payloads that travel over pairwise sessions (``teia.devices/list``, ``/msg``, ``/history``), the
link code, and the pieces of the link PAKE. Sans-IO: bytes in, values out; every decoder is
strict and bounded and raises `InvalidDeviceList` (`InvalidLinkCode` for codes) on anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Final, get_args

from teia._native import CpaceState
from teia.errors import (
    CryptoError,
    InvalidChatMessage,
    InvalidDeviceList,
    InvalidLinkCode,
    LinkRefused,
)
from teia.identity import PeerId
from teia.identity.devicelist import (
    MAX_DEVICE_LIST_SIZE,
    MAX_DEVICES,
    DeviceList,
    account_id,
)
from teia.identity.devicelist import Reader as _Reader
from teia.peer.db import MessageState
from teia.peer.wire import MAX_TEXT_BYTES

__all__ = [
    "APP_HISTORY",
    "APP_LIST",
    "APP_MESSAGE",
    "KIND_MESSAGE",
    "KIND_TRANSCRIPT",
    "LINK_PROTOCOL",
    "MAX_DEVICES",
    "MAX_DEVICE_LIST_SIZE",
    "DeviceList",
    "DeviceMessage",
    "HistoryChunk",
    "HistoryRecord",
    "LinkCode",
    "ListPush",
    "account_id",
    "link_key",
    "link_pake",
    "link_proof",
    "link_shared",
]

APP_LIST: Final = "teia.devices/list"
APP_MESSAGE: Final = "teia.devices/msg"
APP_HISTORY: Final = "teia.devices/history"
LINK_PROTOCOL: Final = "/teia/devices/link/1.0.0"

_KEY: Final = 32

_MESSAGE_MAGIC: Final = b"TDM\x01"
_PUSH_MAGIC: Final = b"TDP\x01"
_HISTORY_MAGIC: Final = b"TDH\x01"
MESSAGE_ID_SIZE: Final = 16
KIND_MESSAGE: Final = 1
KIND_TRANSCRIPT: Final = 2
MAX_HISTORY_RECORDS: Final = 4096
MAX_CONVERSATION: Final = 256
MAX_PATH: Final = 16
HISTORY_STATES: Final[tuple[MessageState, ...]] = get_args(MessageState)
LINK_SECRET_SIZE: Final = 5


# --- codecs -----------------------------------------------------------------------------------


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
        message_id = reader.take(MESSAGE_ID_SIZE)
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
            + bytes([int(self.outgoing), HISTORY_STATES.index(self.state)])
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
        message_id = reader.take(MESSAGE_ID_SIZE)
        outgoing, state = reader.uint(1), reader.uint(1)
        if outgoing > 1 or state >= len(HISTORY_STATES):
            raise InvalidDeviceList("a history record has a bad flag")
        sent_ms = reader.uint(8)
        peer = reader.take(reader.uint(1))
        conversation = reader.take(reader.uint(2))
        path = reader.take(reader.uint(1))
        size = reader.uint(4)
        if size > MAX_TEXT_BYTES or len(conversation) > MAX_CONVERSATION or len(path) > MAX_PATH:
            raise InvalidDeviceList("a history record is oversize")
        text = reader.take(size)
        try:
            return cls(
                message_id,
                peer.decode("ascii"),
                conversation.decode(),
                bool(outgoing),
                sent_ms,
                HISTORY_STATES[state],
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
        if last > 1 or count > MAX_HISTORY_RECORDS:
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
        address = body[LINK_SECRET_SIZE:-2]
        return cls(
            body[:LINK_SECRET_SIZE],
            str(ipaddress.ip_address(address)),
            int.from_bytes(body[-2:], "big"),
        )


def _lv(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def link_pake(secret: bytes, new_device: PeerId, existing: PeerId, nonce: bytes) -> CpaceState:
    """One side's PAKE run (`teia._native.CpaceState`, ristretto255; its scalar never leaves
    Rust) on the generator hashed from the secret, both devices and the session nonce;
    ``.share`` is what to send."""
    return CpaceState(
        b"teia link CPace ristretto255 v1"
        + _lv(secret)
        + _lv(new_device.to_bytes())
        + _lv(existing.to_bytes())
        + _lv(nonce)
    )


def link_shared(run: CpaceState, theirs: bytes) -> bytes:
    """The PAKE result with the other side's share; `LinkRefused` for an invalid share."""
    try:
        return run.finish(theirs)
    except CryptoError:
        raise LinkRefused("the other device's key share is invalid") from None


def link_key(shared: bytes, nonce: bytes, share_new: bytes, share_existing: bytes) -> bytes:
    return hashlib.sha512(
        b"teia link key v1" + _lv(nonce) + shared + share_new + share_existing
    ).digest()[:32]


def link_proof(key: bytes, role: bytes, nonce: bytes, share_new: bytes, share_old: bytes) -> bytes:
    return hmac.new(key, role + nonce + share_new + share_old, hashlib.sha256).digest()
