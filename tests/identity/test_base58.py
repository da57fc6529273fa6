"""base58btc."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.identity import base58

# From the IETF base58 draft (draft-msporny-base58) examples.
KNOWN = [
    (b"", ""),
    (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
    (
        b"The quick brown fox jumps over the lazy dog.",
        "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z",
    ),
    (bytes.fromhex("0000287fb4cd"), "11233QC4"),
]


@pytest.mark.parametrize(("data", "text"), KNOWN)
def test_known_answers(data: bytes, text: str) -> None:
    assert base58.encode(data) == text
    assert base58.decode(text) == data


@given(st.binary(max_size=80))
def test_round_trip(data: bytes) -> None:
    assert base58.decode(base58.encode(data)) == data


@pytest.mark.parametrize("text", ["0", "O", "I", "l", "abc+", "12 3", "é"])
def test_rejects_characters_outside_the_alphabet(text: str) -> None:
    with pytest.raises(ValueError, match="invalid base58btc character"):
        base58.decode(text)
