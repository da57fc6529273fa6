"""Pairwise sessions (``Session``) and the low-level ``RatchetState`` through the Python API.

Long conversations, bursts delivered shuffled, dropped messages, replays, every truncation and
every single-bit corruption of a message, oversize and foreign messages (each must raise a typed
error and leave the state byte-for-byte unchanged), serialisation in the middle of a
conversation, the skip limits, and hypothesis on every parser and on ``decrypt`` with arbitrary
bytes (only ``teia.errors`` exceptions, never a crash).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia import _native as native
from teia import errors
from teia.crypto import (
    OneTimePrekey,
    PrekeyBundle,
    RatchetState,
    Session,
    SignedPrekey,
    is_prekey_message,
    parse_prekey_message,
)
from teia.identity import Identity

HEADER_LEN = 40
TAG_LEN = 32
MAX_SKIP = 1000
MAX_STORED_SKIPPED = 2000
MAX_PLAINTEXT_LEN = 1 << 20


class Responder:
    """A published identity with its signed and one-time prekeys."""

    def __init__(self, seed: bytes = b"\xb0" * 32) -> None:
        self.seed = seed
        self.identity = Identity.from_seed(seed)
        self.spk = SignedPrekey.generate(seed, 11)
        self.opks = {i: OneTimePrekey.generate(i) for i in range(100, 105)}

    def bundle(self, opk_id: int | None = 100) -> PrekeyBundle:
        opk = self.opks[opk_id] if opk_id is not None else None
        return PrekeyBundle(
            self.identity.public_key,
            self.spk.id,
            self.spk.public_key,
            self.spk.signature,
            opk_id,
            opk.public_key if opk else None,
        )

    def accept(self, message: bytes) -> tuple[Session, bytes]:
        """Find the keys a prekey message names, as a real responder would."""
        info = parse_prekey_message(message)
        assert info.signed_prekey_id == self.spk.id
        opk = self.opks[info.one_time_prekey_id] if info.one_time_prekey_id is not None else None
        return Session.accept(self.seed, self.spk, opk, message)


ALICE = b"\xa0" * 32


def established(with_opk: bool = True) -> tuple[Session, Session]:
    """A session pair where both sides have sent and received."""
    bob = Responder()
    alice = Session.initiate(ALICE, bob.bundle(100 if with_opk else None))
    b, first = bob.accept(alice.encrypt(b"hello"))
    assert first == b"hello"
    assert alice.decrypt(b.encrypt(b"hi")) == b"hi"
    return alice, b


def refused(session: Session | RatchetState, message: bytes) -> errors.CryptoError:
    """``decrypt`` must raise a teia error and leave the state exactly as it was."""
    before = session.to_bytes()
    with pytest.raises(errors.CryptoError) as caught:
        session.decrypt(message)
    assert session.to_bytes() == before
    return caught.value


def corruptions(message: bytes) -> Iterator[bytes]:
    """Every truncation and every single-bit flip of ``message``."""
    for cut in range(len(message)):
        yield message[:cut]
    for i in range(len(message)):
        for bit in range(8):
            yield message[:i] + bytes([message[i] ^ (1 << bit)]) + message[i + 1 :]


# --- starting sessions -----------------------------------------------------------------------


@pytest.mark.parametrize("with_opk", [False, True])
def test_initiate_accept_and_answer(with_opk: bool) -> None:
    bob = Responder()
    alice = Session.initiate(ALICE, bob.bundle(100 if with_opk else None))
    first, second = alice.encrypt(b"hello"), alice.encrypt(b"again")
    for m in (first, second):
        assert is_prekey_message(m)
        info = parse_prekey_message(m)
        assert info.identity_key == Identity.from_seed(ALICE).public_key
        assert info.signed_prekey_id == 11
        assert info.one_time_prekey_id == (100 if with_opk else None)
        assert len(info.base_key) == 32
    b, plaintext = bob.accept(first)
    assert plaintext == b"hello"
    assert b.local_identity_key == alice.remote_identity_key == bob.identity.public_key
    assert b.remote_identity_key == alice.local_identity_key
    # Later prekey messages of the same session decrypt in the session.
    assert b.decrypt(second) == b"again"
    reply = b.encrypt(b"hi")
    assert not is_prekey_message(reply)
    assert reply[:2] == b"\x01\x01"
    # Until the initiator has heard back, it keeps sending prekey messages.
    assert is_prekey_message(alice.encrypt(b"still waiting"))
    assert alice.decrypt(reply) == b"hi"
    after = alice.encrypt(b"heard you")
    assert not is_prekey_message(after)
    assert b.decrypt(after) == b"heard you"


def test_prekey_message_layout() -> None:
    bob = Responder()
    alice = Session.initiate(ALICE, bob.bundle(102))
    m = alice.encrypt(b"x")
    assert m[:2] == b"\x01\x02"
    assert m[2:34] == Identity.from_seed(ALICE).public_key
    assert m[66:70] == (11).to_bytes(4, "big")
    assert m[70] == 1
    assert m[71:75] == (102).to_bytes(4, "big")
    assert len(m) == 75 + HEADER_LEN + 16 + TAG_LEN
    without = Session.initiate(ALICE, bob.bundle(None)).encrypt(b"x")
    assert without[70] == 0
    assert len(without) == 71 + HEADER_LEN + 16 + TAG_LEN


def test_initiate_refuses_a_forged_bundle() -> None:
    bob = Responder()
    good = bob.bundle()
    forged = PrekeyBundle(
        good.identity_key,
        good.signed_prekey_id,
        good.signed_prekey,
        bytes([good.signed_prekey_signature[0] ^ 0x40]) + good.signed_prekey_signature[1:],
    )
    with pytest.raises(errors.InvalidSignature):
        Session.initiate(ALICE, forged)
    mallory = SignedPrekey.generate(b"\x66" * 32, 11)
    swapped = PrekeyBundle(good.identity_key, 11, mallory.public_key, mallory.signature)
    with pytest.raises(errors.InvalidSignature):
        Session.initiate(ALICE, swapped)


def test_accept_checks_the_keys_handed_in() -> None:
    bob = Responder()
    alice = Session.initiate(ALICE, bob.bundle(100))
    m = alice.encrypt(b"hello")
    other_spk = SignedPrekey.generate(bob.seed, 12)
    with pytest.raises(errors.InvalidKey):
        Session.accept(bob.seed, other_spk, bob.opks[100], m)
    with pytest.raises(errors.InvalidKey):
        Session.accept(bob.seed, bob.spk, None, m)
    with pytest.raises(errors.InvalidKey):
        Session.accept(bob.seed, bob.spk, bob.opks[101], m)
    # Right id, wrong private key; or the wrong identity: authentication fails.
    with pytest.raises(errors.DecryptionError):
        Session.accept(bob.seed, bob.spk, OneTimePrekey.generate(100), m)
    with pytest.raises(errors.DecryptionError):
        Session.accept(b"\x77" * 32, bob.spk, bob.opks[100], m)
    no_opk = Session.initiate(ALICE, bob.bundle(None)).encrypt(b"x")
    with pytest.raises(errors.InvalidKey):
        Session.accept(bob.seed, bob.spk, bob.opks[100], no_opk)
    # A normal message is not a prekey message.
    a, _ = established()
    with pytest.raises(errors.InvalidMessage):
        Session.accept(bob.seed, bob.spk, None, a.encrypt(b"normal"))
    for cut in range(len(m)):
        with pytest.raises(errors.CryptoError):
            Session.accept(bob.seed, bob.spk, bob.opks[100], m[:cut])
    assert Session.accept(bob.seed, bob.spk, bob.opks[100], m)[1] == b"hello"


def test_a_new_session_from_the_same_peer_is_accepted_beside_the_old() -> None:
    bob = Responder()
    _, b = established()
    restarted = Session.initiate(ALICE, bob.bundle(101))
    fresh = restarted.encrypt(b"I lost my state")
    # The old session refuses it as another session's message; the responder accepts it.
    assert isinstance(refused(b, fresh), errors.InvalidMessage)
    b2, plaintext = bob.accept(fresh)
    assert plaintext == b"I lost my state"
    assert restarted.decrypt(b2.encrypt(b"welcome back")) == b"welcome back"


# --- conversations ---------------------------------------------------------------------------


def test_long_ping_pong_with_restores() -> None:
    rng = random.Random(1)
    alice, bob = established()
    sides = [alice, bob]
    for turn in range(200):
        sender = turn % 2
        for i in range(rng.randint(1, 3)):
            text = f"turn {turn} message {i}".encode() * rng.randint(0, 5)
            assert sides[1 - sender].decrypt(sides[sender].encrypt(text)) == text
        if turn % 37 == 0:
            sides = [Session.from_bytes(s.to_bytes()) for s in sides]


def test_bursts_delivered_shuffled() -> None:
    rng = random.Random(2)
    alice, bob = established()
    for _ in range(20):
        in_flight: list[tuple[Session, bytes, bytes]] = []
        for sender, receiver in ((alice, bob), (bob, alice)):
            for i in range(rng.randint(0, 8)):
                text = rng.randbytes(rng.randint(0, 64)) + bytes([i])
                in_flight.append((receiver, sender.encrypt(text), text))
        rng.shuffle(in_flight)
        for receiver, message, text in in_flight:
            assert receiver.decrypt(message) == text


def test_dropped_messages_do_not_stop_the_conversation() -> None:
    rng = random.Random(3)
    alice, bob = established()
    late: list[tuple[Session, bytes, bytes]] = []
    for turn in range(30):
        sender, receiver = (alice, bob) if turn % 2 == 0 else (bob, alice)
        for i in range(5):
            text = f"{turn}/{i}".encode()
            message = sender.encrypt(text)
            if rng.random() < 0.3:
                late.append((receiver, message, text))  # dropped, maybe delivered much later
            else:
                assert receiver.decrypt(message) == text
    rng.shuffle(late)
    for receiver, message, text in late[: len(late) // 2]:
        assert receiver.decrypt(message) == text


def test_replays_are_duplicates() -> None:
    alice, bob = established()
    old = alice.encrypt(b"old chain")
    assert bob.decrypt(old) == b"old chain"
    assert isinstance(refused(bob, old), errors.DuplicateMessage)
    reply = bob.encrypt(b"new chain for alice")
    assert alice.decrypt(reply) == b"new chain for alice"
    assert isinstance(refused(alice, reply), errors.DuplicateMessage)
    newer = alice.encrypt(b"next chain")
    skipped = alice.encrypt(b"skipped")
    assert bob.decrypt(alice.encrypt(b"last")) == b"last"
    assert bob.decrypt(skipped) == b"skipped"
    assert bob.decrypt(newer) == b"next chain"
    # Replays from the current chain and from an earlier one.
    for m in (old, newer, skipped):
        assert isinstance(refused(bob, m), errors.DuplicateMessage)


# --- bad input ---------------------------------------------------------------------------------


def test_every_truncation_and_bit_flip_is_refused_without_change() -> None:
    alice, bob = established()
    normal = alice.encrypt(b"a normal message spanning two blocks")
    reply = bob.encrypt(b"r")
    for receiver, message in ((bob, normal), (alice, reply)):
        for bad in corruptions(message):
            refused(receiver, bad)
        assert receiver.decrypt(message)


def test_every_corruption_of_a_later_prekey_message_is_refused() -> None:
    bob = Responder()
    alice = Session.initiate(ALICE, bob.bundle(103))
    b, _ = bob.accept(alice.encrypt(b"first"))
    second = alice.encrypt(b"second")
    for bad in corruptions(second):
        refused(b, bad)
    assert b.decrypt(second) == b"second"


def test_oversize_and_foreign_messages() -> None:
    alice, bob = established()
    big = alice.encrypt(b"\x00" * MAX_PLAINTEXT_LEN)
    assert bob.decrypt(big) == b"\x00" * MAX_PLAINTEXT_LEN
    with pytest.raises(errors.InvalidMessage):
        alice.encrypt(b"\x00" * (MAX_PLAINTEXT_LEN + 1))
    assert isinstance(refused(bob, big + b"\x00" * 16), errors.InvalidMessage)
    assert isinstance(refused(bob, b"\x01\x01" + b"\x00" * (2 << 20)), errors.InvalidMessage)
    other_alice, _ = established()
    foreign = other_alice.encrypt(b"not for you")
    assert isinstance(refused(bob, foreign), errors.DecryptionError)
    for frame in (b"", b"\x01", b"\x02\x01", b"\x01\x03" + foreign[2:], b"\x01\x02"):
        assert isinstance(refused(bob, frame), errors.InvalidMessage)


@given(data=st.binary(max_size=400))
def test_session_decrypt_on_arbitrary_bytes(data: bytes) -> None:
    alice, bob = SESSION_PAIR
    for side in (alice, bob):
        refused(side, data)
        refused(side, b"\x01\x01" + data)
        refused(side, b"\x01\x02" + data)


@given(data=st.data())
def test_session_decrypt_on_mutated_messages(data: st.DataObject) -> None:
    alice, bob = SESSION_PAIR
    plaintext = data.draw(st.binary(max_size=64))
    message = alice.encrypt(plaintext)
    position = data.draw(st.integers(0, len(message) - 1))
    forged = bytearray(message)
    forged[position] ^= data.draw(st.integers(1, 255))
    extra = data.draw(st.binary(max_size=8))
    refused(bob, bytes(forged))
    if extra:
        refused(bob, message + extra)
    assert bob.decrypt(message) == plaintext


SESSION_PAIR = established()


# --- serialisation ---------------------------------------------------------------------------


def test_serialise_mid_conversation_with_messages_in_flight() -> None:
    alice, bob = established()
    in_flight = [alice.encrypt(f"{i}".encode()) for i in range(5)]
    assert bob.decrypt(in_flight[4]) == b"4"
    alice2 = Session.from_bytes(alice.to_bytes())
    bob2 = Session.from_bytes(bob.to_bytes())
    assert bob2.to_bytes() == bob.to_bytes()
    assert alice2.remote_identity_key == alice.remote_identity_key
    for i in (2, 0, 3, 1):
        assert bob2.decrypt(in_flight[i]) == f"{i}".encode()
    assert alice2.decrypt(bob2.encrypt(b"back")) == b"back"
    # The restored initiator of a fresh session still sends prekey messages.
    fresh = Session.initiate(ALICE, Responder().bundle())
    assert is_prekey_message(Session.from_bytes(fresh.to_bytes()).encrypt(b"x"))


def test_copy_is_an_independent_session_equal_to_the_original() -> None:
    alice, bob = established()
    in_flight = [alice.encrypt(f"{i}".encode()) for i in range(3)]
    working = copy.copy(bob)
    assert working.to_bytes() == bob.to_bytes()
    assert working.decrypt(in_flight[2]) == b"2"  # the copy moves on (keys 0, 1 skipped) ...
    assert working.to_bytes() != bob.to_bytes()
    assert bob.decrypt(in_flight[0]) == b"0"  # ... the original does not
    with pytest.raises(errors.CryptoError):
        working.decrypt(in_flight[2])  # a message key is used once, in each copy
    assert bob.copy().decrypt(in_flight[1]) == b"1"
    assert alice.decrypt(working.encrypt(b"back")) == b"back"


def test_session_state_garbage_is_invalid_session_state() -> None:
    alice, bob = established()
    bob.decrypt(alice.encrypt(b"x"))
    for data in (alice.to_bytes(), bob.to_bytes()):
        for cut in range(len(data)):
            with pytest.raises(errors.InvalidSessionState):
                Session.from_bytes(data[:cut])
        with pytest.raises(errors.InvalidSessionState):
            Session.from_bytes(data + b"\x00")
        with pytest.raises(errors.InvalidSessionState):
            Session.from_bytes(b"\x02" + data[1:])
        with pytest.raises(errors.InvalidSessionState):
            Session.from_bytes(data[:1] + bytes([data[1] ^ 1]) + data[2:])


@given(data=st.binary(max_size=600))
def test_state_parsers_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (Session.from_bytes, RatchetState.from_bytes):
        with contextlib.suppress(errors.InvalidSessionState):
            parse(data)


@given(data=st.data())
def test_state_parsers_on_mutated_states(data: st.DataObject) -> None:
    alice, bob = SESSION_PAIR
    encoded = bytearray(data.draw(st.sampled_from([alice.to_bytes(), bob.to_bytes()])))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    try:
        restored = Session.from_bytes(bytes(encoded))
    except errors.InvalidSessionState:
        return
    # A state that still parses must never crash when used.
    with contextlib.suppress(errors.CryptoError):
        restored.encrypt(b"x")
    with contextlib.suppress(errors.CryptoError):
        restored.decrypt(b"\x01\x01" + b"\x00" * 88)


@given(data=st.binary(max_size=300))
def test_prekey_message_parser_on_arbitrary_bytes(data: bytes) -> None:
    for candidate in (data, b"\x01\x02" + data):
        assert is_prekey_message(candidate) == (candidate[:2] == b"\x01\x02")
        try:
            info = parse_prekey_message(candidate)
        except errors.InvalidMessage:
            continue
        assert is_prekey_message(candidate)
        assert len(info.identity_key) == len(info.base_key) == 32


# --- the low-level ratchet -------------------------------------------------------------------


def ratchet_pair() -> tuple[RatchetState, RatchetState]:
    bob_private, bob_public = native.x25519_keypair()
    sk, ad = b"\x5a" * 32, b"\xad" * 64
    return (
        RatchetState.init_initiator(sk, ad, bob_public),
        RatchetState.init_responder(sk, ad, bob_private),
    )


def test_ratchet_header_and_properties() -> None:
    alice, bob = ratchet_pair()
    m = alice.encrypt(b"x" * 20)
    assert len(m) == HEADER_LEN + 32 + TAG_LEN
    assert m[:32] == alice.ratchet_public_key
    assert m[32:40] == b"\x00" * 8
    assert bob.decrypt(m) == b"x" * 20
    assert alice.associated_data == bob.associated_data == b"\xad" * 64
    with pytest.raises(errors.CryptoError):
        RatchetState.init_responder(b"\x00" * 32, b"", b"\x01" * 32).encrypt(b"responder first")


def test_ratchet_skip_limit_and_eviction() -> None:
    alice, bob = ratchet_pair()
    messages = [alice.encrypt(i.to_bytes(2, "big")) for i in range(MAX_SKIP + 2)]
    assert isinstance(refused(bob, messages[MAX_SKIP + 1]), errors.TooManySkippedMessages)
    assert bob.decrypt(messages[MAX_SKIP]) == MAX_SKIP.to_bytes(2, "big")
    assert bob.skipped_message_keys == MAX_SKIP
    assert alice.decrypt(bob.encrypt(b"ack")) == b"ack"
    second = [alice.encrypt(i.to_bytes(2, "big")) for i in range(MAX_SKIP + 1)]
    assert bob.decrypt(second[MAX_SKIP]) == MAX_SKIP.to_bytes(2, "big")
    # Message 1001 of the first chain was never decrypted: 1000 + 1 + 1000 were due, 2000 kept.
    assert bob.skipped_message_keys == MAX_STORED_SKIPPED
    assert isinstance(refused(bob, messages[0]), errors.DuplicateMessage)
    assert bob.decrypt(messages[MAX_SKIP + 1]) == (MAX_SKIP + 1).to_bytes(2, "big")
    assert bob.decrypt(second[0]) == b"\x00\x00"
    assert bob.skipped_message_keys == MAX_STORED_SKIPPED - 2
    restored = RatchetState.from_bytes(bob.to_bytes())
    assert restored.skipped_message_keys == MAX_STORED_SKIPPED - 2
    assert restored.decrypt(second[1]) == b"\x00\x01"


def test_ratchet_corruptions_and_garbage() -> None:
    alice, bob = ratchet_pair()
    assert bob.decrypt(alice.encrypt(b"open")) == b"open"
    m = alice.encrypt(b"payload")
    for bad in corruptions(m):
        refused(bob, bad)
    assert bob.decrypt(m) == b"payload"
    data = bob.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(errors.InvalidSessionState):
            RatchetState.from_bytes(data[:cut])
    with pytest.raises(errors.InvalidSessionState):
        RatchetState.from_bytes(data + b"\x00")


@given(data=st.binary(max_size=200))
def test_ratchet_decrypt_on_arbitrary_bytes(data: bytes) -> None:
    alice, bob = RATCHET_PAIR
    for side in (alice, bob):
        refused(side, data)
        refused(side, side.ratchet_public_key + data)


RATCHET_PAIR = ratchet_pair()
RATCHET_PAIR[1].decrypt(RATCHET_PAIR[0].encrypt(b"start"))


ACCEPTOR = Responder(b"\xbb" * 32)


@given(data=st.binary(max_size=300), with_opk=st.booleans())
def test_accept_on_arbitrary_bytes(data: bytes, with_opk: bool) -> None:
    opk = ACCEPTOR.opks[100] if with_opk else None
    for candidate in (data, b"\x01\x02" + data):
        with pytest.raises(errors.CryptoError):
            Session.accept(ACCEPTOR.seed, ACCEPTOR.spk, opk, candidate)
