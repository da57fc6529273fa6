"""Property tests of the peer's wire codecs: round trips, and garbage, truncation and oversize
input refused with `InvalidChatMessage` only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidChatMessage
from teia.peer.wire import (
    MAX_APP_DATA,
    MAX_ENVELOPE_SIZE,
    MAX_TEXT_BYTES,
    AckStatus,
    ChatAck,
    ChatEnvelope,
    Kind,
    Plaintext,
    _ack_any_layout,
    _encode_envelope_fields,
    _envelope_any_layout,
    _envelope_as_encoded,
    open_sealed,
)

ids = st.binary(min_size=16, max_size=16)
app_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-/", min_size=1, max_size=64)
envelopes = st.builds(
    ChatEnvelope,
    ids,
    st.binary(min_size=1, max_size=128),
    st.text(max_size=60),
    st.integers(0, 2**63 - 1),
    st.sampled_from(Kind),
    st.binary(max_size=2048),
)
plaintexts = st.one_of(
    st.builds(Plaintext, st.text(max_size=200), st.lists(ids, max_size=5).map(tuple)),
    st.builds(
        lambda app, data: Plaintext(app=app, data=data),
        app_names,
        st.binary(max_size=4096),
    ),
)


@given(envelopes)
def test_envelopes_round_trip(envelope: ChatEnvelope) -> None:
    assert ChatEnvelope.decode(envelope.encode()) == envelope


@given(plaintexts)
def test_plaintexts_round_trip(plaintext: Plaintext) -> None:
    assert Plaintext.decode(plaintext.encode()) == plaintext


@given(ids, st.sampled_from(AckStatus))
def test_acks_round_trip(message_id: bytes, status: AckStatus) -> None:
    ack = ChatAck(message_id, status)
    assert ChatAck.decode(ack.encode()) == ack


@given(st.binary(max_size=4096))
def test_garbage_fails_cleanly(data: bytes) -> None:
    for decode in (ChatEnvelope.decode, ChatAck.decode, Plaintext.decode):
        with contextlib.suppress(InvalidChatMessage):
            decode(data)
    with contextlib.suppress(InvalidChatMessage):
        open_sealed(b"\x01" * 32, data)


@given(envelopes, st.data())
def test_truncated_envelopes_fail_cleanly(envelope: ChatEnvelope, data: st.DataObject) -> None:
    encoded = envelope.encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    try:
        decoded = ChatEnvelope.decode(encoded[:cut])
    except InvalidChatMessage:
        return
    assert decoded != envelope


@given(plaintexts, st.data())
def test_truncated_plaintexts_fail_cleanly(plaintext: Plaintext, data: st.DataObject) -> None:
    encoded = plaintext.encode()
    if not encoded:
        return
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with contextlib.suppress(InvalidChatMessage):
        Plaintext.decode(encoded[:cut])


def test_oversize_input_is_refused() -> None:
    import pytest

    with pytest.raises(InvalidChatMessage):
        ChatEnvelope.decode(b"\x0a" + b"\x00" * MAX_ENVELOPE_SIZE)
    with pytest.raises(InvalidChatMessage):
        Plaintext(app="x", data=bytes(MAX_APP_DATA + 1)).encode()
    too_long_text = b"\x0a\x81\x80\x04" + b"a" * (MAX_TEXT_BYTES + 1)  # field 1, 65537 bytes
    with pytest.raises(InvalidChatMessage):
        Plaintext.decode(too_long_text)
    with pytest.raises(InvalidChatMessage):
        Plaintext.decode(b"\x22\x01x")  # data without an application name
    with pytest.raises(InvalidChatMessage):
        Plaintext.decode(b"\x1a\x02AB")  # an application name with capitals


def _outcome(decode: Callable[[bytes], object], data: bytes) -> object:
    try:
        return decode(data)
    except InvalidChatMessage:
        return InvalidChatMessage


@st.composite
def near_envelopes(draw: st.DrawFn) -> bytes:
    """Encodings as `ChatEnvelope.encode` writes them (often with our 38-byte peer IDs and no
    conversation), then perhaps one byte changed, a cut, or bytes added."""
    envelope = draw(envelopes)
    if draw(st.booleans()):
        envelope = ChatEnvelope(
            envelope.message_id,
            draw(st.binary(min_size=38, max_size=38)),
            "",
            envelope.timestamp_ms,
            envelope.kind,
            envelope.body,
        )
    data = bytearray(envelope.encode())
    change = draw(st.sampled_from(["none", "byte", "cut", "append"]))
    if change == "byte":
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif change == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif change == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@given(st.one_of(near_envelopes(), st.binary(max_size=300)))
def test_the_envelope_fast_path_agrees_with_the_general_reader(data: bytes) -> None:
    fast = _envelope_as_encoded(data)
    general = _outcome(_envelope_any_layout, data)
    if fast is not None:
        assert fast == general
    assert _outcome(ChatEnvelope.decode, data) == general


@given(envelopes)
def test_the_envelope_encoder_fast_path_writes_the_general_bytes(envelope: ChatEnvelope) -> None:
    assert envelope.encode() == _encode_envelope_fields(envelope)
    ours = ChatEnvelope(
        envelope.message_id, bytes(38), "", envelope.timestamp_ms, envelope.kind, b""
    )
    assert ours.encode() == _encode_envelope_fields(ours)


@given(envelopes)
def test_what_we_encode_takes_the_fast_path_unless_it_has_a_conversation(
    envelope: ChatEnvelope,
) -> None:
    fast = _envelope_as_encoded(envelope.encode())
    if envelope.conversation == "" and len(envelope.sender) < 0x80:
        assert fast == envelope
    else:
        assert fast is None


@given(st.binary(min_size=16, max_size=16), st.integers(0, 255), st.integers(0, 19), st.booleans())
def test_the_ack_fast_path_agrees_with_the_general_reader(
    message_id: bytes, status: int, position: int, change: bool
) -> None:
    data = bytearray(b"\x0a\x10" + message_id + b"\x10" + bytes([status]))
    if change:
        data[position] ^= 0x01
    assert _outcome(ChatAck.decode, bytes(data)) == _outcome(_ack_any_layout, bytes(data))
