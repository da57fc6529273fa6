"""Owner signatures: the right owner passes once; forged, foreign, stale and replayed fail."""

from __future__ import annotations

import dataclasses
import os

import pytest

from teia.errors import StoreAuthError, StoreRequestRefused
from teia.identity import Identity
from teia.store.auth import OwnerAuthVerifier, inbox_for, sign_request
from teia.store.messages import AckRequest, FetchRequest, Status

NOW = 1_800_000_000_000


def test_owner_passes_once_and_replay_is_refused() -> None:
    owner = Identity.generate()
    verifier = OwnerAuthVerifier()
    request = sign_request(owner, FetchRequest(inbox_for(owner.public_key)), NOW)
    verifier.check(request, NOW)
    with pytest.raises(StoreAuthError, match="already used") as info:
        verifier.check(request, NOW + 1000)
    assert info.value.status == Status.REPLAYED


def test_forged_and_foreign_signatures() -> None:
    owner, other = Identity.generate(), Identity.generate()
    inbox = inbox_for(owner.public_key)
    verifier = OwnerAuthVerifier()
    # Someone else signs for the owner's inbox with their own key: the key does not hash to it.
    foreign = sign_request(other, FetchRequest(inbox), NOW)
    with pytest.raises(StoreAuthError, match="does not hash") as info:
        verifier.check(foreign, NOW)
    assert info.value.status == Status.UNAUTHORIZED
    # The owner's key with another key's signature.
    signed = sign_request(owner, FetchRequest(inbox), NOW)
    assert signed.auth is not None
    forged_auth = dataclasses.replace(signed.auth, signature=foreign.auth.signature)  # type: ignore[union-attr]
    with pytest.raises(StoreAuthError, match="does not verify"):
        verifier.check(dataclasses.replace(signed, auth=forged_auth), NOW)
    # A signature over other parameters (the IDs of an ack swapped after signing).
    ack = sign_request(owner, AckRequest(inbox, (os.urandom(16),)), NOW)
    with pytest.raises(StoreAuthError, match="does not verify"):
        verifier.check(dataclasses.replace(ack, message_ids=(os.urandom(16),)), NOW)
    # A fetch signature replayed as an ack (another op) does not verify either.
    assert signed.auth is not None
    as_ack = AckRequest(inbox, (os.urandom(16),), signed.auth)
    with pytest.raises(StoreAuthError, match="does not verify"):
        verifier.check(as_ack, NOW)


def test_time_window_and_restart() -> None:
    owner = Identity.generate()
    inbox = inbox_for(owner.public_key)
    verifier = OwnerAuthVerifier(not_before_ms=NOW - 30_000)
    for skew in (-61_000, 61_000):
        with pytest.raises(StoreAuthError, match="node's clock") as info:
            verifier.check(sign_request(owner, FetchRequest(inbox), NOW + skew), NOW)
        assert info.value.status == Status.AUTH_EXPIRED
    for skew in (-29_000, 59_000):
        verifier.check(sign_request(owner, FetchRequest(inbox), NOW + skew), NOW)
    # Signed within the window but before the node (re)started: nonces from then are forgotten.
    with pytest.raises(StoreAuthError, match="restarted"):
        verifier.check(sign_request(owner, FetchRequest(inbox), NOW - 45_000), NOW)


def test_nonces_are_forgotten_after_the_window_and_bounded() -> None:
    owner = Identity.generate()
    inbox = inbox_for(owner.public_key)
    verifier = OwnerAuthVerifier(max_nonces=3)
    for _ in range(3):
        verifier.check(sign_request(owner, FetchRequest(inbox), NOW), NOW)
    with pytest.raises(StoreRequestRefused, match="too many") as info:
        verifier.check(sign_request(owner, FetchRequest(inbox), NOW), NOW)
    assert info.value.status == Status.BUSY
    later = NOW + 61_000
    verifier.check(sign_request(owner, FetchRequest(inbox), later), later)
    assert verifier.remembered == 1


def test_nonces_kept_elsewhere_are_refused_and_accepted_ones_say_until_when() -> None:
    owner = Identity.generate()
    inbox = inbox_for(owner.public_key)
    used = sign_request(owner, FetchRequest(inbox), NOW)
    assert used.auth is not None
    first = OwnerAuthVerifier()
    assert first.check(used, NOW + 5) == NOW + 60_000
    # A verifier seeded with what the first one accepted (a node after a restart).
    restarted = OwnerAuthVerifier(remembered=[(used.auth.nonce, NOW + 60_000)])
    with pytest.raises(StoreAuthError, match="already used"):
        restarted.check(used, NOW + 10)
    assert restarted.check(sign_request(owner, FetchRequest(inbox), NOW), NOW + 10) == NOW + 60_000
    # Seeding is bounded like the rest.
    assert OwnerAuthVerifier(max_nonces=2, remembered=[(os.urandom(16), NOW)] * 5).remembered == 1
    many = [(os.urandom(16), NOW) for _ in range(5)]
    assert OwnerAuthVerifier(max_nonces=2, remembered=many).remembered == 2
