"""libp2p peer IDs (peer-ids spec): a multihash of the deterministic ``PublicKey`` protobuf.

A key whose protobuf is at most 42 bytes (Ed25519: 36) is inlined with the ``identity``
multihash (code 0x00), so the ID carries the public key itself; larger keys (RSA) are hashed
with sha2-256 (code 0x12). The text form is the base58btc multihash (``12D3KooW…`` for Ed25519,
``Qm…`` for sha256 IDs). The CIDv1 form (``libp2p-key`` codec 0x72, multibase base32 ``b…`` by
default; base58btc ``z…`` and base36 ``k…`` are also read) is accepted when parsing and produced
by `PeerId.to_cid`.

Peer IDs of any key type parse; only Ed25519 keys can be turned *into* a peer ID here, and
`PeerId.public_key` is only known for inlined Ed25519 keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final, final

from teia.errors import InvalidKeyEncoding, InvalidPeerId, InvalidVarint
from teia.identity import base58, varint
from teia.identity.keys import KeyType, decode_public_key, encode_public_key

__all__ = ["MAX_INLINE_KEY_LENGTH", "PeerId"]

MAX_INLINE_KEY_LENGTH: Final = 42
"""Serialized keys up to this size use the identity multihash; larger ones are hashed."""

_IDENTITY: Final = 0x00
_SHA2_256: Final = 0x12
_SHA2_256_LENGTH: Final = 32
_CID_VERSION: Final = 1
_LIBP2P_KEY: Final = 0x72
_MAX_BYTES: Final = 128  # far above any valid ID (44 bytes); refuses big input before parsing
_MAX_TEXT: Final = 128  # comfortably above any valid form; bounds the decoding work


@final
class PeerId:
    """A libp2p peer ID. Immutable, hashable; equal when the multihash bytes are equal.

    Build one with `from_public_key`, `from_string` or `from_bytes` (the constructor is
    `from_bytes`). ``str(peer_id)`` is the base58btc form.
    """

    __slots__ = ("_bytes", "_hash", "_key_type", "_public_key")

    _bytes: bytes
    _hash: int
    _key_type: KeyType | None
    _public_key: bytes | None

    def __init__(self, data: bytes) -> None:
        """Parse and check a binary peer ID (a multihash); raises `InvalidPeerId`."""
        data = bytes(data)
        if not data:
            raise InvalidPeerId("empty peer ID")
        if len(data) > _MAX_BYTES:
            raise InvalidPeerId(f"peer ID of {len(data)} bytes is too long to be valid")
        try:
            code, offset = varint.decode(data)
            length, offset = varint.decode(data, offset)
        except InvalidVarint as exc:
            raise InvalidPeerId(f"peer ID multihash header: {exc}") from None
        digest = data[offset:]
        if length != len(digest):
            raise InvalidPeerId(
                f"peer ID multihash declares a {length}-byte digest but {len(digest)} bytes follow"
            )
        key_type: KeyType | None = None
        public_key: bytes | None = None
        if code == _IDENTITY:
            if length > MAX_INLINE_KEY_LENGTH:
                raise InvalidPeerId(
                    f"identity multihash of {length} bytes; keys over "
                    f"{MAX_INLINE_KEY_LENGTH} bytes must be sha2-256 hashed"
                )
            try:
                key_type, key_data = decode_public_key(digest)
            except InvalidKeyEncoding as exc:
                raise InvalidPeerId(f"peer ID does not inline a valid public key: {exc}") from None
            if key_type is KeyType.ED25519:
                public_key = key_data
        elif code == _SHA2_256:
            if length != _SHA2_256_LENGTH:
                raise InvalidPeerId(f"sha2-256 multihash digest is {length} bytes, not 32")
        else:
            raise InvalidPeerId(
                f"peer ID uses multihash code 0x{code:x}; only identity (0x00) and "
                "sha2-256 (0x12) are valid"
            )
        object.__setattr__(self, "_bytes", data)
        object.__setattr__(self, "_key_type", key_type)
        object.__setattr__(self, "_public_key", public_key)
        # Peer IDs key many dicts on a busy path (a dozen lookups per message sent).
        object.__setattr__(self, "_hash", hash((PeerId, data)))

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        """Parse a binary peer ID (the multihash); raises `InvalidPeerId`."""
        return cls(data)

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """The peer ID of a raw 32-byte Ed25519 public key."""
        try:
            encoded = encode_public_key(public_key, KeyType.ED25519)
        except InvalidKeyEncoding as exc:
            raise InvalidPeerId(str(exc)) from None
        return cls.from_public_key_protobuf(encoded)

    @classmethod
    def from_public_key_protobuf(cls, encoded: bytes) -> PeerId:
        """The peer ID of a serialized libp2p ``PublicKey`` protobuf (any key type).

        The protobuf must be in the deterministic encoding, or the ID would not be the one its
        owner computes.
        """
        try:
            decode_public_key(encoded)
        except InvalidKeyEncoding as exc:
            raise InvalidPeerId(str(exc)) from None
        if len(encoded) <= MAX_INLINE_KEY_LENGTH:
            return cls(bytes([_IDENTITY, len(encoded)]) + encoded)
        return cls(bytes([_SHA2_256, _SHA2_256_LENGTH]) + hashlib.sha256(encoded).digest())

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58btc form (``12D3KooW…``, ``Qm…``) or a CIDv1 (``bafz…``, ``z…``, ``k…``).

        Raises `InvalidPeerId` for anything else.
        """
        if not isinstance(text, str):
            raise InvalidPeerId(f"peer ID text must be str, not {type(text).__name__}")
        if not text:
            raise InvalidPeerId("empty peer ID")
        if len(text) > _MAX_TEXT:
            raise InvalidPeerId(f"peer ID text is {len(text)} characters; too long to be valid")
        if text.startswith(("1", "Qm")):
            return cls(_decode_base58(text))
        return cls._from_cid(_decode_multibase(text))

    @classmethod
    def _from_cid(cls, cid: bytes) -> PeerId:
        try:
            version, offset = varint.decode(cid)
            codec, offset = varint.decode(cid, offset)
        except InvalidVarint as exc:
            raise InvalidPeerId(f"peer ID CID header: {exc}") from None
        if version != _CID_VERSION:
            raise InvalidPeerId(f"peer ID CID has version {version}; only CIDv1 is valid")
        if codec != _LIBP2P_KEY:
            raise InvalidPeerId(
                f"CID codec is 0x{codec:x}, not libp2p-key (0x72): this is not a peer ID"
            )
        return cls(cid[offset:])

    # --- views --------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The binary form: the multihash."""
        return self._bytes

    def to_base58(self) -> str:
        """The base58btc text form (what ``str()`` returns)."""
        return base58.encode(self._bytes)

    def to_cid(self) -> str:
        """The CIDv1 text form: multibase base32 (``b…``) of ``0x01 ‖ 0x72 ‖ multihash``."""
        cid = varint.encode(_CID_VERSION) + varint.encode(_LIBP2P_KEY) + self._bytes
        return "b" + base64.b32encode(cid).decode("ascii").rstrip("=").lower()

    @property
    def public_key(self) -> bytes | None:
        """The raw Ed25519 public key inlined in this ID, or ``None`` (hashed or other key type)."""
        return self._public_key

    @property
    def key_type(self) -> KeyType | None:
        """The key type of an inlined key, or ``None`` for a sha2-256 (hashed) ID."""
        return self._key_type

    # --- object protocol ----------------------------------------------------------------------

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self._bytes == other._bytes

    def __hash__(self) -> int:
        return self._hash

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PeerId is immutable")

    def __reduce__(self) -> tuple[type[PeerId], tuple[bytes]]:
        return (PeerId, (self._bytes,))


