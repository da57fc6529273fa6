"""Sender keys for groups (``GroupSenderKey`` / ``GroupReceiverKey``) through the Python API.

Conversations among several members with shuffled delivery, late joiners, replays, forgeries,
every single-bit corruption and every truncation of a message (each must raise a typed error
and leave the receiver's state byte-for-byte unchanged), size limits, serialisation in the middle
of a conversation, and hypothesis on every parser with arbitrary bytes.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia import errors
from teia._native import GroupReceiverKey, GroupSenderKey

HEADER_LEN = 9
SIGNATURE_LEN = 64
MAX_PLAINTEXT_LEN = 1 << 20
MAX_MESSAGE_LEN = HEADER_LEN + (MAX_PLAINTEXT_LEN // 16 + 1) * 16 + 32 + SIGNATURE_LEN


class Member:
    """One group member: its own sending chain and a receiving chain per other member."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sender = GroupSenderKey.generate()
        self.receivers: dict[str, GroupReceiverKey] = {}

    def welcome(self, other: Member) -> None:
        """Receive ``other``'s distribution message (in real use: over a pairwise session)."""
        self.receivers[other.name] = GroupReceiverKey.from_distribution_message(
            other.sender.distribution_message()
        )

    def decrypt(self, sender_name: str, message: bytes) -> bytes:
        return self.receivers[sender_name].decrypt(message)


def group(*names: str) -> list[Member]:
    members = [Member(n) for n in names]
    for m in members:
        for other in members:
            if other is not m:
                m.welcome(other)
    return members


def pair(chain_id: int | None = None) -> tuple[GroupSenderKey, GroupReceiverKey]:
    sender = GroupSenderKey.generate(chain_id)
    return sender, GroupReceiverKey.from_distribution_message(sender.distribution_message())


# --- conversations ---------------------------------------------------------------------------


def test_three_member_group() -> None:
    alice, bob, carol = group("alice", "bob", "carol")
    for speaker in (alice, bob, carol, alice, carol):
        text = f"hello from {speaker.name}".encode()
        message = speaker.sender.encrypt(text)
        for listener in (alice, bob, carol):
            if listener is not speaker:
                assert listener.decrypt(speaker.name, message) == text
    assert alice.sender.iteration == 2
    assert bob.receivers["alice"].signing_public_key == alice.sender.signing_public_key
    assert bob.receivers["alice"].chain_id == alice.sender.chain_id


def test_shuffled_delivery() -> None:
    alice, bob, carol = group("alice", "bob", "carol")
    sent = [
        (s, i, s.sender.encrypt(f"{s.name} {i}".encode())) for i in range(20) for s in (alice, bob)
    ]
    for listener in (bob, carol):
        deliveries = [m for m in sent if m[0] is not listener]
        random.Random(listener.name).shuffle(deliveries)
        for speaker, i, message in deliveries:
            assert listener.decrypt(speaker.name, message) == f"{speaker.name} {i}".encode()


def test_late_joiner_cannot_read_earlier_messages() -> None:
    alice, bob = group("alice", "bob")
    early = [alice.sender.encrypt(b"before dave") for _ in range(3)]
    dave = Member("dave")
    dave.welcome(alice)
    for message in early:
        assert bob.decrypt("alice", message) == b"before dave"
        with pytest.raises(errors.DuplicateMessage):
            dave.decrypt("alice", message)
    later = alice.sender.encrypt(b"welcome dave")
    assert dave.decrypt("alice", later) == b"welcome dave"
    assert bob.decrypt("alice", later) == b"welcome dave"


def test_distribution_message_format() -> None:
    sender = GroupSenderKey.generate(0x01020304)
    sender.encrypt(b"one")
    sender.encrypt(b"two")
    dm = sender.distribution_message()
    assert len(dm) == 73
    assert dm[:HEADER_LEN] == bytes([1, 1, 2, 3, 4, 0, 0, 0, 2])
    assert dm[-32:] == sender.signing_public_key
    assert sender.chain_id == 0x01020304
    assert sender.iteration == 2


def test_random_chain_ids_differ() -> None:
    assert len({GroupSenderKey.generate().chain_id for _ in range(16)}) > 1


