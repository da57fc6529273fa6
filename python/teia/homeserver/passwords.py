"""Password hashes: Argon2id in the PHC string format.

``$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>`` (unpadded standard base64), the
string the `cryptography` package's ``Argon2id.derive_phc_encoded`` wrote for hashes stored
before issue 10's memory work; both compute RFC 9106 Argon2id, so those hashes keep verifying.
The function itself is teia's extension (`teia._native.argon2id`, the RustCrypto ``argon2``
crate), which releases the GIL while it runs.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets

from teia._native import argon2id

__all__ = ["hash_password", "verify_password"]

SALT_BYTES = 16
HASH_BYTES = 32
# a stored hash names its own cost; these bound what a corrupt or hostile row can make us spend
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 64
_MAX_LANES = 64
_PHC = re.compile(
    r"\$argon2id\$v=19\$m=([0-9]{1,10}),t=([0-9]{1,10}),p=([0-9]{1,10})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: bytes, *, memory_kib: int, iterations: int, lanes: int) -> str:
    """A fresh salt's Argon2id hash of ``password`` as a PHC string (blocking: run in a thread)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = argon2id(password, salt, memory_kib, iterations, lanes, HASH_BYTES)
    params = f"m={memory_kib},t={iterations},p={lanes}"
    return f"$argon2id$v=19${params}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether ``password`` matches the PHC string ``encoded``; False for a malformed string or
    one whose parameters are out of bounds (blocking: run in a thread)."""
    found = _PHC.fullmatch(encoded)
    if found is None:
        return False
    memory_kib, iterations, lanes = (int(found.group(i)) for i in (1, 2, 3))
    if not (
        memory_kib <= _MAX_MEMORY_KIB
        and 1 <= iterations <= _MAX_ITERATIONS
        and 1 <= lanes <= _MAX_LANES
    ):
        return False
    try:
        salt, expected = _b64decode(found.group(4)), _b64decode(found.group(5))
        digest = argon2id(password, salt, memory_kib, iterations, lanes, len(expected))
    except ValueError:  # bad base64 (binascii.Error), a salt under 8 bytes, a hash under 4 …
        return False
    return hmac.compare_digest(digest, expected)
