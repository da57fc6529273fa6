"""The server's Ed25519 signing key: one file in the data directory, created 0600 on first
start, read back on every start (its key ID names it in signatures and the key server).

Signing and verification are teia's own extension (`teia._native`, ed25519-dalek): the
`cryptography` package would add 6-7 MiB to the homeserver's memory for these two operations
and Argon2id (issue 10).
"""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

from teia._native import ed25519_public_key, ed25519_sign, ed25519_verify
from teia.errors import ConfigError
from teia.homeserver.events import b64decode, b64encode

__all__ = ["SigningKey", "VerifyKey"]

_FILE = "signing.key"


@dataclass(frozen=True)
class VerifyKey:
    """A server's Ed25519 public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")

    @classmethod
    def from_b64(cls, text: str) -> VerifyKey:
        """From unpadded base64, as the key server publishes it; ValueError if malformed."""
        return cls(b64decode(text))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``message`` (strict RFC 8032)."""
        return ed25519_verify(self.raw, message, signature)


@dataclass(frozen=True)
class SigningKey:
    """``key_id`` (``ed25519:XXXXXX``) and the private key (its 32-byte RFC 8032 seed)."""

    key_id: str
    seed: bytes = field(repr=False)
    public: VerifyKey = field(init=False)

    def __post_init__(self) -> None:
        # ValueError (a teia.errors.InvalidKey) unless the seed is 32 bytes
        object.__setattr__(self, "public", VerifyKey(ed25519_public_key(self.seed)))

    @property
    def public_b64(self) -> str:
        return b64encode(self.public.raw)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return ed25519_sign(self.seed, message)

    @classmethod
    def generate(cls) -> SigningKey:
        alphabet = string.ascii_letters + string.digits
        version = "".join(secrets.choice(alphabet) for _ in range(6))
        return cls(f"ed25519:{version}", secrets.token_bytes(32))

    def to_line(self) -> str:
        return f"{self.key_id} {b64encode(self.seed)}\n"

    @classmethod
    def from_line(cls, line: str) -> SigningKey:
        parts = line.split()
        if len(parts) != 2 or not parts[0].startswith("ed25519:"):
            raise ValueError("expected 'ed25519:<version> <base64 seed>'")
        seed = b64decode(parts[1])
        if len(seed) != 32:
            raise ValueError("the seed must be 32 bytes")
        return cls(parts[0], seed)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> SigningKey:
        """The key in ``data_dir/signing.key``, written (0600, atomically) if missing."""
        path = data_dir / _FILE
        data_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            try:
                return cls.from_line(path.read_text("ascii"))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"signing key {path} is unreadable: {exc}") from None
        key = cls.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key.to_line())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return key
