"""Property tests of the group wire formats: round trips, and garbage, truncation, oversize and
tampering refused with `InvalidGroupMessage` only."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teia.crypto import GroupSenderKey
from teia.errors import InvalidGroupMessage
from teia.host.protobuf import encode_bytes_field, encode_varint_field
from teia.identity import Identity
from teia.peer.groupwire import (
    MAX_GROUP_NAME,
    MAX_MEMBERS,
    GroupHeader,
    GroupJoin,
    GroupLeave,
    GroupMessage,
    GroupPayload,
    GroupState,
    GroupText,
    KeyDistribution,
    derive_group_id,
)
from teia.peer.wire import MAX_APP_DATA

IDENTITIES = [Identity.generate() for _ in range(8)]
PEERS = [i.peer_id for i in IDENTITIES]
ids = st.binary(min_size=16, max_size=16)
versions = st.integers(0, 2**32 - 1)


@st.composite
def states(draw: st.DrawFn, version_of: st.SearchStrategy[int] = versions) -> GroupState:
    members = draw(st.lists(st.sampled_from(range(8)), min_size=1, max_size=8, unique=True))
    admins = draw(st.lists(st.sampled_from(members), min_size=1, unique=True))
    signer = draw(st.sampled_from(range(8)))
    version = draw(version_of)
    genesis = version == 0
    return GroupState(
        draw(ids),
        version,
        b"" if genesis else draw(st.binary(min_size=32, max_size=32)),
        draw(st.text(max_size=40)),
        tuple(PEERS[m] for m in members),
        tuple(PEERS[a] for a in admins),
        PEERS[signer],
        draw(st.integers(0, 2**63 - 1)),
        draw(ids) if genesis else b"",
    ).signed(IDENTITIES[signer])


KEY = GroupSenderKey.generate()
bodies = st.one_of(
    states(),
    st.builds(KeyDistribution, ids, versions, st.just(KEY.distribution_message())),
    st.builds(
        GroupMessage,
        ids,
        versions,
        ids,
        st.binary(min_size=1, max_size=300).map(KEY.encrypt),
    ),
    st.builds(GroupLeave, ids, versions),
)


@given(bodies)
def test_payloads_round_trip(
    body: GroupState | KeyDistribution | GroupMessage | GroupLeave,
) -> None:
    encoded = GroupPayload(body).encode()
    assert GroupPayload.decode(encoded).body == body
    if isinstance(body, GroupState):
        assert GroupState.decode(body.encode()).digest() == body.digest()


@given(ids, ids, st.text(max_size=200))
def test_texts_round_trip(group_id: bytes, message_id: bytes, text: str) -> None:
    value = GroupText(group_id, message_id, text)
    assert GroupText.decode(value.encode()) == value


def refused_or_valid(data: bytes) -> None:
    for decode in (GroupHeader.decode, GroupJoin.decode, GroupLeave.decode):
        with contextlib.suppress(InvalidGroupMessage):
            decode(data)
    with contextlib.suppress(InvalidGroupMessage):
        GroupPayload.decode(data)
    with contextlib.suppress(InvalidGroupMessage):
        GroupState.decode(data)
    with contextlib.suppress(InvalidGroupMessage):
        GroupText.decode(data)


@given(st.binary(max_size=512))
def test_garbage_raises_only_the_typed_error(data: bytes) -> None:
    refused_or_valid(data)
    refused_or_valid(encode_bytes_field(1, data))
    refused_or_valid(encode_bytes_field(2, data))
    refused_or_valid(encode_bytes_field(3, data))
    refused_or_valid(encode_bytes_field(4, data))


@settings(max_examples=50)
@given(bodies, st.data())
def test_truncated_or_flipped_payloads_are_refused(
    body: GroupState | KeyDistribution | GroupMessage | GroupLeave, data: st.DataObject
) -> None:
    encoded = GroupPayload(body).encode()
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(InvalidGroupMessage):
        GroupPayload.decode(encoded[:cut])
    if isinstance(body, GroupState):
        # Any single changed byte of a state breaks its form or its signature.
        raw = bytearray(body.encode())
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
        with pytest.raises(InvalidGroupMessage):
            GroupState.decode(bytes(raw))


@given(states())
def test_trailing_or_repeated_fields_break_canonical_form(state: GroupState) -> None:
    for extra in (encode_bytes_field(4, b"again"), b"\x00", encode_bytes_field(20, b"")):
        with pytest.raises(InvalidGroupMessage):
            GroupState.decode(state.encode() + extra)


def test_oversize_and_limits() -> None:
    with pytest.raises(InvalidGroupMessage):
        GroupPayload.decode(bytes(MAX_APP_DATA + 1))
    state = GroupState(
        b"\1" * 16, 0, b"", "n" * MAX_GROUP_NAME, (PEERS[0],), (PEERS[0],), PEERS[0], 0,
        b"\2" * 16,
    )  # fmt: skip
    assert GroupState.decode(state.signed(IDENTITIES[0]).encode()).name == "n" * MAX_GROUP_NAME
    with pytest.raises(InvalidGroupMessage):
        GroupState(
            b"\1" * 16, 0, b"", "n" * (MAX_GROUP_NAME + 1), (PEERS[0],), (PEERS[0],), PEERS[0],
            0, b"\2" * 16,
        )  # fmt: skip
    many = tuple(Identity.generate().peer_id for _ in range(MAX_MEMBERS + 1))
    with pytest.raises(InvalidGroupMessage):
        GroupState(b"\1" * 16, 1, b"\0" * 32, "", many, many[:1], many[0], 0)
    # The largest group fits one payload, every member an admin.
    full = GroupState(
        b"\1" * 16, 1, b"\0" * 32, "x" * MAX_GROUP_NAME, many[:-1], many[:-1], PEERS[0], 0
    ).signed(IDENTITIES[0])
    payload = GroupPayload(full).encode()
    assert len(payload) <= MAX_APP_DATA
    assert GroupPayload.decode(payload).body == full
    # Structure: an admin who is not a member, duplicates, a wrong signer.
    for members, admins in (((PEERS[0],), (PEERS[1],)), ((PEERS[0], PEERS[0]), (PEERS[0],))):
        with pytest.raises(InvalidGroupMessage):
            GroupState(b"\1" * 16, 1, b"\0" * 32, "", members, admins, PEERS[0], 0)
    unsigned = GroupState(
        b"\1" * 16, 1, b"\0" * 32, "", tuple(PEERS[:1]), tuple(PEERS[:1]), PEERS[0], 0
    )
    with pytest.raises(InvalidGroupMessage):
        unsigned.signed(IDENTITIES[1])
    with pytest.raises(InvalidGroupMessage):
        unsigned.encode()


def test_group_id_is_bound_to_its_creator() -> None:
    nonce = b"\7" * 16
    assert derive_group_id(PEERS[0], nonce) != derive_group_id(PEERS[1], nonce)
    assert len(derive_group_id(PEERS[0], nonce)) == 16


@st.composite
def headers_of(draw: st.DrawFn, group_id: bytes, count: int) -> tuple[GroupHeader, ...]:
    """Headers of versions 0 to ``count`` - 1 of a group (signed, not a valid chain: linking
    is `check_chain`'s business, not the decoder's)."""
    out = []
    for version in range(count):
        state = draw(states(st.just(version)))
        out.append(replace(state, group_id=group_id).signed(IDENTITIES[PEERS.index(state.signer)]))
    return tuple(s.header() for s in out)


@st.composite
def joins(draw: st.DrawFn, most: int = 3) -> GroupJoin:
    state = draw(states(st.integers(0, most)))
    return GroupJoin(state, draw(headers_of(state.group_id, state.version)))


@settings(max_examples=50)
@given(states(), st.data())
def test_a_header_keeps_its_states_hash_and_refuses_any_change(
    state: GroupState, data: st.DataObject
) -> None:
    header = state.header()
    assert header.digest() == state.digest()
    assert GroupHeader.decode(header.encode()) == header
    assert header.verify()
    raw = bytearray(header.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(InvalidGroupMessage):
        GroupHeader.decode(bytes(raw))
    with pytest.raises(InvalidGroupMessage):
        GroupHeader.decode(header.encode()[: data.draw(st.integers(0, len(raw) - 1))])
    with pytest.raises(InvalidGroupMessage):
        GroupHeader.decode(header.encode() + encode_bytes_field(4, bytes(32)))


@settings(max_examples=30)
@given(joins(), st.data())
def test_joins_round_trip_and_refuse_a_missing_header(join: GroupJoin, data: st.DataObject) -> None:
    payload = GroupPayload(join).encode()
    assert GroupPayload.decode(payload).body == join
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(InvalidGroupMessage):
        GroupPayload.decode(payload[:cut])
    if join.headers:
        # Headers out of place: not the versions they claim to be, or past the state.
        shifted = GroupJoin(join.state, join.headers[1:])
        with pytest.raises(InvalidGroupMessage, match=r"in order|before its state"):
            GroupJoin.decode(shifted.encode())
        if len(join.headers) > 1:
            swapped = GroupJoin(join.state, (join.headers[1], join.headers[0], *join.headers[2:]))
            with pytest.raises(InvalidGroupMessage, match="in order"):
                GroupJoin.decode(swapped.encode())
        late = GroupJoin(join.state, join.headers, first=1)
        with pytest.raises(InvalidGroupMessage, match="before its state"):
            GroupJoin.decode(late.encode())
        # A first page (version 0 on) is a join too, but not a complete one; a later version
        # with no header at all is not a join.
        first_page = GroupJoin(join.state, join.headers[:-1]).encode()
        if len(join.headers) > 1:
            assert not GroupJoin.decode(first_page).complete
        else:
            with pytest.raises(InvalidGroupMessage, match="before its state"):
                GroupJoin.decode(first_page)
        # The first version is left out when 0; written out, it breaks canonical form.
        with pytest.raises(InvalidGroupMessage, match="left out"):
            GroupJoin.decode(join.encode() + encode_varint_field(3, 0))
    elif join.state.version == 0:
        assert join.complete
    # Headers before the state, or a second state: not a join.
    with pytest.raises(InvalidGroupMessage):
        GroupJoin.decode(encode_bytes_field(2, join.state.header().encode()) + join.encode())
    with pytest.raises(InvalidGroupMessage):
        GroupJoin.decode(join.encode() + encode_bytes_field(1, join.state.encode()))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_a_long_chain_is_cut_into_pages_that_each_fit(data: st.DataObject) -> None:
    state = data.draw(states(st.integers(1, 40)))
    headers = data.draw(headers_of(state.group_id, state.version))
    limit = data.draw(st.integers(len(state.encode()) + 600, 16_000))
    pages = GroupJoin.paged(state, headers, limit)
    assert all(len(GroupPayload(p).encode()) <= limit for p in pages)
    assert [h for p in pages for h in p.headers] == list(headers)
    assert [p.first for p in pages] == [
        sum(len(q.headers) for q in pages[:i]) for i in range(len(pages))
    ]
    for page in pages:
        assert GroupPayload.decode(GroupPayload(page).encode()).body == page
    assert (len(pages) == 1) == pages[0].complete
    whole = GroupPayload(GroupJoin(state, headers)).encode()
    assert (len(pages) == 1) == (len(whole) <= limit)


def test_a_state_that_leaves_no_room_for_a_header_cannot_be_paged() -> None:
    state = GroupState(
        bytes(16), 0, b"", "g", (PEERS[0],), (PEERS[0],), PEERS[0], 1, bytes(16)
    ).signed(IDENTITIES[0])
    later = replace(state, version=1, prev_hash=state.digest(), nonce=b"").signed(IDENTITIES[0])
    with pytest.raises(InvalidGroupMessage, match="does not fit"):
        GroupJoin.paged(later, [state.header()], len(later.encode()) + 20)


def test_a_leave_is_canonical() -> None:
    leave = GroupLeave(bytes(16), 0)
    assert leave.encode() == encode_bytes_field(1, bytes(16))
    with pytest.raises(InvalidGroupMessage, match="canonical"):
        GroupLeave.decode(leave.encode() + encode_varint_field(2, 0))
    with pytest.raises(InvalidGroupMessage):
        GroupLeave.decode(encode_varint_field(2, 3))
    with pytest.raises(InvalidGroupMessage):
        GroupLeave.decode(encode_bytes_field(1, bytes(15)))