def _decode_base58(text: str) -> bytes:
    try:
        return base58.decode(text)
    except ValueError as exc:
        raise InvalidPeerId(f"peer ID is not valid base58btc: {exc}") from None


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _decode_multibase(text: str) -> bytes:
    prefix, body = text[0], text[1:]
    if not body:
        raise InvalidPeerId(f"peer ID {text!r} has a multibase prefix and nothing after it")
    if prefix in "bB":
        if (prefix == "b" and body != body.lower()) or (prefix == "B" and body != body.upper()):
            raise InvalidPeerId("multibase base32 text mixes upper and lower case")
        if not body.isascii():
            raise InvalidPeerId("multibase base32 text has non-ASCII characters")
        padded = body.upper() + "=" * (-len(body) % 8)
        try:
            decoded = base64.b32decode(padded)
        except (binascii.Error, ValueError):
            raise InvalidPeerId("peer ID CID is not valid base32") from None
        # Only canonical text: a valid length and zero bits in the last character's padding.
        if base64.b32encode(decoded).decode("ascii").rstrip("=") != body.upper():
            raise InvalidPeerId("peer ID CID is not canonical base32")
        return decoded
    if prefix == "z":
        return _decode_base58(body)
    if prefix == "k":
        number = 0
        for char in body:
            digit = _BASE36.find(char)
            if digit < 0:
                raise InvalidPeerId(f"invalid base36 character {char!r} in peer ID CID")
            number = number * 36 + digit
        zeros = len(body) - len(body.lstrip("0"))
        return b"\0" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")
    raise InvalidPeerId(
        f"peer ID {text[:16]!r}… is neither base58btc (starts with '1' or 'Qm') nor a "
        "multibase CID (starts with 'b', 'B', 'z' or 'k')"
    )