def test_replay_is_duplicate() -> None:
    sender, receiver = pair()
    first = sender.encrypt(b"once")
    second = sender.encrypt(b"twice?")
    assert receiver.decrypt(second) == b"twice?"
    assert receiver.decrypt(first) == b"once"
    for message in (first, second):
        before = receiver.to_bytes()
        with pytest.raises(errors.DuplicateMessage):
            receiver.decrypt(message)
        assert receiver.to_bytes() == before


def test_forged_signature() -> None:
    sender, receiver = pair()
    message = bytearray(sender.encrypt(b"hi"))
    message[-1] ^= 0x40
    with pytest.raises(errors.InvalidSignature):
        receiver.decrypt(bytes(message))
    # A member sending under another member's chain id with its own signing key.
    impostor = GroupSenderKey.generate(sender.chain_id)
    before = receiver.to_bytes()
    with pytest.raises(errors.InvalidSignature):
        receiver.decrypt(impostor.encrypt(b"I am alice"))
    assert receiver.to_bytes() == before


def test_message_for_another_chain() -> None:
    _, receiver = pair(chain_id=1)
    other = GroupSenderKey.generate(2)
    with pytest.raises(errors.InvalidMessage):
        receiver.decrypt(other.encrypt(b"not yours"))


def test_too_many_skipped() -> None:
    sender, receiver = pair()
    messages = [sender.encrypt(b"x") for _ in range(1002)]
    before = receiver.to_bytes()
    with pytest.raises(errors.TooManySkippedMessages):
        receiver.decrypt(messages[1001])
    assert receiver.to_bytes() == before
    assert receiver.decrypt(messages[1000]) == b"x"
    assert receiver.decrypt(messages[1001]) == b"x"
    assert receiver.decrypt(messages[0]) == b"x"


# --- corruption: typed error, state unchanged ------------------------------------------------


@pytest.fixture
def mid_conversation() -> tuple[GroupSenderKey, GroupReceiverKey, bytes]:
    """A receiver with a stored skipped key, and the next message it has not seen."""
    sender, receiver = pair()
    assert receiver.decrypt(sender.encrypt(b"first")) == b"first"
    sender.encrypt(b"skipped")
    assert receiver.decrypt(sender.encrypt(b"third")) == b"third"
    return sender, receiver, sender.encrypt(b"the payload under test")


def test_every_bit_flip(mid_conversation: tuple[GroupSenderKey, GroupReceiverKey, bytes]) -> None:
    _, receiver, message = mid_conversation
    before = receiver.to_bytes()
    for position in range(len(message)):
        for bit in range(8):
            corrupted = bytearray(message)
            corrupted[position] ^= 1 << bit
            with pytest.raises((errors.InvalidMessage, errors.InvalidSignature)):
                receiver.decrypt(bytes(corrupted))
            assert receiver.to_bytes() == before, (position, bit)
    assert receiver.decrypt(message) == b"the payload under test"


def test_every_truncation(mid_conversation: tuple[GroupSenderKey, GroupReceiverKey, bytes]) -> None:
    _, receiver, message = mid_conversation
    before = receiver.to_bytes()
    for length in range(len(message)):
        with pytest.raises((errors.InvalidMessage, errors.InvalidSignature)):
            receiver.decrypt(message[:length])
        assert receiver.to_bytes() == before, length
    with pytest.raises((errors.InvalidMessage, errors.InvalidSignature)):
        receiver.decrypt(message + b"\x00")
    assert receiver.to_bytes() == before
    assert receiver.decrypt(message) == b"the payload under test"


def test_size_limits() -> None:
    sender, receiver = pair()
    largest = bytes(MAX_PLAINTEXT_LEN)
    message = sender.encrypt(largest)
    assert len(message) == MAX_MESSAGE_LEN
    assert receiver.decrypt(message) == largest

    iteration = sender.iteration
    with pytest.raises(errors.InvalidMessage):
        sender.encrypt(bytes(MAX_PLAINTEXT_LEN + 1))
    assert sender.iteration == iteration

    before = receiver.to_bytes()
    with pytest.raises(errors.InvalidMessage):
        receiver.decrypt(message[:HEADER_LEN] + bytes(MAX_MESSAGE_LEN))
    assert receiver.to_bytes() == before


