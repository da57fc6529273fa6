"""Unsigned varints as multiformats and libp2p use them (unsigned LEB128, strict).

The multiformats ``unsigned-varint`` rules: seven bits per byte, least significant group first,
the high bit set on every byte but the last; at most 9 bytes, so values below 2**63; and the
encoding must be minimal (no trailing ``0x80 … 0x00`` padding). Every violation raises
`InvalidVarint`, never another exception type.
"""

from __future__ import annotations

from teia.errors import InvalidVarint

__all__ = ["MAX_BYTES", "MAX_VALUE", "InvalidVarint", "decode", "encode", "encoded_length"]

MAX_BYTES = 9
"""The longest varint accepted: 9 bytes carry 63 bits."""

MAX_VALUE = (1 << 63) - 1
"""The largest encodable value."""

Buffer = bytes | bytearray | memoryview


_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))
"""The encodings of 0 … 127 (tags and small lengths: most varints on the wire)."""


def encode(value: int) -> bytes:
    """The minimal varint encoding of ``value`` (0 ≤ value < 2**63)."""
    if type(value) is int and 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidVarint(f"varint value must be an int, not {type(value).__name__}")
    if value < 0 or value > MAX_VALUE:
        raise InvalidVarint(f"varint value {value} is outside 0 … 2**63-1")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encoded_length(value: int) -> int:
    """How many bytes `encode` produces for ``value``."""
    return len(encode(value))


def decode(data: Buffer, offset: int = 0) -> tuple[int, int]:
    """Read one varint from ``data`` at ``offset``; return ``(value, offset just after it)``.

    Raises `InvalidVarint` when the input ends inside the varint, when it runs past 9 bytes,
    or when it is not minimally encoded.
    """
    if offset < 0:
        raise InvalidVarint(f"negative offset {offset}")
    if offset < len(data):
        first = data[offset]
        if first < 0x80:  # one byte: the common case
            return first, offset + 1
    value = 0
    for index in range(MAX_BYTES):
        position = offset + index
        if position >= len(data):
            raise InvalidVarint(
                "truncated varint: input ends before its last byte"
                if index
                else "truncated varint: no bytes left to read"
            )
        byte = data[position]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise InvalidVarint("varint is not minimally encoded (trailing zero group)")
            return value, position + 1
    raise InvalidVarint(f"varint longer than {MAX_BYTES} bytes")
