"""base58btc (the Bitcoin alphabet), as peer IDs and multibase ``z`` use it.

Each leading zero byte maps to one leading ``1``; the rest is the big-endian number written in
base 58. Inputs are small (peer IDs are under 64 bytes), so plain integer arithmetic is fine;
callers bound the input length before decoding untrusted text.
"""

from __future__ import annotations

__all__ = ["ALPHABET", "decode", "encode"]

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {char: value for value, char in enumerate(ALPHABET)}


def encode(data: bytes) -> str:
    """The base58btc text of ``data``."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, remainder = divmod(number, 58)
        digits.append(ALPHABET[remainder])
    return "1" * zeros + "".join(reversed(digits))


def decode(text: str) -> bytes:
    """The bytes of base58btc ``text``; raises `ValueError` on a character outside the alphabet."""
    number = 0
    for position, char in enumerate(text):
        digit = _INDEX.get(char)
        if digit is None:
            raise ValueError(f"invalid base58btc character {char!r} at position {position}")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body
