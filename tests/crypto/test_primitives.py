"""The crypto primitives, X3DH and the prekey types of ``teia._native`` through Python.

Known answers (RFC 7748, RFC 8032), key-length and low-order checks, X3DH agreement on both sides
with and without a one-time prekey, bundle signatures, and the parsers of bundles and prekeys on
every truncation and on arbitrary bytes (only ``teia.errors`` exceptions, never a crash).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia import _native as native
from teia import errors
from teia.crypto import OneTimePrekey, PrekeyBundle, SignedPrekey
from teia.identity import Identity

h = bytes.fromhex

# RFC 7748 §6.1.
ALICE_X25519_PRIVATE = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_X25519_PUBLIC = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_X25519_PRIVATE = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_X25519_PUBLIC = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")

# RFC 8032 §7.1 test 1.
RFC8032_SEED = h("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = h("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")

# Small-order Ed25519 points (the eight torsion points) and non-canonical encodings.
SMALL_ORDER_ED25519 = [
    h("0100000000000000000000000000000000000000000000000000000000000000"),  # identity
    h("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # order 2
    h("0000000000000000000000000000000000000000000000000000000000000000"),  # order 4
    h("0000000000000000000000000000000000000000000000000000000000000080"),  # order 4
    h("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),  # order 8
    h("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
    h("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    h("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
]
NON_CANONICAL_ED25519 = [
    h("0100000000000000000000000000000000000000000000000000000000000080"),  # x = 0, sign 1
    h("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # y = p + 1
    h("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # y = p
]
# X25519 u-coordinates of low order (on the curve or the twist), including u ≥ p forms.
LOW_ORDER_X25519 = [
    h("0000000000000000000000000000000000000000000000000000000000000000"),
    h("0100000000000000000000000000000000000000000000000000000000000000"),
    h("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    h("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    h("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    h("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    h("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    h("0000000000000000000000000000000000000000000000000000000000000080"),
]

key32 = st.binary(min_size=32, max_size=32)


def bundle_for(seed: bytes, spk: SignedPrekey, opk: OneTimePrekey | None = None) -> PrekeyBundle:
    return PrekeyBundle(
        Identity.from_seed(seed).public_key,
        spk.id,
        spk.public_key,
        spk.signature,
        opk.id if opk else None,
        opk.public_key if opk else None,
    )


# --- known answers ---------------------------------------------------------------------------


def test_x25519_rfc7748() -> None:
    assert native.x25519_public_key(ALICE_X25519_PRIVATE) == ALICE_X25519_PUBLIC
    assert native.x25519_public_key(BOB_X25519_PRIVATE) == BOB_X25519_PUBLIC


def test_identity_conversion_rfc8032() -> None:
    assert Identity.from_seed(RFC8032_SEED).public_key == RFC8032_PUBLIC
    via_public = native.ed25519_public_to_x25519(RFC8032_PUBLIC)
    via_seed = native.x25519_public_key(native.ed25519_seed_to_x25519(RFC8032_SEED))
    assert via_public == via_seed


@given(seed=key32)
def test_seed_and_public_conversions_agree(seed: bytes) -> None:
    public = Identity.from_seed(seed).public_key
    private = native.ed25519_seed_to_x25519(seed)
    assert native.x25519_public_key(private) == native.ed25519_public_to_x25519(public)


def test_x25519_keypair_is_fresh_and_consistent() -> None:
    pairs = [native.x25519_keypair() for _ in range(4)]
    assert len({private for private, _ in pairs}) == 4
    for private, public in pairs:
        assert native.x25519_public_key(private) == public


def test_kdfs_and_sealing_round_trip() -> None:
    rk, ck = native.kdf_rk(b"\x01" * 32, b"\x02" * 32)
    assert len(rk) == len(ck) == 32
    assert rk != ck
    next_ck, mk = native.kdf_ck(ck)
    assert next_ck != mk
    aes_key, hmac_key, iv = native.message_key_material(mk)
    assert (len(aes_key), len(hmac_key), len(iv)) == (32, 32, 16)
    sealed = native.seal(mk, b"plaintext", b"ad")
    assert native.open_sealed(mk, sealed, b"ad") == b"plaintext"
    with pytest.raises(errors.DecryptionError):
        native.open_sealed(mk, sealed, b"other ad")
    with pytest.raises(errors.InvalidMessage):
        native.open_sealed(mk, sealed[:-1], b"ad")


# --- key checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_key_lengths_are_invalid_keys(length: int) -> None:
    bad = b"\x01" * length
    calls: list[Callable[[], object]] = [
        lambda: native.x25519_public_key(bad),
        lambda: native.ed25519_public_to_x25519(bad),
        lambda: native.ed25519_seed_to_x25519(bad),
        lambda: native.kdf_rk(bad, b"\x00" * 32),
        lambda: native.kdf_rk(b"\x00" * 32, bad),
        lambda: native.kdf_ck(bad),
        lambda: native.message_key_material(bad),
        lambda: native.seal(bad, b"", b""),
        lambda: native.open_sealed(bad, b"\x00" * 48, b""),
        lambda: native.x3dh_associated_data(bad, b"\x00" * 32),
        lambda: SignedPrekey.generate(bad, 1),
    ]
    for call in calls:
        with pytest.raises(errors.InvalidKey):
            call()


@pytest.mark.parametrize("point", SMALL_ORDER_ED25519 + NON_CANONICAL_ED25519)
def test_small_order_and_non_canonical_identity_keys_are_refused(point: bytes) -> None:
    with pytest.raises(errors.InvalidKey):
        native.ed25519_public_to_x25519(point)
    spk = SignedPrekey.generate(b"\x01" * 32, 1)
    with pytest.raises(errors.InvalidKey):
        PrekeyBundle(point, 1, spk.public_key, spk.signature)
    _, ek_public = native.x25519_keypair()
    with pytest.raises(errors.InvalidKey):
        native.x3dh_respond(b"\x02" * 32, spk.private_key, None, point, ek_public)


@pytest.mark.parametrize("u", LOW_ORDER_X25519)
def test_low_order_x25519_keys_are_refused(u: bytes) -> None:
    seed = b"\x03" * 32
    spk = SignedPrekey.generate(seed, 1)
    identity = Identity.from_seed(seed).public_key
    with pytest.raises(errors.InvalidKey):
        PrekeyBundle(identity, 1, u, spk.signature)
    with pytest.raises(errors.InvalidKey):
        PrekeyBundle(identity, 1, spk.public_key, spk.signature, 2, u)
    with pytest.raises(errors.InvalidKey):
        native.x3dh_respond(
            seed, spk.private_key, None, Identity.from_seed(b"\x04" * 32).public_key, u
        )
    with pytest.raises(errors.InvalidKey):
        native.RatchetState.init_initiator(b"\x00" * 32, b"", u)


# --- X3DH ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_opk", [False, True])
def test_x3dh_both_sides_agree(with_opk: bool) -> None:
    alice_seed, bob_seed = b"\xa0" * 32, b"\xb0" * 32
    spk = SignedPrekey.generate(bob_seed, 7)
    opk = OneTimePrekey.generate(9) if with_opk else None
    bundle = bundle_for(bob_seed, spk, opk)
    ek_private, ek_public = native.x25519_keypair()
    sk_a = native.x3dh_initiate(alice_seed, ek_private, bundle)
    sk_b = native.x3dh_respond(
        bob_seed,
        spk.private_key,
        opk.private_key if opk else None,
        Identity.from_seed(alice_seed).public_key,
        ek_public,
    )
    assert sk_a == sk_b
    assert len(sk_a) == 32
    # The other variant gives another secret.
    other = bundle_for(bob_seed, spk, None if with_opk else OneTimePrekey.generate(9))
    assert native.x3dh_initiate(alice_seed, ek_private, other) != sk_a


def test_x3dh_associated_data_is_initiator_first() -> None:
    a, b = b"\x0a" * 32, b"\x0b" * 32
    assert native.x3dh_associated_data(a, b) == a + b


def test_bad_bundle_signatures_are_refused() -> None:
    seed = b"\x05" * 32
    spk = SignedPrekey.generate(seed, 1)
    good = bundle_for(seed, spk)
    good.verify()
    forged_signature = bytes([spk.signature[0] ^ 1]) + spk.signature[1:]
    identity = Identity.from_seed(seed).public_key
    other_spk = SignedPrekey.generate(b"\x06" * 32, 1)
    for bundle in [
        PrekeyBundle(identity, 1, spk.public_key, forged_signature),
        PrekeyBundle(identity, 1, other_spk.public_key, other_spk.signature),
        PrekeyBundle(identity, 1, other_spk.public_key, spk.signature),
    ]:
        with pytest.raises(errors.InvalidSignature):
            bundle.verify()
        with pytest.raises(errors.InvalidSignature):
            native.x3dh_initiate(b"\x07" * 32, native.x25519_keypair()[0], bundle)
    with pytest.raises(errors.InvalidSignature):
        PrekeyBundle(identity, 1, spk.public_key, spk.signature[:63])


def test_bundle_needs_both_one_time_prekey_fields() -> None:
    seed = b"\x05" * 32
    spk = SignedPrekey.generate(seed, 1)
    opk = OneTimePrekey.generate(2)
    identity = Identity.from_seed(seed).public_key
    with pytest.raises(errors.InvalidKey):
        PrekeyBundle(identity, 1, spk.public_key, spk.signature, 2, None)
    with pytest.raises(errors.InvalidKey):
        PrekeyBundle(identity, 1, spk.public_key, spk.signature, None, opk.public_key)


# --- serialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_opk", [False, True])
def test_bundle_round_trip_and_every_truncation(with_opk: bool) -> None:
    seed = b"\x08" * 32
    spk = SignedPrekey.generate(seed, 0xDEADBEEF)
    opk = OneTimePrekey.generate(0xFFFFFFFF) if with_opk else None
    bundle = bundle_for(seed, spk, opk)
    data = bundle.to_bytes()
    assert len(data) == (170 if with_opk else 134)
    assert data[0] == 1
    assert data[1:33] == bundle.identity_key
    back = PrekeyBundle.from_bytes(data)
    assert back.to_bytes() == data
    assert back.signed_prekey_id == 0xDEADBEEF
    assert back.one_time_prekey_id == (0xFFFFFFFF if with_opk else None)
    assert back.one_time_prekey == (opk.public_key if opk else None)
    back.verify()
    for cut in range(len(data)):
        with pytest.raises(errors.CryptoError):
            PrekeyBundle.from_bytes(data[:cut])
    with pytest.raises(errors.InvalidMessage):
        PrekeyBundle.from_bytes(data + b"\x00")
    with pytest.raises(errors.InvalidMessage):
        PrekeyBundle.from_bytes(b"\x02" + data[1:])


def test_prekeys_round_trip_and_refuse_garbage() -> None:
    spk = SignedPrekey.generate(b"\x09" * 32, 3)
    opk = OneTimePrekey.generate(4)
    spk_back = SignedPrekey.from_bytes(spk.to_bytes())
    assert (spk_back.id, spk_back.public_key, spk_back.private_key, spk_back.signature) == (
        spk.id,
        spk.public_key,
        spk.private_key,
        spk.signature,
    )
    opk_back = OneTimePrekey.from_bytes(opk.to_bytes())
    assert (opk_back.id, opk_back.public_key, opk_back.private_key) == (
        opk.id,
        opk.public_key,
        opk.private_key,
    )
    for data, parse in [
        (spk.to_bytes(), SignedPrekey.from_bytes),
        (opk.to_bytes(), OneTimePrekey.from_bytes),
    ]:
        for cut in range(len(data)):
            with pytest.raises(errors.InvalidSessionState):
                parse(data[:cut])
        with pytest.raises(errors.InvalidSessionState):
            parse(data + b"\x00")
        with pytest.raises(errors.InvalidSessionState):
            parse(b"\x02" + data[1:])


@given(data=st.binary(max_size=300))
def test_key_parsers_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (PrekeyBundle.from_bytes, SignedPrekey.from_bytes, OneTimePrekey.from_bytes):
        with contextlib.suppress(errors.CryptoError):
            parse(data)


@given(data=st.data())
def test_bundle_parser_on_mutated_bundles(data: st.DataObject) -> None:
    seed = b"\x0c" * 32
    bundle = bundle_for(seed, SignedPrekey.generate(seed, 1), OneTimePrekey.generate(2))
    encoded = bytearray(bundle.to_bytes())
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    try:
        parsed = PrekeyBundle.from_bytes(bytes(encoded))
    except errors.CryptoError:
        return
    # A bundle that still parses must not verify unless only the ids changed.
    if position in range(1, 33) or position in range(37, 133):
        with pytest.raises(errors.CryptoError):
            parsed.verify()
