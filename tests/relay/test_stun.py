"""STUN/TURN codec: RFC 5769 known answers, round trips, and hostile bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidStunMessage
from teia.relay import stun
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2.1-2.4 (the test vectors, as the RFC prints them).
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
SAMPLE_REQUEST = _hex(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
SAMPLE_IPV4_RESPONSE = _hex(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
SAMPLE_IPV6_RESPONSE = _hex(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
SAMPLE_LONG_TERM_REQUEST = _hex(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)
LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
LONG_TERM_PASSWORD = "The\u00adM\u00aatr\u2168"  # SASLprep → "TheMatrIX"
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def test_rfc5769_sample_request() -> None:
    message = stun.parse(SAMPLE_REQUEST)
    assert (message.method, message.cls) == (Method.BINDING, MessageClass.REQUEST)
    assert message.transaction_id == TID
    assert stun.decode_text(Attr.SOFTWARE, message.get(Attr.SOFTWARE) or b"") == "STUN test client"
    assert message.get(Attr.USERNAME) == b"evtj:h6vY"
    assert message.get(Attr.PRIORITY) == bytes.fromhex("6e0001ff")
    assert message.has_fingerprint
    assert message.verify_integrity(SHORT_TERM_PASSWORD.encode())
    assert not message.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBu")
    assert message.unknown_comprehension_required({Attr.USERNAME}) == [Attr.PRIORITY]


def test_rfc5769_ipv4_response() -> None:
    message = stun.parse(SAMPLE_IPV4_RESPONSE)
    assert (message.method, message.cls) == (Method.BINDING, MessageClass.SUCCESS)
    value = message.get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert stun.decode_xor_address(value, message.transaction_id) == ("192.0.2.1", 32853)
    assert message.verify_integrity(SHORT_TERM_PASSWORD.encode())


def test_rfc5769_ipv6_response() -> None:
    message = stun.parse(SAMPLE_IPV6_RESPONSE)
    value = message.get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert stun.decode_xor_address(value, message.transaction_id) == (
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )
    assert message.verify_integrity(SHORT_TERM_PASSWORD.encode())


def test_rfc5769_long_term_request_verifies_and_rebuilds_byte_for_byte() -> None:
    message = stun.parse(SAMPLE_LONG_TERM_REQUEST)
    assert stun.decode_text(Attr.USERNAME, message.get(Attr.USERNAME) or b"") == LONG_TERM_USERNAME
    assert message.get(Attr.REALM) == b"example.org"
    assert message.get(Attr.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    assert stun.saslprep(LONG_TERM_PASSWORD) == "TheMatrIX"
    key = stun.long_term_key(LONG_TERM_USERNAME, "example.org", LONG_TERM_PASSWORD)
    assert message.verify_integrity(key)
    assert not message.verify_integrity(stun.long_term_key(LONG_TERM_USERNAME, "example.org", "x"))
    rebuilt = (
        MessageBuilder(Method.BINDING, MessageClass.REQUEST, message.transaction_id)
        .add_text(Attr.USERNAME, LONG_TERM_USERNAME)
        .add_text(Attr.NONCE, "f//499k954d6OL34oL9FSTvy64sA")
        .add_text(Attr.REALM, "example.org")
        .finish(key=key)
    )
    assert rebuilt == SAMPLE_LONG_TERM_REQUEST


def test_rfc5769_ipv4_response_rebuilds_with_its_padding_aside() -> None:
    # The RFC pads SOFTWARE with a space; we pad with zeros, so only the MAC and CRC differ.
    rebuilt = (
        MessageBuilder(Method.BINDING, MessageClass.SUCCESS, TID)
        .add_text(Attr.SOFTWARE, "test vector")
        .add_xor_address(Attr.XOR_MAPPED_ADDRESS, "192.0.2.1", 32853)
        .finish(key=SHORT_TERM_PASSWORD.encode(), fingerprint=True)
    )
    assert rebuilt[:35] == SAMPLE_IPV4_RESPONSE[:35]
    assert rebuilt[36:48] == SAMPLE_IPV4_RESPONSE[36:48]
    parsed = stun.parse(rebuilt)
    assert parsed.verify_integrity(SHORT_TERM_PASSWORD.encode())


def test_message_type_bits() -> None:
    cases = {
        (Method.BINDING, MessageClass.REQUEST): 0x0001,
        (Method.BINDING, MessageClass.SUCCESS): 0x0101,
        (Method.BINDING, MessageClass.ERROR): 0x0111,
        (Method.ALLOCATE, MessageClass.ERROR): 0x0113,
        (Method.SEND, MessageClass.INDICATION): 0x0016,
        (Method.DATA, MessageClass.INDICATION): 0x0017,
        (Method.CHANNEL_BIND, MessageClass.SUCCESS): 0x0109,
    }
    for (method, cls), wire in cases.items():
        data = MessageBuilder(method, cls, TID).finish()
        assert struct.unpack_from("!H", data)[0] == wire
        parsed = stun.parse(data)
        assert (parsed.method, parsed.cls) == (method, cls)


def test_sha256_integrity_and_fingerprint_order() -> None:
    key = b"k" * 16
    data = (
        MessageBuilder(Method.ALLOCATE, MessageClass.REQUEST, TID)
        .add_u32(Attr.REQUESTED_TRANSPORT, 17 << 24)
        .finish(key=key, sha256=True, fingerprint=True)
    )
    message = stun.parse(data)
    assert message.integrity_at is not None
    assert message.integrity_sha256_at is not None
    assert message.fingerprint_at == len(data) - 8
    assert message.verify_integrity(key)
    assert not message.verify_integrity(b"other")
    # A flipped bit in the SHA-256 MAC fails verification even though the SHA-1 one holds.
    tampered = bytearray(data)
    tampered[message.integrity_sha256_at + 4] ^= 1
    tampered = tampered[:-8]
    refingered = stun.parse(
        bytes(tampered[:2]) + struct.pack("!H", len(tampered) - 20) + bytes(tampered[4:])
    )
    assert not refingered.verify_integrity(key)


def test_attributes_after_integrity_are_ignored() -> None:
    key = b"secret"
    signed = MessageBuilder(Method.BINDING, MessageClass.REQUEST, TID).finish(key=key)
    extra = struct.pack("!HH", Attr.USERNAME, 4) + b"evil"
    data = signed[:2] + struct.pack("!H", len(signed) - 20 + 8) + signed[4:] + extra
    message = stun.parse(data)
    assert message.get(Attr.USERNAME) is None
    assert message.verify_integrity(key)


def test_error_code_unknown_attributes_and_numbers() -> None:
    data = (
        MessageBuilder(Method.ALLOCATE, MessageClass.ERROR, TID)
        .add_error(420, "Unknown Attribute")
        .add_unknown_attributes([0x0031, 0x0042])
        .add_u32(Attr.LIFETIME, 600)
        .add(Attr.CHANNEL_NUMBER, struct.pack("!HH", 0x4001, 0))
        .add(Attr.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
        .add(Attr.REQUESTED_ADDRESS_FAMILY, bytes([2, 0, 0, 0]))
        .add(Attr.MAPPED_ADDRESS, stun.encode_address("10.1.2.3", 4242))
        .finish(fingerprint=True)
    )
    message = stun.parse(data)
    assert stun.decode_error_code(message.get(Attr.ERROR_CODE) or b"") == (420, "Unknown Attribute")
    assert stun.decode_unknown_attributes(message.get(Attr.UNKNOWN_ATTRIBUTES) or b"") == [
        0x31,
        0x42,
    ]
    assert stun.decode_lifetime(message.get(Attr.LIFETIME) or b"") == 600
    assert stun.decode_channel_number(message.get(Attr.CHANNEL_NUMBER) or b"") == 0x4001
    assert stun.decode_requested_transport(message.get(Attr.REQUESTED_TRANSPORT) or b"") == 17
    assert stun.decode_requested_family(message.get(Attr.REQUESTED_ADDRESS_FAMILY) or b"") == 2
    assert stun.decode_address(message.get(Attr.MAPPED_ADDRESS) or b"") == ("10.1.2.3", 4242)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d[:19], "shorter than its header"),
        (lambda d: b"\x80" + d[1:], "two top bits"),
        (lambda d: d[:4] + b"\x00\x00\x00\x00" + d[8:], "magic cookie"),
        (lambda d: d[:2] + b"\x00\x05" + d[4:], "multiple of 4"),
        (lambda d: d[:-4], "length field"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "FINGERPRINT does not match"),
        (lambda d: d + struct.pack("!HH", 0x8022, 0), "length field"),
    ],
)
def test_malformed_messages_are_refused(mutate: object, match: str) -> None:
    assert callable(mutate)
    with pytest.raises(InvalidStunMessage, match=match):
        stun.parse(mutate(SAMPLE_REQUEST))


def test_limits() -> None:
    builder = MessageBuilder(Method.BINDING, MessageClass.REQUEST, TID)
    for _ in range(stun.MAX_ATTRIBUTES):
        builder.add(Attr.SOFTWARE, b"")
    data = builder.finish()
    stun.parse(data)
    over = data[:2] + struct.pack("!H", len(data) - 20 + 4) + data[4:] + b"\x80\x22\x00\x00"
    with pytest.raises(InvalidStunMessage, match="more than"):
        stun.parse(over)
    with pytest.raises(InvalidStunMessage, match="over 100"):
        stun.parse(SAMPLE_REQUEST, max_size=100)
    after_fp = SAMPLE_REQUEST[:2] + b"\x00\x5c" + SAMPLE_REQUEST[4:] + b"\x80\x22\x00\x00"
    with pytest.raises(InvalidStunMessage):
        stun.parse(after_fp)
    with pytest.raises(InvalidStunMessage, match="over 513"):
        stun.decode_text(Attr.USERNAME, b"u" * 514)
    with pytest.raises(InvalidStunMessage, match="UTF-8"):
        stun.decode_text(Attr.REALM, b"\xff")
    for bad in (b"", b"\x00\x03\x00\x00", b"\x00\x01\x00\x00\x01"):
        with pytest.raises(InvalidStunMessage):
            stun.decode_xor_address(bad, TID)
    with pytest.raises(InvalidStunMessage):
        stun.decode_error_code(b"\x00\x00\x07\x00")
    with pytest.raises(ValueError, match="prohibits"):
        stun.saslprep("a\u0007b")


def test_channel_data_and_stream_framing() -> None:
    frame = stun.encode_channel_data(0x4000, b"hello", pad=True)
    assert len(frame) == 12
    assert stun.is_channel_data(frame)
    assert not stun.is_stun(frame)
    assert stun.parse_channel_data(frame) == (0x4000, b"hello")
    assert stun.parse_channel_data(stun.encode_channel_data(0x4FFF, b"")) == (0x4FFF, b"")
    for bad in (
        b"\x40\x00\x00",
        b"\x40\x00\x00\x09abc",
        b"\x50\x00\x00\x00",
        b"\x40\x00\x00\x00pad!",
    ):
        with pytest.raises(InvalidStunMessage):
            stun.parse_channel_data(bad)
    buffer = bytearray(SAMPLE_REQUEST + frame + SAMPLE_IPV4_RESPONSE[:10])
    assert list(stun.iter_frames(buffer)) == [SAMPLE_REQUEST, frame]
    assert bytes(buffer) == SAMPLE_IPV4_RESPONSE[:10]
    assert stun.frame_length(b"\x01\x01") is None
    for bad in (b"\xc0\x00\x00\x00", b"\x00\x01\x00\x03", b"\x50\x00\x00\x04"):
        with pytest.raises(InvalidStunMessage):
            stun.frame_length(bad)


_tids = st.binary(min_size=12, max_size=12)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)


@given(tid=_tids, ip=st.one_of(_ipv4, _ipv6), port=st.integers(0, 65535))
def test_xor_address_round_trip(tid: bytes, ip: str, port: int) -> None:
    value = stun.encode_xor_address(ip, port, tid)
    assert stun.decode_xor_address(value, tid) == (ip, port)
    assert stun.decode_address(stun.encode_address(ip, port)) == (ip, port)


@given(
    method=st.integers(0, 0xFFF),
    cls=st.sampled_from(MessageClass),
    tid=_tids,
    attrs=st.lists(
        st.tuples(
            st.integers(0, 0xFFFF).filter(
                lambda t: (
                    t
                    not in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT)
                )
            ),
            st.binary(max_size=40),
        ),
        max_size=10,
    ),
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=32)),
    fingerprint=st.booleans(),
)
def test_message_round_trip(
    method: int,
    cls: MessageClass,
    tid: bytes,
    attrs: list[tuple[int, bytes]],
    key: bytes | None,
    fingerprint: bool,
) -> None:
    builder = MessageBuilder(method, cls, tid)
    for kind, value in attrs:
        builder.add(kind, value)
    data = builder.finish(key=key, fingerprint=fingerprint)
    message = stun.parse(data)
    assert (message.method, message.cls, message.transaction_id) == (method, cls, tid)
    assert list(message.attributes) == attrs
    assert message.has_fingerprint == fingerprint
    assert message.verify_integrity(key) if key is not None else not message.has_integrity
    assert stun.frame_length(data) == len(data)


@given(st.binary(max_size=200))
def test_garbage_raises_only_invalid_stun_message(data: bytes) -> None:
    for attempt in (stun.parse, stun.parse_channel_data, stun.frame_length):
        with contextlib.suppress(InvalidStunMessage):
            attempt(data)


@given(cut=st.integers(0, len(SAMPLE_LONG_TERM_REQUEST) - 1), flip=st.integers(0, 7))
def test_truncations_and_bit_flips(cut: int, flip: int) -> None:
    with pytest.raises(InvalidStunMessage):
        stun.parse(SAMPLE_LONG_TERM_REQUEST[:cut])
    flipped = bytearray(SAMPLE_REQUEST)
    position = cut % len(SAMPLE_REQUEST)
    flipped[position] ^= 1 << flip
    try:
        message = stun.parse(bytes(flipped))
    except InvalidStunMessage:
        return
    # FINGERPRINT catches every flip it covers; a flip of its own type turns it into an
    # ignored attribute after MESSAGE-INTEGRITY, which a server treats as "no fingerprint".
    assert not message.has_fingerprint, f"bit flip at {position} went unnoticed"
    assert message.verify_integrity(SHORT_TERM_PASSWORD.encode())


@given(
    prefix=st.binary(min_size=4, max_size=4).map(lambda b: b"\x00\x01" + b[2:]),
    body=st.binary(max_size=120),
)
def test_stun_shaped_garbage(prefix: bytes, body: bytes) -> None:
    data = (
        prefix[:2]
        + struct.pack("!H", len(body) - len(body) % 4)
        + stun.MAGIC_COOKIE.to_bytes(4, "big")
        + bytes(12)
        + body[: len(body) - len(body) % 4]
    )
    try:
        message = stun.parse(data)
    except InvalidStunMessage:
        return
    for kind, value in message.attributes:
        for decode in (
            lambda v: stun.decode_xor_address(v, message.transaction_id),
            stun.decode_error_code,
            lambda v, k=kind: stun.decode_text(k, v),
            stun.decode_lifetime,
            stun.decode_unknown_attributes,
            stun.decode_channel_number,
        ):
            with contextlib.suppress(InvalidStunMessage):
                decode(value)
