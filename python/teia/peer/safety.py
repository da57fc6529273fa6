"""Safety numbers: what two people compare (read aloud, or side by side) to verify each other.

Each side's half is 30 digits derived from its identity key and peer ID by iterated SHA-512
(the construction Signal publishes for its safety numbers, with our own version string)::

    h = SHA-512(version (2 bytes, 0) ‖ key ‖ id);  5200 times: h = SHA-512(h ‖ key)
    half = first 30 bytes of h, as six 5-byte big-endian integers, each mod 100000, 5 digits

The number is both halves, the smaller first, so both people see the same 60 digits, shown in
12 groups of 5. A changed identity key changes the number.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["format_safety_number", "safety_number"]

_ITERATIONS: Final = 5200
_VERSION: Final = b"\x00\x00"


def _half(identity_key: bytes, peer_id: bytes) -> str:
    digest = hashlib.sha512(_VERSION + identity_key + peer_id).digest()
    for _ in range(_ITERATIONS):
        digest = hashlib.sha512(digest + identity_key).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number(local_key: bytes, local_id: bytes, remote_key: bytes, remote_id: bytes) -> str:
    """The 60-digit safety number of two identities (the same from either side)."""
    halves = sorted((_half(local_key, local_id), _half(remote_key, remote_id)))
    return halves[0] + halves[1]


def format_safety_number(number: str) -> str:
    """``12345 67890 …`` in lines of four groups, as people read it."""
    groups = [number[i : i + 5] for i in range(0, len(number), 5)]
    return "\n".join(" ".join(groups[i : i + 4]) for i in range(0, len(groups), 4))
