"""Unsigned varints (multiformats unsigned-varint)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidVarint, TeiaError
from teia.identity import varint

# Examples from the multiformats unsigned-varint README.
KNOWN = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (255, "ff01"),
    (300, "ac02"),
    (16384, "808001"),
    (2**63 - 1, "ffffffffffffffff7f"),
]


@pytest.mark.parametrize(("value", "encoded"), KNOWN)
def test_known_answers(value: int, encoded: str) -> None:
    assert varint.encode(value).hex() == encoded
    assert varint.decode(bytes.fromhex(encoded)) == (value, len(encoded) // 2)


@given(st.integers(min_value=0, max_value=varint.MAX_VALUE), st.binary(max_size=8))
def test_round_trip_with_offset_and_trailing_bytes(value: int, tail: bytes) -> None:
    encoded = varint.encode(value)
    assert len(encoded) == varint.encoded_length(value) <= varint.MAX_BYTES
    data = b"\xaa" + encoded + tail
    assert varint.decode(data, 1) == (value, 1 + len(encoded))


@pytest.mark.parametrize("value", [-1, 2**63, 2**64, True, 1.0, "1"])
def test_encode_rejects_out_of_range_and_non_ints(value: object) -> None:
    with pytest.raises(InvalidVarint):
        varint.encode(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "truncated"),
        ("80", "truncated"),
        ("ff80", "truncated"),
        ("8000", "not minimally encoded"),
        ("ff00", "not minimally encoded"),
        ("808080808080808000", "not minimally encoded"),
        ("ffffffffffffffff80", "longer than 9 bytes"),
        ("ffffffffffffffffff01", "longer than 9 bytes"),
    ],
)
def test_decode_rejects_malformed(data: str, message: str) -> None:
    with pytest.raises(InvalidVarint, match=message):
        varint.decode(bytes.fromhex(data))


def test_decode_offset_past_end_and_negative() -> None:
    with pytest.raises(InvalidVarint):
        varint.decode(b"\x01", 1)
    with pytest.raises(InvalidVarint):
        varint.decode(b"\x01", -1)


def test_error_is_a_teia_value_error() -> None:
    assert issubclass(InvalidVarint, TeiaError)
    assert issubclass(InvalidVarint, ValueError)


@given(st.binary(max_size=12), st.integers(min_value=0, max_value=12))
def test_garbage_raises_only_invalid_varint(data: bytes, offset: int) -> None:
    try:
        value, end = varint.decode(data, offset)
    except InvalidVarint:
        return
    assert varint.encode(value) == data[offset:end]


def test_accepts_bytearray_and_memoryview() -> None:
    assert varint.decode(bytearray(b"\xac\x02")) == (300, 2)
    assert varint.decode(memoryview(b"\xac\x02")) == (300, 2)
