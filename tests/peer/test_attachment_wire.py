"""The attachment wire formats and chunk crypto: round trips, garbage, truncation, oversize,
and chunks that cannot move between places or files."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import AttachmentCorrupted, InvalidAttachmentMessage
from teia.peer.attachments import (
    MAX_ANSWER,
    MAX_CHUNK_SIZE,
    MAX_FILE_SIZE,
    MAX_REQUEST,
    MAX_RUNS,
    MIN_CHUNK_SIZE,
    ChunkAnswer,
    ChunkRequest,
    FileCancel,
    FileChunk,
    FileDone,
    FileOffer,
    Status,
    _runs,
    decode_answer,
    decode_payload,
    decode_request,
    open_chunk,
    safe_name,
    seal_chunk,
)

ids = st.binary(min_size=16, max_size=16)


@st.composite
def offers(draw: st.DrawFn) -> FileOffer:
    name = draw(st.text(min_size=1, max_size=80).filter(lambda n: 1 <= len(n.encode()) <= 255))
    return FileOffer(
        draw(ids),
        name,
        draw(st.integers(0, MAX_FILE_SIZE)),
        draw(st.integers(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)),
        draw(st.binary(min_size=32, max_size=32)),
        draw(st.binary(min_size=32, max_size=32)),
    )


@st.composite
def requests(draw: st.DrawFn) -> ChunkRequest:
    count = draw(st.integers(1, MAX_RUNS))
    runs, start = [], 0
    for _ in range(count):
        start += draw(st.integers(0, 1000))
        length = draw(st.integers(1, 1000))
        runs.append((start, length))
        start += length
    return ChunkRequest(draw(ids), tuple(runs))


payloads = st.one_of(
    offers(),
    st.builds(FileChunk, ids, st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=200)),
    st.builds(FileDone, ids),
    st.builds(FileCancel, ids),
)
answers = st.one_of(
    st.builds(
        ChunkAnswer,
        st.just(Status.OK),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=16, max_size=300),
    ),
    st.builds(ChunkAnswer, st.sampled_from([Status.UNAVAILABLE, Status.BAD_REQUEST])),
)


@given(payloads)
def test_payloads_round_trip(payload: FileOffer | FileChunk | FileDone | FileCancel) -> None:
    assert decode_payload(payload.encode()) == payload


@given(requests())
def test_requests_round_trip(request: ChunkRequest) -> None:
    encoded = request.encode()
    assert len(encoded) <= MAX_REQUEST
    assert decode_request(encoded) == request


@given(answers)
def test_answers_round_trip(answer: ChunkAnswer) -> None:
    assert decode_answer(answer.encode()) == answer


@given(st.binary(max_size=600))
def test_garbage_is_refused_or_parsed_never_anything_else(data: bytes) -> None:
    for decode in (decode_payload, decode_request, decode_answer):
        try:
            decoded = decode(data)
        except InvalidAttachmentMessage:
            continue
        assert decoded.encode() == data  # strict: one encoding per value


@given(st.one_of(payloads, requests(), answers), st.data())
def test_truncated_messages_are_refused(
    message: FileOffer | FileChunk | FileDone | FileCancel | ChunkRequest | ChunkAnswer,
    data: st.DataObject,
) -> None:
    encoded = message.encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    decode = {
        ChunkRequest: decode_request,
        ChunkAnswer: decode_answer,
    }.get(type(message), decode_payload)
    truncated = encoded[:cut]
    try:
        decoded = decode(truncated)
    except InvalidAttachmentMessage:
        return
    # A chunk or an answer carries bytes to its end: a shorter one is another, smaller value.
    assert isinstance(decoded, FileChunk | ChunkAnswer)
    assert decoded != message


def test_oversize_and_out_of_range_are_refused() -> None:
    with pytest.raises(InvalidAttachmentMessage):
        decode_answer(bytes(MAX_ANSWER + 1))
    with pytest.raises(InvalidAttachmentMessage):
        decode_request(bytes(MAX_REQUEST + 1))
    with pytest.raises(InvalidAttachmentMessage):
        decode_payload(FileChunk(bytes(16), 0, bytes(MAX_CHUNK_SIZE + 17)).encode())
    with pytest.raises(InvalidAttachmentMessage):
        FileOffer(bytes(16), "x", MAX_FILE_SIZE + 1, 65536, bytes(32), bytes(32))
    with pytest.raises(InvalidAttachmentMessage):
        FileOffer(bytes(16), "x" * 256, 1, 65536, bytes(32), bytes(32))
    with pytest.raises(InvalidAttachmentMessage):
        ChunkRequest(bytes(16), ((5, 2), (6, 1)))  # overlapping
    with pytest.raises(InvalidAttachmentMessage):
        ChunkRequest(bytes(16), tuple((i * 2, 1) for i in range(MAX_RUNS + 1)))


def _offer(size: int, chunk: int = 1024, key: bytes | None = None) -> FileOffer:
    return FileOffer(os.urandom(16), "f", size, chunk, key or os.urandom(32), bytes(32))


def test_chunks_open_only_at_their_place_in_their_file() -> None:
    offer = _offer(3000)
    plain = [os.urandom(offer.plain_length(i)) for i in range(offer.chunk_count)]
    sealed = [seal_chunk(offer, offer.key, i, p) for i, p in enumerate(plain)]
    assert offer.chunk_count == 3
    assert [open_chunk(offer, i, s) for i, s in enumerate(sealed)] == plain
    with pytest.raises(AttachmentCorrupted):
        open_chunk(offer, 1, sealed[0])  # moved
    flipped = bytearray(sealed[2])
    flipped[0] ^= 1
    with pytest.raises(AttachmentCorrupted):
        open_chunk(offer, 2, bytes(flipped))  # tampered
    with pytest.raises(AttachmentCorrupted):
        open_chunk(offer, 3, sealed[2])  # extended past the end
    other = FileOffer(os.urandom(16), "f", 3000, 1024, offer.key, bytes(32))
    with pytest.raises(AttachmentCorrupted):
        open_chunk(other, 0, sealed[0])  # another file (even under the same key)
    shorter = FileOffer(offer.file_id, "f", 2048, 1024, offer.key, bytes(32))
    with pytest.raises(AttachmentCorrupted):
        open_chunk(shorter, 1, sealed[1])  # the same file claimed shorter (truncation)


def test_an_empty_file_is_one_empty_chunk() -> None:
    offer = _offer(0)
    assert offer.chunk_count == 1
    assert open_chunk(offer, 0, seal_chunk(offer, offer.key, 0, b"")) == b""


def test_missing_runs() -> None:
    bitmap = bytearray(2)
    assert _runs(bitmap, 10, 64) == ((0, 10),)
    for i in (0, 1, 4, 9):
        bitmap[i >> 3] |= 1 << (i & 7)
    assert _runs(bitmap, 10, 64) == ((2, 2), (5, 4))
    assert _runs(bitmap, 10, 1) == ((2, 2),)


@given(st.text(max_size=300))
def test_safe_names_stay_in_the_directory(name: str) -> None:
    safe = safe_name(name)
    assert safe
    assert "/" not in safe
    assert "\\" not in safe
    assert not safe.startswith(".")
    assert len(safe.encode()) <= 255
    assert all(ord(c) >= 32 and c != "\x7f" for c in safe)
