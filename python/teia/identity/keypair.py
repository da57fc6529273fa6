"""`Identity`: a node's or user's Ed25519 key pair, and the peer ID it yields."""

from __future__ import annotations

from typing import NoReturn, final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import InvalidKeyEncoding
from teia.identity.keys import (
    ED25519_KEY_SIZE,
    decode_private_key,
    encode_private_key,
    encode_public_key,
)
from teia.identity.peer_id import PeerId

__all__ = ["Identity"]


@final
class Identity:
    """An Ed25519 identity key pair.

    The secret is reachable only through `private_seed`, `private_key` and
    `to_private_key_protobuf`; ``repr`` shows the peer ID and nothing secret. Two identities
    are equal when their public keys are.
    """

    __slots__ = ("_peer_id", "_private_key", "_public_key")

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        """Wrap an existing `cryptography` Ed25519 private key."""
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise TypeError("Identity needs an Ed25519PrivateKey")
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = PeerId.from_public_key(self._public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (from the operating system's CSPRNG)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed (RFC 8032 private key); raises on other sizes."""
        if len(seed) != ED25519_KEY_SIZE:
            raise InvalidKeyEncoding(
                f"an Ed25519 seed is {ED25519_KEY_SIZE} bytes, not {len(seed)}"
            )
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def from_private_key_protobuf(cls, encoded: bytes) -> Identity:
        """Import a libp2p ``PrivateKey`` protobuf (Ed25519 only), e.g. a go-libp2p key file."""
        return cls.from_seed(decode_private_key(encoded))

    @property
    def private_seed(self) -> bytes:
        """The 32-byte Ed25519 seed. Secret."""
        return self._private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def private_key(self) -> ed25519.Ed25519PrivateKey:
        """The `cryptography` private key object. Secret."""
        return self._private_key

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def public_key_protobuf(self) -> bytes:
        """The libp2p ``PublicKey`` protobuf of the public key (what peers exchange)."""
        return encode_public_key(self._public_key)

    @property
    def peer_id(self) -> PeerId:
        """The libp2p peer ID (identity multihash of the public key protobuf)."""
        return self._peer_id

    def to_private_key_protobuf(self) -> bytes:
        """The libp2p ``PrivateKey`` protobuf (``seed ‖ public``). Secret."""
        return encode_private_key(self.private_seed)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``; check it with `teia.identity.verify`."""
        return self._private_key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self._public_key == other._public_key

    def __hash__(self) -> int:
        return hash((Identity, self._public_key))

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the secret to wherever the pickle goes; make that explicit.
        raise TypeError("Identity is not picklable; store it with teia.identity.keystore")
