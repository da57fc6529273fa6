"""The server's Ed25519 signing key: one file in the data directory, created 0600 on first
start, read back on every start (its key ID names it in signatures and the key server)."""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from teia.errors import ConfigError
from teia.homeserver.events import b64decode, b64encode

__all__ = ["SigningKey"]

_FILE = "signing.key"


@dataclass(frozen=True)
class SigningKey:
    """``key_id`` (``ed25519:XXXXXX``) and the private key."""

    key_id: str
    private: Ed25519PrivateKey

    @property
    def public_b64(self) -> str:
        # the *_raw methods, not public_bytes(Encoding.Raw, …): `serialization` would import
        # every key type's module (RSA, DSA, EC, SSH …), 1 MiB the server never uses
        return b64encode(self.private.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> SigningKey:
        alphabet = string.ascii_letters + string.digits
        version = "".join(secrets.choice(alphabet) for _ in range(6))
        return cls(f"ed25519:{version}", Ed25519PrivateKey.generate())

    def to_line(self) -> str:
        seed = self.private.private_bytes_raw()
        return f"{self.key_id} {b64encode(seed)}\n"

    @classmethod
    def from_line(cls, line: str) -> SigningKey:
        parts = line.split()
        if len(parts) != 2 or not parts[0].startswith("ed25519:"):
            raise ValueError("expected 'ed25519:<version> <base64 seed>'")
        seed = b64decode(parts[1])
        if len(seed) != 32:
            raise ValueError("the seed must be 32 bytes")
        return cls(parts[0], Ed25519PrivateKey.from_private_bytes(seed))

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
