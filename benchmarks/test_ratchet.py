"""Pairwise E2E crypto: teia's Rust core against the pure-Python reference and vodozemac's Olm.

Each scenario runs the same work on every implementation, in one pytest-benchmark group:

- teia: the high-level ``Session`` (what applications use);
- teia-ratchet: the low-level ``RatchetState`` (the bare Double Ratchet);
- reference: ``tests/crypto/reference.py``, the spec in plain Python over ``cryptography``;
- vodozemac: an Olm ``Session`` (Matrix's audited Rust ratchet), messages handed over as the
  ``AnyOlmMessage`` objects it returns (no serialisation, which favours it).

Scenarios: (a) a 256-byte message encrypted and decrypted on an established chain, always in
the same direction; (b) a ping-pong turn: the other side sends each time, so every message costs
a DH ratchet step; (c) a full handshake: X3DH from a bundle (Olm: outbound session from a
one-time key), the first message encrypted, the inbound session created from it. See README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import vodozemac
from tests.crypto import reference as ref

from teia import _native as native

PLAINTEXT = os.urandom(256)
IMPLEMENTATIONS = ["teia", "teia-ratchet", "reference", "vodozemac"]
# Small and bounded: the whole suite should finish in a couple of minutes.
FAST = {"min_rounds": 20, "max_time": 1.0, "warmup": True, "warmup_iterations": 200}
HANDSHAKE_ROUNDS = 300

Pair = tuple[Any, Any]


def needs(implementation: str) -> None:
    wanted = {"teia": "Session", "teia-ratchet": "RatchetState"}.get(implementation)
    if wanted and not hasattr(native, wanted):
        pytest.skip(f"teia._native.{wanted} is not built yet")


# --- established pairs: alice → bob → alice already happened, both chains exist --------------


def teia_identities() -> tuple[bytes, bytes, Any, Any]:
    alice_seed, bob_seed = os.urandom(32), os.urandom(32)
    spk = native.SignedPrekey.generate(bob_seed, 1)
    opk = native.OneTimePrekey.generate(2)
    return alice_seed, bob_seed, spk, opk


def teia_bundle(bob_seed: bytes, spk: Any, opk: Any) -> Any:
    return native.PrekeyBundle(
        ref.ed25519_public_key(bob_seed),
        spk.id,
        spk.public_key,
        spk.signature,
        opk.id,
        opk.public_key,
    )


def pair_teia() -> Pair:
    alice_seed, bob_seed, spk, opk = teia_identities()
    alice = native.Session.initiate(alice_seed, teia_bundle(bob_seed, spk, opk))
    bob, _ = native.Session.accept(bob_seed, spk, opk, alice.encrypt(b"hello"))
    assert alice.decrypt(bob.encrypt(b"hi")) == b"hi"
    return alice, bob


def pair_ratchet(cls: Any) -> Pair:
    sk, ad = os.urandom(32), os.urandom(64)
    bob_private = os.urandom(32)
    alice = cls.init_initiator(sk, ad, ref.x25519_public_key(bob_private))
    bob = cls.init_responder(sk, ad, bob_private)
    assert bob.decrypt(alice.encrypt(b"hello")) == b"hello"
    assert alice.decrypt(bob.encrypt(b"hi")) == b"hi"
    return alice, bob


def pair_vodozemac() -> Pair:
    alice_account, bob_account = vodozemac.Account(), vodozemac.Account()
    bob_account.generate_one_time_keys(1)
    (one_time_key,) = bob_account.one_time_keys.values()
    bob_account.mark_keys_as_published()
    alice = alice_account.create_outbound_session(bob_account.curve25519_key, one_time_key)
    first = alice.encrypt(b"hello").to_pre_key()
    bob, _ = bob_account.create_inbound_session(alice_account.curve25519_key, first)
    assert alice.decrypt(bob.encrypt(b"hi")) == b"hi"
    return alice, bob


def make_pair(implementation: str) -> Pair:
    needs(implementation)
    if implementation == "teia":
        return pair_teia()
    if implementation == "teia-ratchet":
        return pair_ratchet(native.RatchetState)
    if implementation == "reference":
        return pair_ratchet(ref.ReferenceRatchet)
    return pair_vodozemac()


# --- (a) and (b) ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="a: encrypt+decrypt 256 B, established chain", **FAST)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_same_direction(benchmark: Any, record_median: None, implementation: str) -> None:
    alice, bob = make_pair(implementation)

    def message() -> bytes:
        return bob.decrypt(alice.encrypt(PLAINTEXT))

    assert benchmark(message) == PLAINTEXT


@pytest.mark.benchmark(group="b: ping-pong turn, 256 B (a DH ratchet step each)", **FAST)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ping_pong(benchmark: Any, record_median: None, implementation: str) -> None:
    sides = list(make_pair(implementation))

    def turn() -> bytes:
        sender, receiver = sides
        plaintext = receiver.decrypt(sender.encrypt(PLAINTEXT))
        sides.reverse()
        return plaintext

    assert benchmark(turn) == PLAINTEXT


# --- (c) -----------------------------------------------------------------------------------------

Setup = Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]


def handshake_teia() -> tuple[Setup, Callable[..., bytes]]:
    alice_seed, bob_seed, spk, _ = teia_identities()
    ids = iter(range(10, 2**31))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        opk = native.OneTimePrekey.generate(next(ids))
        return (teia_bundle(bob_seed, spk, opk), opk), {}

    def handshake(bundle: Any, opk: Any) -> bytes:
        message = native.Session.initiate(alice_seed, bundle).encrypt(PLAINTEXT)
        _, plaintext = native.Session.accept(bob_seed, spk, opk, message)
        return plaintext

    return setup, handshake


def handshake_reference() -> tuple[Setup, Callable[..., bytes]]:
    alice_seed, bob_seed = os.urandom(32), os.urandom(32)
    alice_ik, bob_ik = ref.ed25519_public_key(alice_seed), ref.ed25519_public_key(bob_seed)
    spk_private = os.urandom(32)
    spk = ref.x25519_public_key(spk_private)
    signature = ref.sign_prekey(bob_seed, spk)
    ad = ref.x3dh_associated_data(alice_ik, bob_ik)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        opk_private = os.urandom(32)
        return (opk_private, ref.x25519_public_key(opk_private)), {}

    def handshake(opk_private: bytes, opk: bytes) -> bytes:
        # Initiator: X3DH from the bundle, then the first message; the responder receives
        # (IK_A, EK_A, message) — the reference defines no prekey-message framing.
        ek_private = os.urandom(32)
        sk = ref.x3dh_initiate(alice_seed, ek_private, bob_ik, spk, signature, opk)
        message = ref.ReferenceRatchet.init_initiator(sk, ad, spk).encrypt(PLAINTEXT)
        ek = ref.x25519_public_key(ek_private)
        sk_b = ref.x3dh_respond(bob_seed, spk_private, opk_private, alice_ik, ek)
        return ref.ReferenceRatchet.init_responder(sk_b, ad, spk_private).decrypt(message)

    return setup, handshake


def handshake_vodozemac() -> tuple[Setup, Callable[..., bytes]]:
    alice_account, bob_account = vodozemac.Account(), vodozemac.Account()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        bob_account.generate_one_time_keys(1)
        (one_time_key,) = bob_account.one_time_keys.values()
        bob_account.mark_keys_as_published()
        return (one_time_key,), {}

    def handshake(one_time_key: Any) -> bytes:
        alice = alice_account.create_outbound_session(bob_account.curve25519_key, one_time_key)
        first = alice.encrypt(PLAINTEXT).to_pre_key()
        _, plaintext = bob_account.create_inbound_session(alice_account.curve25519_key, first)
        return plaintext

    return setup, handshake


HANDSHAKES = {
    "teia": handshake_teia,
    "reference": handshake_reference,
    "vodozemac": handshake_vodozemac,
}


@pytest.mark.benchmark(group="c: handshake + first 256 B message")
@pytest.mark.parametrize("implementation", list(HANDSHAKES))
def test_handshake(benchmark: Any, record_median: None, implementation: str) -> None:
    needs(implementation)
    setup, handshake = HANDSHAKES[implementation]()
    plaintexts: list[bytes] = []

    def measured(*args: Any) -> None:
        plaintexts.append(handshake(*args))

    benchmark.pedantic(measured, setup=setup, rounds=HANDSHAKE_ROUNDS, warmup_rounds=10)
    assert set(plaintexts) == {PLAINTEXT}
