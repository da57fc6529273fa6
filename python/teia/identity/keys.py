"""libp2p key encodings and Ed25519 signature checks.

Keys cross the wire as the libp2p ``PublicKey`` / ``PrivateKey`` protobuf (peer-ids spec)::

    message PublicKey { required KeyType Type = 1; required bytes Data = 2; }

libp2p requires a deterministic encoding: both fields present, in tag order, minimal varints,
nothing else. We encode exactly that and refuse anything else when decoding, so one key has one
byte form (and so one peer ID). Ed25519 ``Data`` is the raw 32-byte public key; the private form
is ``seed ‖ public`` (64 bytes), or the legacy ``seed ‖ public ‖ public`` (96 bytes) on input.
"""

from __future__ import annotations

import enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import InvalidKeyEncoding, InvalidVarint
from teia.identity import varint

__all__ = [
    "ED25519_KEY_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "KeyType",
    "decode_private_key",
    "decode_public_key",
    "encode_private_key",
    "encode_public_key",
    "verify",
]

ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64

_TYPE_TAG = 0x08  # field 1, wire type 0 (varint)
_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


class KeyType(enum.IntEnum):
    """The libp2p ``KeyType`` enum."""

    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


def _encode_key(key_type: KeyType, data: bytes) -> bytes:
    return (
        bytes([_TYPE_TAG])
        + varint.encode(int(key_type))
        + bytes([_DATA_TAG])
        + varint.encode(len(data))
        + data
    )


def _decode_key(encoded: bytes, what: str) -> tuple[KeyType, bytes]:
    try:
        if encoded[:1] != bytes([_TYPE_TAG]):
            raise InvalidKeyEncoding(f"{what} protobuf must start with the Type field (0x08)")
        raw_type, offset = varint.decode(encoded, 1)
        if encoded[offset : offset + 1] != bytes([_DATA_TAG]):
            raise InvalidKeyEncoding(f"{what} protobuf: Data field (0x12) must follow Type")
        length, offset = varint.decode(encoded, offset + 1)
    except InvalidVarint as exc:
        raise InvalidKeyEncoding(f"{what} protobuf: {exc}") from None
    if length != len(encoded) - offset:
        raise InvalidKeyEncoding(
            f"{what} protobuf: Data is declared as {length} bytes but "
            f"{len(encoded) - offset} follow (truncated, or trailing fields)"
        )
    try:
        key_type = KeyType(raw_type)
    except ValueError:
        raise InvalidKeyEncoding(f"{what} protobuf: unknown key type {raw_type}") from None
    return key_type, bytes(encoded[offset:])


def encode_public_key(public_key: bytes, key_type: KeyType = KeyType.ED25519) -> bytes:
    """The deterministic libp2p ``PublicKey`` protobuf of a raw key (Ed25519: 32 bytes)."""
    if key_type is KeyType.ED25519 and len(public_key) != ED25519_KEY_SIZE:
        raise InvalidKeyEncoding(
            f"an Ed25519 public key is {ED25519_KEY_SIZE} bytes, not {len(public_key)}"
        )
    return _encode_key(key_type, bytes(public_key))


def decode_public_key(encoded: bytes) -> tuple[KeyType, bytes]:
    """Parse a libp2p ``PublicKey`` protobuf into ``(key type, raw key data)``.

    Only the deterministic encoding is accepted. Ed25519 data must be exactly 32 bytes; the
    data of other key types is returned as is, unchecked.
    """
    key_type, data = _decode_key(encoded, "PublicKey")
    if key_type is KeyType.ED25519 and len(data) != ED25519_KEY_SIZE:
        raise InvalidKeyEncoding(
            f"PublicKey protobuf: Ed25519 key is {len(data)} bytes, not {ED25519_KEY_SIZE}"
        )
    return key_type, data


def encode_private_key(seed: bytes) -> bytes:
    """The libp2p ``PrivateKey`` protobuf of an Ed25519 seed: Data is ``seed ‖ public key``.

    The result is secret.
    """
    key = _private_key_from_seed(seed)
    return _encode_key(KeyType.ED25519, bytes(seed) + _raw_public(key.public_key()))


def decode_private_key(encoded: bytes) -> bytes:
    """The Ed25519 seed (32 bytes) from a libp2p ``PrivateKey`` protobuf.

    Accepts the 64-byte ``seed ‖ public`` form and the legacy 96-byte ``seed ‖ public ‖ public``
    form; the embedded public key must be the one the seed derives.
    """
    key_type, data = _decode_key(encoded, "PrivateKey")
    if key_type is not KeyType.ED25519:
        raise InvalidKeyEncoding(f"PrivateKey protobuf holds a {key_type.name} key, not Ed25519")
    if len(data) == 96:
        if data[32:64] != data[64:96]:
            raise InvalidKeyEncoding("legacy 96-byte Ed25519 private key: public halves differ")
        data = data[:64]
    if len(data) != 64:
        raise InvalidKeyEncoding(
            f"PrivateKey protobuf: Ed25519 data is {len(data)} bytes, not 64 (or legacy 96)"
        )
    seed, public = data[:32], data[32:]
    if _raw_public(_private_key_from_seed(seed).public_key()) != public:
        raise InvalidKeyEncoding("PrivateKey protobuf: public key does not match the seed")
    return seed


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` under ``public_key``.

    ``public_key`` is the raw 32-byte key. A key or signature of the wrong size is simply
    invalid: this returns ``False`` rather than raising.
    """
    if len(public_key) != ED25519_KEY_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(
            bytes(signature), bytes(data)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def _private_key_from_seed(seed: bytes) -> ed25519.Ed25519PrivateKey:
    if len(seed) != ED25519_KEY_SIZE:
        raise InvalidKeyEncoding(f"an Ed25519 seed is {ED25519_KEY_SIZE} bytes, not {len(seed)}")
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(seed))


def _raw_public(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
