"""Wire formats of the peer: chat envelopes, acknowledgements, plaintexts, prekey requests and
sealed envelopes for the store.

``/teia/chat/1.0.0`` — the opener sends varint-framed `ChatEnvelope` messages, the other side
answers each with a `ChatAck` in the same order (one stream carries many messages)::

    ChatEnvelope { 1: message_id (16 bytes)  2: sender (peer ID bytes)
                   3: conversation (string)  4: timestamp_ms (uint64)
                   5: kind (1 text, 2 receipt)  6: body (session message) }
    ChatAck      { 1: message_id  2: status (0 delivered, 1 refused) }

The body is a `teia.crypto` session message (prekey or normal); its plaintext is a `Plaintext`
``{ 1: text (string)  2: receipts (repeated bytes, message IDs)  3: app (string)
4: data (bytes) }``. Inline acks say "in the recipient's history"; receipts (kind 2) carry the
same news later, e.g. for messages that went through a store. Kind 3 (app) carries an
application payload — ``app`` names its handler (groups, devices, attachments, a program's own
protocol), ``data`` is its body — over the same ratcheted sessions, outbox and paths as texts.

``/teia/prekeys/1.0.0`` — the opener sends an empty frame; the answer is one `PrekeyBundle`
(``teia.crypto`` bytes) with a one-time prekey when one is left, or an empty frame.

Store payloads are sealed to the recipient's identity key, so a store node learns neither the
sender nor the conversation (`seal_to` / `open_sealed`)::

    0x01 ‖ ephemeral X25519 public key (32) ‖ ChaCha20-Poly1305(envelope)   (nonce all zero:
    each key is used once; key = HKDF-SHA256(DH(e, IK_B), salt = e_pub ‖ IK_B, "teia sealed v1"))

Every decoder is strict and bounded and raises `InvalidChatMessage`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teia import _native
from teia.errors import InvalidChatMessage, InvalidVarint, TeiaError
from teia.host.protobuf import (
    bytes_value,
    checked_fields,
    encode_bytes_field,
    encode_varint_field,
    int_value,
)
from teia.identity import varint

__all__ = [
    "CHAT_PROTOCOL",
    "MAX_APP_DATA",
    "MAX_ENVELOPE_SIZE",
    "MAX_TEXT_BYTES",
    "PREKEY_PROTOCOL",
    "AckStatus",
    "ChatAck",
    "ChatEnvelope",
    "Kind",
    "Plaintext",
    "check_app_name",
    "open_sealed",
    "seal_to",
]

CHAT_PROTOCOL: Final = "/teia/chat/1.0.0"
PREKEY_PROTOCOL: Final = "/teia/prekeys/1.0.0"
MESSAGE_ID_SIZE: Final = 16
MAX_TEXT_BYTES: Final = 64 * 1024
"""Largest text a message may carry (UTF-8 bytes)."""
MAX_ENVELOPE_SIZE: Final = 256 * 1024
MAX_APP_DATA: Final = 192 * 1024
"""Largest application payload a message may carry (bytes)."""
_MAX_APP_NAME: Final = 64
_APP_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")
_MAX_CONVERSATION: Final = 256
_MAX_RECEIPTS: Final = 1024
_SEALED_VERSION: Final = 1


class Kind(enum.IntEnum):
    TEXT = 1
    RECEIPT = 2
    APP = 3


class AckStatus(enum.IntEnum):
    DELIVERED = 0
    REFUSED = 1


_varint_field = encode_varint_field
_KINDS: Final = {kind.value: kind for kind in Kind}
_KIND_TAG: Final = {kind: bytes((0x28, kind.value, 0x32)) for kind in Kind}  # kind, body's tag
_SENDER_TAG: Final = tuple(bytes((0x12, size)) for size in range(0x80))
_STATUSES: Final = (AckStatus.DELIVERED, AckStatus.REFUSED)
_fields = partial(checked_fields, error=InvalidChatMessage)
_bytes = partial(bytes_value, error=InvalidChatMessage)
_int = partial(int_value, error=InvalidChatMessage)


@dataclass(frozen=True, slots=True)
class ChatEnvelope:
    """One chat message on the wire; `body` is a session message (ciphertext)."""

    message_id: bytes
    sender: bytes
    conversation: str
    timestamp_ms: int
    kind: Kind
    body: bytes

    def encode(self) -> bytes:
        sender, kind_tag = self.sender, _KIND_TAG.get(self.kind)
        if (
            not self.conversation
            and len(self.message_id) == 16
            and 0 < len(sender) < 0x80
            and kind_tag is not None
        ):
            # What every message of ours looks like: the same bytes, in a third of the time.
            return b"".join(
                (
                    b"\x0a\x10",
                    self.message_id,
                    _SENDER_TAG[len(sender)],
                    sender,
                    b"\x1a\x00\x20",
                    varint.encode(self.timestamp_ms),
                    kind_tag,
                    varint.encode(len(self.body)),
                    self.body,
                )
            )
        return _encode_envelope_fields(self)

    @classmethod
    def decode(cls, data: bytes) -> ChatEnvelope:
        if len(data) > MAX_ENVELOPE_SIZE:
            raise InvalidChatMessage(f"envelope of {len(data)} bytes is over the limit")
        return _envelope_as_encoded(data) or _envelope_any_layout(data)


def _encode_envelope_fields(envelope: ChatEnvelope) -> bytes:
    """Field by field (any conversation, any sizes)."""
    return b"".join(
        (
            encode_bytes_field(1, envelope.message_id),
            encode_bytes_field(2, envelope.sender),
            encode_bytes_field(3, envelope.conversation.encode()),
            _varint_field(4, envelope.timestamp_ms),
            _varint_field(5, int(envelope.kind)),
            encode_bytes_field(6, envelope.body),
        )
    )


def _envelope_as_encoded(data: bytes) -> ChatEnvelope | None:
    """The layout `ChatEnvelope.encode` writes (fields 1 to 6 in order, each once, a 16-byte ID,
    a sender under 128 bytes, no conversation), read at fixed offsets; None for anything else,
    which `_envelope_any_layout` then reads or refuses. Same result as that reader, a quarter of
    its time: the recipient decodes every envelope on its event loop."""
    if data[:2] != b"\x0a\x10" or data[18:19] != b"\x12":
        return None
    size = data[19] if len(data) > 19 else 0
    at = 20 + size
    if not 1 <= size < 0x80 or data[at : at + 3] != b"\x1a\x00\x20":
        return None
    try:
        timestamp, at = varint.decode(data, at + 3)
        kind = _KINDS.get(data[at + 1]) if data[at] == 0x28 else None
        if kind is None or data[at + 2] != 0x32:
            return None
        length, at = varint.decode(data, at + 3)
    except (IndexError, InvalidVarint):
        return None
    if at + length != len(data):
        return None
    return ChatEnvelope(data[2:18], data[20 : 20 + size], "", timestamp, kind, data[at:])


def _envelope_any_layout(data: bytes) -> ChatEnvelope:
    """Any valid protobuf encoding of an envelope (fields in any order, unknown ones skipped)."""
    values: dict[int, int | bytes] = {}
    for number, _, value in _fields(data, "envelope"):
        if number in values:
            raise InvalidChatMessage(f"envelope field {number} repeated")
        values[number] = value
    try:
        message_id = _bytes(values[1], "message_id")
        sender = _bytes(values[2], "sender")
        body = _bytes(values[6], "body")
        kind_value = _int(values[5], "kind")
        timestamp = _int(values.get(4, 0), "timestamp")
        conversation_raw = _bytes(values.get(3, b""), "conversation")
    except KeyError as exc:
        raise InvalidChatMessage(f"envelope lacks field {exc.args[0]}") from None
    if len(message_id) != MESSAGE_ID_SIZE:
        raise InvalidChatMessage("message_id must be 16 bytes")
    if not 1 <= len(sender) <= 128:
        raise InvalidChatMessage("sender is not a peer ID")
    if len(conversation_raw) > _MAX_CONVERSATION:
        raise InvalidChatMessage("conversation name too long")
    try:
        kind = Kind(kind_value)
        conversation = conversation_raw.decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidChatMessage("unknown kind or non-UTF-8 conversation") from None
    return ChatEnvelope(message_id, sender, conversation, timestamp, kind, body)


@dataclass(frozen=True, slots=True)
class ChatAck:
    """The answer to one envelope on the same stream."""

    message_id: bytes
    status: AckStatus

    def encode(self) -> bytes:
        return encode_bytes_field(1, self.message_id) + _varint_field(2, int(self.status))

    @classmethod
    def decode(cls, data: bytes) -> ChatAck:
        if len(data) == 20 and data[:2] == b"\x0a\x10" and data[18] == 0x10 and data[19] < 2:
            return cls(data[2:18], _STATUSES[data[19]])  # as `encode` writes it
        return _ack_any_layout(data)


def _ack_any_layout(data: bytes) -> ChatAck:
    message_id, status = b"", 0
    for number, _, value in _fields(data, "ack"):
        if number == 1:
            message_id = _bytes(value, "message_id")
        elif number == 2:
            status = _int(value, "status")
    try:
        return ChatAck(message_id, AckStatus(status))
    except ValueError:
        raise InvalidChatMessage(f"unknown ack status {status}") from None


def check_app_name(app: str) -> str:
    """``app`` if it is a valid application name (1 to 64 of ``a-z 0-9 . _ - /``), else
    `InvalidChatMessage`."""
    if not 1 <= len(app) <= _MAX_APP_NAME or not set(app) <= _APP_NAME_CHARS:
        raise InvalidChatMessage("bad application name")
    return app


@dataclass(frozen=True, slots=True)
class Plaintext:
    """What a session message carries: a text, receipts for earlier message IDs, or an
    application payload (``app`` names it, ``data`` is its body)."""

    text: str = ""
    receipts: tuple[bytes, ...] = ()
    app: str = ""
    data: bytes = b""

    def encode(self) -> bytes:
        data = self.text.encode()
        if len(data) > MAX_TEXT_BYTES:
            raise InvalidChatMessage(f"text of {len(data)} bytes is over {MAX_TEXT_BYTES}")
        if len(self.data) > MAX_APP_DATA:
            raise InvalidChatMessage(f"app data of {len(self.data)} bytes is over {MAX_APP_DATA}")
        out = [encode_bytes_field(1, data)] if data else []
        out.extend(encode_bytes_field(2, r) for r in self.receipts)
        if self.app:
            out.append(encode_bytes_field(3, check_app_name(self.app).encode()))
            out.append(encode_bytes_field(4, self.data))
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> Plaintext:
        text = app = body = b""
        receipts: list[bytes] = []
        for number, _, value in _fields(data, "plaintext"):
            if number == 1:
                text = _bytes(value, "text")
            elif number == 2:
                receipt = _bytes(value, "receipt")
                if len(receipt) != MESSAGE_ID_SIZE or len(receipts) >= _MAX_RECEIPTS:
                    raise InvalidChatMessage("bad receipt list")
                receipts.append(receipt)
            elif number == 3:
                app = _bytes(value, "app")
            elif number == 4:
                body = _bytes(value, "data")
        if len(text) > MAX_TEXT_BYTES:
            raise InvalidChatMessage("text over the limit")
        if len(body) > MAX_APP_DATA:
            raise InvalidChatMessage("app data over the limit")
        if body and not app:
            raise InvalidChatMessage("app data without an application name")
        try:
            name = app.decode("ascii") if app else ""
            if name:
                check_app_name(name)
            return cls(text.decode(), tuple(receipts), name, body)
        except UnicodeDecodeError:
            raise InvalidChatMessage("text or application name is not UTF-8") from None


def _sealing_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=b"teia sealed v1"
    ).derive(shared)


def seal_to(recipient_identity_key: bytes, envelope: bytes) -> bytes:
    """Seal ``envelope`` so only the holder of the Ed25519 identity key can open it."""
    try:
        recipient = _native.ed25519_public_to_x25519(recipient_identity_key)
    except TeiaError as exc:
        raise InvalidChatMessage(f"unusable recipient key: {exc}") from None
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    key = _sealing_key(shared, ephemeral_public, recipient)
    sealed = ChaCha20Poly1305(key).encrypt(b"\0" * 12, envelope, bytes([_SEALED_VERSION]))
    return bytes([_SEALED_VERSION]) + ephemeral_public + sealed


def open_sealed(identity_seed: bytes, sealed: bytes) -> bytes:
    """Open what `seal_to` made for our identity; `InvalidChatMessage` if it is not for us."""
    if len(sealed) < 1 + 32 + 16 or sealed[0] != _SEALED_VERSION:
        raise InvalidChatMessage("not a sealed envelope")
    if len(sealed) > MAX_ENVELOPE_SIZE + 64:
        raise InvalidChatMessage("sealed envelope over the limit")
    private = X25519PrivateKey.from_private_bytes(_native.ed25519_seed_to_x25519(identity_seed))
    recipient = private.public_key().public_bytes_raw()
    ephemeral = sealed[1:33]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        key = _sealing_key(shared, ephemeral, recipient)
        return ChaCha20Poly1305(key).decrypt(b"\0" * 12, sealed[33:], sealed[:1])
    except (InvalidTag, ValueError):
        raise InvalidChatMessage("sealed envelope does not open with our key") from None