# --- serialisation ----------------------------------------------------------------------------


def test_serialise_mid_conversation() -> None:
    sender, receiver = pair()
    messages = [sender.encrypt(bytes([i])) for i in range(8)]
    assert receiver.decrypt(messages[5]) == bytes([5])
    assert receiver.decrypt(messages[2]) == bytes([2])

    sender = GroupSenderKey.from_bytes(sender.to_bytes())
    receiver = GroupReceiverKey.from_bytes(receiver.to_bytes())
    assert GroupReceiverKey.from_bytes(receiver.to_bytes()).to_bytes() == receiver.to_bytes()
    assert GroupSenderKey.from_bytes(sender.to_bytes()).to_bytes() == sender.to_bytes()

    for i in (7, 0, 4, 1, 6, 3):
        assert receiver.decrypt(messages[i]) == bytes([i])
    with pytest.raises(errors.DuplicateMessage):
        receiver.decrypt(messages[2])
    assert receiver.decrypt(sender.encrypt(b"after restore")) == b"after restore"


def test_state_kinds_do_not_mix() -> None:
    sender, receiver = pair()
    with pytest.raises(errors.InvalidSessionState):
        GroupReceiverKey.from_bytes(sender.to_bytes())
    with pytest.raises(errors.InvalidSessionState):
        GroupSenderKey.from_bytes(receiver.to_bytes())
    with pytest.raises(errors.InvalidMessage):
        GroupReceiverKey.from_distribution_message(sender.to_bytes())


def test_distribution_message_strict() -> None:
    dm = GroupSenderKey.generate().distribution_message()
    for length in range(len(dm)):
        with pytest.raises(errors.InvalidMessage):
            GroupReceiverKey.from_distribution_message(dm[:length])
    with pytest.raises(errors.InvalidMessage):
        GroupReceiverKey.from_distribution_message(dm + b"\x00")
    with pytest.raises(errors.InvalidMessage):
        GroupReceiverKey.from_distribution_message(b"\x02" + dm[1:])


# --- arbitrary input: only teia.errors, never a crash ------------------------------------------


@given(st.binary(max_size=200) | st.binary(min_size=73, max_size=73))
def test_from_distribution_message_arbitrary(data: bytes) -> None:
    try:
        key = GroupReceiverKey.from_distribution_message(data)
    except (errors.InvalidMessage, errors.InvalidKey):
        return
    assert data[0] == 1
    assert key.chain_id == int.from_bytes(data[1:5])
    assert key.signing_public_key == data[-32:]


@given(
    st.binary(max_size=400) | st.binary(min_size=74, max_size=74).map(lambda b: b"\x01S" + b[2:])
)
def test_sender_from_bytes_arbitrary(data: bytes) -> None:
    try:
        key = GroupSenderKey.from_bytes(data)
    except errors.InvalidSessionState:
        return
    assert key.to_bytes() == data


@given(
    st.binary(max_size=400) | st.binary(min_size=76, max_size=400).map(lambda b: b"\x01R" + b[2:])
)
def test_receiver_from_bytes_arbitrary(data: bytes) -> None:
    try:
        key = GroupReceiverKey.from_bytes(data)
    except errors.InvalidSessionState:
        return
    assert key.to_bytes() == data


def _conversation_state() -> tuple[list[bytes], bytes]:
    """Four messages, and the state of a receiver that has decrypted the third."""
    sender, receiver = pair()
    messages = [sender.encrypt(b"m%d" % i) for i in range(4)]
    receiver.decrypt(messages[2])
    return messages, receiver.to_bytes()


_MESSAGES, _STATE = _conversation_state()


def _edit(message: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(message)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


@given(
    st.binary(max_size=300)
    | st.builds(
        _edit,
        st.sampled_from(_MESSAGES),
        st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=4),
    )
)
def test_decrypt_arbitrary(data: bytes) -> None:
    receiver = GroupReceiverKey.from_bytes(_STATE)
    try:
        receiver.decrypt(data)
    except errors.CryptoError:
        assert receiver.to_bytes() == _STATE
    else:
        # Only an unseen message, unchanged by the edits, decrypts.
        assert data in _MESSAGES
        assert data != _MESSAGES[2]
