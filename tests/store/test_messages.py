"""The store wire format: round trips, limits, and garbage that never crashes the parser."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teia.errors import InvalidStoreMessage
from teia.host.protobuf import encode_bytes_field, encode_uvarint
from teia.store import messages
from teia.store.messages import (
    MAX_PAYLOAD,
    MAX_REQUEST_SIZE,
    AckRequest,
    DeleteRequest,
    DepositRequest,
    Envelope,
    FetchRequest,
    GetBundleRequest,
    OwnerAuth,
    PutBundleRequest,
    Response,
    Status,
    SyncDigestsRequest,
    SyncInboxRequest,
    SyncPushRequest,
    Tombstone,
    _decode_request_general,
    _decode_response_general,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

ids = st.binary(min_size=16, max_size=16)
inboxes = st.binary(min_size=32, max_size=32)
uints = st.integers(min_value=0, max_value=2**40)
envelopes = st.builds(
    Envelope,
    inbox=inboxes,
    message_id=ids,
    payload=st.binary(max_size=300),
    timestamp_ms=uints,
    ttl_s=st.integers(min_value=0, max_value=2**32 - 1),
    expires_at_ms=uints,
)
auths = st.builds(
    OwnerAuth,
    public_key=st.binary(min_size=32, max_size=32),
    timestamp_ms=uints,
    nonce=st.binary(min_size=16, max_size=16),
    signature=st.binary(min_size=64, max_size=64),
)
tombstones = st.builds(Tombstone, message_id=ids, expires_at_ms=uints)
requests = st.one_of(
    st.builds(DepositRequest, st.lists(envelopes, min_size=1, max_size=5).map(tuple)),
    st.builds(
        FetchRequest,
        inboxes,
        st.binary(max_size=16),
        st.integers(min_value=0, max_value=256),
        auths,
    ),
    st.builds(AckRequest, inboxes, st.lists(ids, min_size=1, max_size=5).map(tuple), auths),
    st.builds(DeleteRequest, inboxes, st.lists(ids, min_size=1, max_size=5).map(tuple), auths),
    st.builds(
        PutBundleRequest,
        inboxes,
        st.binary(min_size=1, max_size=200),
        st.lists(st.binary(max_size=40), max_size=5).map(tuple),
        st.booleans(),
        auths,
    ),
    st.builds(GetBundleRequest, inboxes),
    st.builds(
        SyncDigestsRequest,
        st.lists(st.tuples(inboxes, st.binary(min_size=32, max_size=32)), max_size=4).map(tuple),
    ),
    st.builds(
        SyncInboxRequest,
        inboxes,
        st.lists(ids, max_size=5).map(tuple),
        st.lists(tombstones, max_size=5).map(tuple),
    ),
    st.builds(SyncPushRequest, st.lists(envelopes, min_size=1, max_size=3).map(tuple)),
)


@given(requests)
def test_requests_round_trip(request: object) -> None:
    assert decode_request(encode_request(request)) == request  # type: ignore[arg-type]


@given(
    st.builds(
        Response,
        status=st.sampled_from(list(Status)),
        error=st.text(max_size=50),
        results=st.lists(st.sampled_from(list(Status)), max_size=5).map(tuple),
        envelopes=st.lists(envelopes, max_size=3).map(tuple),
        cursor=st.binary(max_size=16),
        more=st.booleans(),
        bundle=st.binary(max_size=100),
        one_time_prekey=st.binary(max_size=64),
        inboxes=st.lists(inboxes, max_size=3).map(tuple),
        message_ids=st.lists(ids, max_size=3).map(tuple),
        tombstones=st.lists(tombstones, max_size=3).map(tuple),
        remaining=uints,
    )
)
def test_responses_round_trip(response: Response) -> None:
    assert decode_response(encode_response(response)) == response


@given(st.binary(max_size=400))
def test_garbage_requests_raise_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(InvalidStoreMessage):
        decode_request(data)


@given(st.binary(max_size=400))
def test_garbage_responses_raise_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(InvalidStoreMessage):
        decode_response(data)


@given(requests, st.data())
def test_truncated_and_mutated_requests_raise_only_typed_errors(
    request: object, data: st.DataObject
) -> None:
    wire = encode_request(request)  # type: ignore[arg-type]
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    # The outer length prefix covers the whole request: any cut breaks it.
    with pytest.raises(InvalidStoreMessage):
        decode_request(wire[:cut])
    flip = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    mutated = bytearray(wire)
    mutated[flip] ^= data.draw(st.integers(min_value=1, max_value=255))
    with contextlib.suppress(InvalidStoreMessage):
        decode_request(bytes(mutated))


def test_limits() -> None:
    inbox = os.urandom(32)
    big = Envelope(inbox, os.urandom(16), b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(InvalidStoreMessage, match="payload"):
        decode_request(encode_request(DepositRequest((big,))))
    many = tuple(Envelope(inbox, os.urandom(16), b"") for _ in range(257))
    with pytest.raises(InvalidStoreMessage, match="more than 256"):
        decode_request(encode_request(DepositRequest(many)))
    with pytest.raises(InvalidStoreMessage, match="over"):
        decode_request(b"\x0a" + encode_uvarint(MAX_REQUEST_SIZE) + bytes(MAX_REQUEST_SIZE))
    short_inbox = Envelope(b"x" * 31, os.urandom(16), b"")
    with pytest.raises(InvalidStoreMessage, match="31 bytes, not 32"):
        decode_request(encode_request(DepositRequest((short_inbox,))))


def test_strict_structure() -> None:
    inbox = os.urandom(32)
    get = encode_request(GetBundleRequest(inbox))
    with pytest.raises(InvalidStoreMessage, match="exactly one"):
        decode_request(get + get)
    with pytest.raises(InvalidStoreMessage, match="unknown kind"):
        decode_request(encode_bytes_field(42, b""))
    with pytest.raises(InvalidStoreMessage, match="more than once"):
        decode_request(encode_bytes_field(6, encode_bytes_field(1, inbox) * 2))
    # An owner operation without its signature does not parse.
    with pytest.raises(InvalidStoreMessage, match="signature"):
        decode_request(encode_request(FetchRequest(inbox)))
    with pytest.raises(InvalidStoreMessage, match="no message_id"):
        decode_request(encode_bytes_field(3, encode_bytes_field(1, inbox)))


# --- the fast paths (deposits, results, fetched pages) against the general reader -----------


def _outcome(decode: Callable[[bytes], object], data: bytes) -> object:
    try:
        return decode(data)
    except InvalidStoreMessage as exc:
        return ("refused", str(exc))


def _mutations(wire: bytes, data: st.DataObject) -> list[bytes]:
    """The wire form, cut, with a byte flipped, a byte inserted, a byte dropped."""
    out = [wire]
    if wire:
        at = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
        out.append(wire[:at])
        flipped = bytearray(wire)
        flipped[at] ^= data.draw(st.integers(min_value=1, max_value=255))
        out.append(bytes(flipped))
        out.append(wire[:at] + wire[at + 1 :])
        out.append(wire[:at] + bytes([data.draw(st.integers(0, 255))]) + wire[at:])
    return out


deposits = st.builds(DepositRequest, st.lists(envelopes, min_size=1, max_size=4).map(tuple))
fast_responses = st.builds(
    Response,
    results=st.lists(st.sampled_from(list(Status)), max_size=5).map(tuple),
    envelopes=st.lists(envelopes, max_size=3).map(tuple),
    cursor=st.binary(max_size=16),
    more=st.booleans(),
)


@settings(max_examples=300)
@given(deposits, st.data())
def test_fast_deposit_decoding_agrees_with_the_general_reader(
    request: DepositRequest, data: st.DataObject
) -> None:
    for wire in _mutations(encode_request(request), data):
        assert _outcome(decode_request, wire) == _outcome(_decode_request_general, wire)


@settings(max_examples=300)
@given(fast_responses, st.data())
def test_fast_response_decoding_agrees_with_the_general_reader(
    response: Response, data: st.DataObject
) -> None:
    for wire in _mutations(encode_response(response), data):
        assert _outcome(decode_response, wire) == _outcome(_decode_response_general, wire)


@given(st.binary(max_size=400))
def test_fast_paths_agree_on_garbage(data: bytes) -> None:
    assert _outcome(decode_response, data) == _outcome(_decode_response_general, data)
    deposit = b"\x0a" + encode_uvarint(len(data)) + data
    assert _outcome(decode_request, deposit) == _outcome(_decode_request_general, deposit)


@pytest.mark.parametrize(
    "envelope_bytes",
    [
        # Fields out of order, an unknown field, a non-minimal varint: valid, read generally.
        encode_bytes_field(2, b"m" * 16) + encode_bytes_field(1, b"i" * 32),
        encode_bytes_field(1, b"i" * 32) + encode_bytes_field(2, b"m" * 16) + b"\x38\x01",
        encode_bytes_field(1, b"i" * 32) + encode_bytes_field(2, b"m" * 16) + b"\x20\x81\x00",
        # Refused: a duplicate field, a short inbox, a TTL over 32 bits.
        encode_bytes_field(1, b"i" * 32) * 2 + encode_bytes_field(2, b"m" * 16),
        encode_bytes_field(1, b"i" * 31) + encode_bytes_field(2, b"m" * 16),
        encode_bytes_field(1, b"i" * 32)
        + encode_bytes_field(2, b"m" * 16)
        + b"\x28"
        + encode_uvarint(2**32),
    ],
)
def test_non_canonical_envelopes_are_read_as_the_general_reader_reads_them(
    envelope_bytes: bytes,
) -> None:
    wire = encode_bytes_field(1, encode_bytes_field(1, envelope_bytes))
    assert _outcome(decode_request, wire) == _outcome(_decode_request_general, wire)
    page = encode_bytes_field(4, envelope_bytes)
    assert _outcome(decode_response, page) == _outcome(_decode_response_general, page)


@given(deposits, fast_responses)
def test_canonical_deposits_and_answers_take_the_fast_path(
    request: DepositRequest, response: Response
) -> None:
    def general(data: bytes) -> object:
        raise AssertionError("the general reader was used")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(messages, "_decode_request_general", general)
        patch.setattr(messages, "_decode_response_general", general)
        assert decode_request(encode_request(request)) == request
        assert decode_response(encode_response(response)) == response


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_the_varint_fast_path_is_the_codec(value: int) -> None:
    assert messages._varint(value) == encode_uvarint(value)
