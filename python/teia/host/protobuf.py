"""The few protobuf (proto2) wire-format pieces our libp2p messages need, strict and bounded.

Fields are read as (number, wire type, value) triples: varints as ints, everything else as
bytes; callers skip the field numbers they do not know, as protobuf requires. Malformed input
raises `InvalidProtobuf`. Wire types 0 (varint), 1 (64-bit), 2 (length-delimited) and 5
(32-bit) are read; groups (3, 4) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator

from teia.errors import InvalidProtobuf, InvalidVarint
from teia.identity import varint

__all__ = [
    "Field",
    "bytes_value",
    "checked_fields",
    "decode_uvarint",
    "encode_bytes_field",
    "encode_uvarint",
    "encode_varint_field",
    "int_value",
    "iter_fields",
]

Field = tuple[int, int, int | bytes]


def encode_uvarint(value: int) -> bytes:
    """The minimal unsigned varint of ``value`` (`teia.identity.varint`)."""
    return varint.encode(value)


def decode_uvarint(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode a minimal unsigned varint at ``offset``; return (value, offset after it).

    Raises `InvalidProtobuf` (rather than the varint codec's own error) so that protobuf
    readers have one error type to handle.
    """
    try:
        return varint.decode(data, offset)
    except InvalidVarint as exc:
        raise InvalidProtobuf(str(exc)) from None


def encode_bytes_field(number: int, value: bytes) -> bytes:
    return encode_uvarint(number << 3 | 2) + encode_uvarint(len(value)) + value


def encode_varint_field(number: int, value: int) -> bytes:
    return encode_uvarint(number << 3) + encode_uvarint(value)


def checked_fields(data: bytes, what: str, error: type[Exception]) -> list[Field]:
    """Every field of one message; malformed input raises ``error`` (a codec's own type)."""
    try:
        return list(iter_fields(data))
    except InvalidProtobuf as exc:
        raise error(f"malformed {what}: {exc}") from None


def bytes_value(value: int | bytes, what: str, error: type[Exception]) -> bytes:
    """A length-delimited field's value, or ``error`` for another wire type."""
    if not isinstance(value, bytes):
        raise error(f"{what} has the wrong wire type")
    return value


def int_value(value: int | bytes, what: str, error: type[Exception]) -> int:
    """A varint field's value, or ``error`` for another wire type."""
    if not isinstance(value, int):
        raise error(f"{what} has the wrong wire type")
    return value


def iter_fields(data: bytes) -> Iterator[Field]:
    """Yield every field of one message; raise `InvalidProtobuf` on malformed input."""
    offset = 0
    while offset < len(data):
        key, offset = decode_uvarint(data, offset)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise InvalidProtobuf("field number 0")
        if wire_type == 0:
            value, offset = decode_uvarint(data, offset)
            yield number, wire_type, value
        elif wire_type == 2:
            length, offset = decode_uvarint(data, offset)
            if length > len(data) - offset:
                raise InvalidProtobuf("length-delimited field runs past the end")
            yield number, wire_type, data[offset : offset + length]
            offset += length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if size > len(data) - offset:
                raise InvalidProtobuf("fixed-size field runs past the end")
            yield number, wire_type, data[offset : offset + size]
            offset += size
        else:
            raise InvalidProtobuf(f"unsupported wire type {wire_type}")
