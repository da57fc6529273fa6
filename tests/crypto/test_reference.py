"""The pure-Python reference (``reference.py``) against published vectors, and the Rust core
against the reference.

1. The reference's primitives against the vectors their RFCs publish. Signal's X3DH and Double
   Ratchet specifications publish no test vectors, so the protocol layers are checked for
   self-consistency here and pinned in (2).
2. Known answers of teia's own parameters, computed by the reference and pinned as hex: the
   Rust core must produce the same bytes.
3. Hypothesis cross-checks on random inputs: every primitive, X3DH with each implementation on
   either side, and conversations where the reference and the Rust core talk to each other —
   bare ratchet states, and sessions in teia's bundle and message framing — with random
   plaintexts, random delivery order, replays and tampering.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia import _native as native
from teia import errors

from . import reference as ref
from .reference import ReferenceBundle, ReferenceCryptoError, ReferenceRatchet, ReferenceSession

key32 = st.binary(min_size=32, max_size=32)
h = bytes.fromhex


# --- 1. the reference against published vectors ------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "u", "out"),
    [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_rfc7748_section_5_2(scalar: str, u: str, out: str) -> None:
    assert ref.x25519(h(scalar), h(u)) == h(out)


def test_x25519_rfc7748_iterated() -> None:
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = ref.x25519(k, u), k
        if i == 1:
            assert k == h("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
    assert k == h("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")


def test_x25519_rfc7748_section_6_1() -> None:
    alice = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_public = ref.x25519_public_key(alice)
    bob_public = ref.x25519_public_key(bob)
    assert alice_public == h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert bob_public == h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert ref.x25519(alice, bob_public) == ref.x25519(bob, alice_public) == shared


def test_x25519_refuses_low_order_points() -> None:
    with pytest.raises(ReferenceCryptoError):
        ref.x25519(bytes(range(32)), bytes(32))
    with pytest.raises(ReferenceCryptoError):
        ref.x25519(bytes(range(32)), (1).to_bytes(32, "little"))


def test_hkdf_sha256_rfc5869_test_case_1() -> None:
    ikm, salt, info = b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA))
    prk = h("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
    assert ref.hmac_sha256(salt, ikm) == prk  # HKDF-Extract is HMAC(salt, IKM)
    assert ref.hkdf_sha256(salt, ikm, info, 42) == h(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_ed25519_rfc8032_test_1() -> None:
    seed = h("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = h("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = h(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39"
        "701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert ref.ed25519_public_key(seed) == public
    assert ref.ed25519_sign(seed, b"") == signature
    ref.ed25519_verify(public, signature, b"")


def test_ed25519_to_x25519_libsodium_vector() -> None:
    # libsodium's test/default/ed25519_convert: crypto_sign_ed25519_{pk,sk}_to_curve25519 of
    # the key pair from this seed (its secret key comes out clamped).
    seed = h("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee")
    public = ref.ed25519_public_key(seed)
    assert public == h("b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e")
    assert ref.ed25519_public_to_x25519(public) == h(
        "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50"
    )
    assert ref.clamp(ref.ed25519_seed_to_x25519(seed)) == h(
        "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166"
    )


@given(seed=key32)
def test_ed25519_to_x25519_maps_commute(seed: bytes) -> None:
    # Two independent paths to the same X25519 public key: the birational map of the Ed25519
    # point (computed here), and X25519's base-point multiplication of the converted scalar
    # (OpenSSL).
    via_map = ref.ed25519_public_to_x25519(ref.ed25519_public_key(seed))
    assert via_map == ref.x25519_public_key(ref.ed25519_seed_to_x25519(seed))


def test_ed25519_to_x25519_refuses_non_points() -> None:
    with pytest.raises(ReferenceCryptoError):  # y = p, non-canonical
        ref.ed25519_public_to_x25519(ref.P.to_bytes(32, "little"))
    with pytest.raises(ReferenceCryptoError):  # the identity: 1 - y = 0
        ref.ed25519_public_to_x25519((1).to_bytes(32, "little"))
    with pytest.raises(ReferenceCryptoError):  # y = 2 has no x on edwards25519
        ref.ed25519_public_to_x25519((2).to_bytes(32, "little"))


@given(mk=key32, plaintext=st.binary(max_size=300), ad=st.binary(max_size=100))
def test_seal_round_trip_and_layout(mk: bytes, plaintext: bytes, ad: bytes) -> None:
    sealed = ref.seal(mk, plaintext, ad)
    assert len(sealed) == (len(plaintext) // 16 + 1) * 16 + 32
    assert ref.open_sealed(mk, sealed, ad) == plaintext
    for bad in (
        sealed[:-1] + bytes([sealed[-1] ^ 1]),
        bytes([sealed[0] ^ 0x80]) + sealed[1:],
        sealed[:-16],
    ):
        with pytest.raises(ReferenceCryptoError):
            ref.open_sealed(mk, bad, ad)
    with pytest.raises(ReferenceCryptoError):
        ref.open_sealed(mk, sealed, ad + b"x")


@given(alice=key32, bob=key32, spk=key32, opk=key32, ek=key32, use_opk=st.booleans())
def test_x3dh_both_sides_agree(
    alice: bytes, bob: bytes, spk: bytes, opk: bytes, ek: bytes, use_opk: bool
) -> None:
    spk_public = ref.x25519_public_key(spk)
    opk_public = ref.x25519_public_key(opk) if use_opk else None
    sk_a = ref.x3dh_initiate(
        alice,
        ek,
        ref.ed25519_public_key(bob),
        spk_public,
        ref.sign_prekey(bob, spk_public),
        opk_public,
    )
    sk_b = ref.x3dh_respond(
        bob, spk, opk if use_opk else None, ref.ed25519_public_key(alice), ref.x25519_public_key(ek)
    )
    assert sk_a == sk_b


def test_x3dh_refuses_a_bad_prekey_signature() -> None:
    bob = bytes([0xB0]) * 32
    spk_public = ref.x25519_public_key(bytes([0x5B]) * 32)
    signature = bytearray(ref.sign_prekey(bob, spk_public))
    signature[0] ^= 1
    with pytest.raises(ReferenceCryptoError):
        ref.x3dh_initiate(
            bytes(32), bytes(32), ref.ed25519_public_key(bob), spk_public, bytes(signature)
        )


def reference_pair(sk: bytes, ad: bytes, responder_private: bytes) -> list[ReferenceRatchet]:
    alice = ReferenceRatchet.init_initiator(sk, ad, ref.x25519_public_key(responder_private))
    return [alice, ReferenceRatchet.init_responder(sk, ad, responder_private)]


@given(data=st.data(), sk=key32, ad=st.binary(max_size=64), responder_private=key32)
def test_reference_ratchet_conversation(
    data: st.DataObject, sk: bytes, ad: bytes, responder_private: bytes
) -> None:
    converse(data, reference_pair(sk, ad, responder_private))


def test_reference_ratchet_refuses_replay_and_forgery_without_changing_state() -> None:
    alice, bob = reference_pair(bytes(32), b"ad", bytes([7]) * 32)
    first, second = alice.encrypt(b"one"), alice.encrypt(b"two")
    assert bob.decrypt(second) == b"two"
    forged = first[:-1] + bytes([first[-1] ^ 1])
    before = dict(bob.__dict__, mkskipped=dict(bob.mkskipped))
    with pytest.raises(ReferenceCryptoError):
        bob.decrypt(forged)
    assert bob.__dict__ == before
    assert bob.decrypt(first) == b"one"
    with pytest.raises(ref.ReferenceDuplicateMessage):
        bob.decrypt(first)
    with pytest.raises(ref.ReferenceDuplicateMessage):
        bob.decrypt(second)
    assert bob.__dict__ == dict(before, mkskipped={})


def test_reference_ratchet_limits_skipped_keys() -> None:
    alice, bob = reference_pair(bytes(32), b"", bytes([7]) * 32)
    messages = [alice.encrypt(b"") for _ in range(ref.MAX_SKIP + 2)]
    with pytest.raises(ref.ReferenceTooManySkipped):
        bob.decrypt(messages[-1])
    assert bob.decrypt(messages[-2]) == b""
    assert bob.skipped_message_keys == ref.MAX_SKIP


def reference_sessions(
    use_opk: bool, alice: bytes, bob: bytes, spk: bytes, opk: bytes
) -> tuple[ReferenceSession, ReferenceBundle]:
    spk_public = ref.x25519_public_key(spk)
    bundle = ReferenceBundle(
        ref.ed25519_public_key(bob),
        11,
        spk_public,
        ref.sign_prekey(bob, spk_public),
        12 if use_opk else None,
        ref.x25519_public_key(opk) if use_opk else None,
    )
    assert ReferenceBundle.from_bytes(bundle.to_bytes()) == bundle
    assert len(bundle.to_bytes()) == (170 if use_opk else 134)
    return ReferenceSession.initiate(alice, bundle), bundle


@given(data=st.data(), alice=key32, bob=key32, spk=key32, opk=key32, use_opk=st.booleans())
def test_reference_session_conversation(
    data: st.DataObject, alice: bytes, bob: bytes, spk: bytes, opk: bytes, use_opk: bool
) -> None:
    initiator, _ = reference_sessions(use_opk, alice, bob, spk, opk)
    first = initiator.encrypt(b"first")
    assert first[:2] == b"\x01\x02"
    responder, plaintext = ReferenceSession.accept(
        bob, 11, spk, 12 if use_opk else None, opk if use_opk else None, first
    )
    assert plaintext == b"first"
    converse(data, [initiator, responder], responder_can_send=True)


# --- 2. known answers of teia's parameters (computed by the reference, checked on Rust) --------


RK_IN, DH_IN = bytes(range(32)), bytes(range(32, 64))
CK_IN, MK_IN = bytes(range(64, 96)), bytes(range(96, 128))
KAT_PLAINTEXT, KAT_AD = b"teia known-answer plaintext", b"teia associated data"
KAT_KDF_RK = (
    h("6e9b5ca4ed7efcaac08a805a640e5f44d3887aa5038494458f725077a3db368f"),
    h("9b6e3fa41525f2acfa19df221327defb292d887cdf8d5b50c9124704773c7e2d"),
)
KAT_KDF_CK = (  # (next chain key, message key)
    h("f0bdefbbad3cf097dccb03f2c87159f7608e2480543eef7741c8f2e7f226e78f"),
    h("01156abd78ef59f755f1e6945e5d1e2d7ddd1f1e5fe0a164b2f5fa8ad500bfba"),
)
KAT_MESSAGE_KEYS = (
    h("4f472b73958431b29f423d2074c6c04b3c0354fb40e41dba47791925715a8696"),
    h("e25135ec58c6045088331b508f1f924040dca4c03117c39628dddd31465e983d"),
    h("136f2e22c3a7c63c675b7b9a24980607"),
)
KAT_SEALED = h(
    "260bc259467ff48067a24457e8c21c1a4d8cca94985f23ab662da8b75bb32b8b"
    "908c678972ba0d48d0d9a96aa7c5ff1d697650a012082e544d63a0c111bb8ae5"
)

# X3DH from fixed keys: Alice's identity seed, Bob's identity seed, signed prekey, one-time
# prekey and Alice's ephemeral key, each a repeated byte.
ALICE_SEED, BOB_SEED = bytes([0xA1]) * 32, bytes([0xB0]) * 32
SPK_PRIVATE, OPK_PRIVATE, EK_PRIVATE = bytes([0x5B]) * 32, bytes([0x0B]) * 32, bytes([0xEA]) * 32
KAT_ALICE_IK = h("bc7cbcb5636375fa1d82434d466724d92377f53b980695dd49d26d0ce12205a5")
KAT_BOB_IK = h("705fbac01f5519899f437bc42e40255ae9ab54bff00de3433af7d687d9e71ad5")
KAT_SPK = h("b1d15b513029951e811115ffe62a614706554fb610b8295e889bc3bebdf4370e")
KAT_OPK = h("73b2d8b76aa9b53660032bc8f5d8bee3a3ae4e3b3a7fd49ade81f7347a34aa68")
KAT_EK = h("a6ceb997753803924785244e687c61ef3ba6e0d4a7baf25eb91dbef2b9532c16")
KAT_SPK_SIGNATURE = h(
    "2938b57aa25e0fdbeffd1b89dcd848210822bb347a367a38bafa8d9a23cf7a37"
    "132b4fb811f53b22218dd8df202f6caa82d13b877c17a6fd0ccb8e3b7883510d"
)
KAT_SK_WITHOUT_OPK = h("853eb471956779fb88a89e5fec4b0cd6df7ca2a0bca8695ebd360bd48ffe7281")
KAT_SK_WITH_OPK = h("2400db8a235a009f1b1522800ca22d4407938d8555f662a345d5bb6ac73beb22")
# The initiator's first ratchet message under KAT_SK_WITH_OPK and AD = IK_A ‖ IK_B, with its
# first ratchet key fixed to RATCHET_PRIVATE.
RATCHET_PRIVATE, KAT_FIRST_PLAINTEXT = bytes([0x3A]) * 32, b"hello, teia"
KAT_FIRST_MESSAGE = h(
    "0d43915fb4b40a2e9f111ae150197e643d39d000ec6977d28551a04caa189354"
    "0000000000000000"
    "f3aba947da159ba918644fea565b4df0"
    "189f3fdb7ccd74ec19220ca31476043d009dbe431cb807fa4ea60b7d56336089"
)


def test_known_answers_of_the_reference() -> None:
    assert ref.kdf_rk(RK_IN, DH_IN) == KAT_KDF_RK
    assert ref.kdf_ck(CK_IN) == KAT_KDF_CK
    assert ref.message_key_material(MK_IN) == KAT_MESSAGE_KEYS
    assert ref.seal(MK_IN, KAT_PLAINTEXT, KAT_AD) == KAT_SEALED
    assert ref.ed25519_public_key(ALICE_SEED) == KAT_ALICE_IK
    assert ref.ed25519_public_key(BOB_SEED) == KAT_BOB_IK
    assert [ref.x25519_public_key(k) for k in (SPK_PRIVATE, OPK_PRIVATE, EK_PRIVATE)] == [
        KAT_SPK,
        KAT_OPK,
        KAT_EK,
    ]
    assert ref.sign_prekey(BOB_SEED, KAT_SPK) == KAT_SPK_SIGNATURE
    args = (ALICE_SEED, EK_PRIVATE, KAT_BOB_IK, KAT_SPK, KAT_SPK_SIGNATURE)
    assert ref.x3dh_initiate(*args) == KAT_SK_WITHOUT_OPK
    assert ref.x3dh_initiate(*args, KAT_OPK) == KAT_SK_WITH_OPK
    assert ref.x3dh_respond(BOB_SEED, SPK_PRIVATE, None, KAT_ALICE_IK, KAT_EK) == (
        KAT_SK_WITHOUT_OPK
    )
    assert ref.x3dh_respond(BOB_SEED, SPK_PRIVATE, OPK_PRIVATE, KAT_ALICE_IK, KAT_EK) == (
        KAT_SK_WITH_OPK
    )
    ad = KAT_ALICE_IK + KAT_BOB_IK
    alice = ReferenceRatchet.init_initiator(KAT_SK_WITH_OPK, ad, KAT_SPK, RATCHET_PRIVATE)
    assert alice.encrypt(KAT_FIRST_PLAINTEXT) == KAT_FIRST_MESSAGE
    bob = ReferenceRatchet.init_responder(KAT_SK_WITH_OPK, ad, SPK_PRIVATE)
    assert bob.decrypt(KAT_FIRST_MESSAGE) == KAT_FIRST_PLAINTEXT


def test_known_answers_of_the_ratchet_primitives() -> None:
    assert native.kdf_rk(RK_IN, DH_IN) == KAT_KDF_RK
    assert native.kdf_ck(CK_IN) == KAT_KDF_CK
    assert native.message_key_material(MK_IN) == KAT_MESSAGE_KEYS
    assert native.seal(MK_IN, KAT_PLAINTEXT, KAT_AD) == KAT_SEALED
    assert native.open_sealed(MK_IN, KAT_SEALED, KAT_AD) == KAT_PLAINTEXT


def test_known_answers_of_the_key_conversions() -> None:
    assert native.x25519_public_key(SPK_PRIVATE) == KAT_SPK
    # libsodium's ed25519_convert vector (see test_ed25519_to_x25519_libsodium_vector).
    seed = h("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee")
    assert native.ed25519_public_to_x25519(
        h("b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e")
    ) == h("f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50")
    assert ref.clamp(native.ed25519_seed_to_x25519(seed)) == h(
        "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166"
    )


def kat_bundle(with_opk: bool) -> native.PrekeyBundle:
    return native.PrekeyBundle(
        KAT_BOB_IK,
        1,
        KAT_SPK,
        KAT_SPK_SIGNATURE,
        2 if with_opk else None,
        KAT_OPK if with_opk else None,
    )


@pytest.mark.parametrize("with_opk", [False, True])
def test_known_answers_of_x3dh(with_opk: bool) -> None:
    expected = KAT_SK_WITH_OPK if with_opk else KAT_SK_WITHOUT_OPK
    assert native.x3dh_initiate(ALICE_SEED, EK_PRIVATE, kat_bundle(with_opk)) == expected
    opk_private = OPK_PRIVATE if with_opk else None
    assert native.x3dh_respond(BOB_SEED, SPK_PRIVATE, opk_private, KAT_ALICE_IK, KAT_EK) == expected
    assert native.x3dh_associated_data(KAT_ALICE_IK, KAT_BOB_IK) == KAT_ALICE_IK + KAT_BOB_IK


def test_known_answer_of_the_first_ratchet_message() -> None:
    ad = KAT_ALICE_IK + KAT_BOB_IK
    alice = native.RatchetState.init_initiator(
        KAT_SK_WITH_OPK, ad, KAT_SPK, ratchet_private=RATCHET_PRIVATE
    )
    assert alice.encrypt(KAT_FIRST_PLAINTEXT) == KAT_FIRST_MESSAGE
    bob = native.RatchetState.init_responder(KAT_SK_WITH_OPK, ad, SPK_PRIVATE)
    assert bob.decrypt(KAT_FIRST_MESSAGE) == KAT_FIRST_PLAINTEXT


# The same first message framed as a session's prekey message (docs/crypto.md).
KAT_FIRST_SESSION_MESSAGE = (
    b"\x01\x02"
    + KAT_ALICE_IK
    + KAT_EK
    + h("00000001")
    + b"\x01"
    + h("00000002")
    + KAT_FIRST_MESSAGE
)


def test_known_answer_of_the_first_session_message() -> None:
    bundle = ReferenceBundle(KAT_BOB_IK, 1, KAT_SPK, KAT_SPK_SIGNATURE, 2, KAT_OPK)
    alice = ReferenceSession.initiate(ALICE_SEED, bundle, EK_PRIVATE, RATCHET_PRIVATE)
    assert alice.encrypt(KAT_FIRST_PLAINTEXT) == KAT_FIRST_SESSION_MESSAGE
    _, plaintext = ReferenceSession.accept(
        BOB_SEED, 1, SPK_PRIVATE, 2, OPK_PRIVATE, KAT_FIRST_SESSION_MESSAGE
    )
    assert plaintext == KAT_FIRST_PLAINTEXT


def test_rust_accepts_the_known_first_session_message() -> None:
    assert kat_bundle(True).to_bytes() == (
        ReferenceBundle(KAT_BOB_IK, 1, KAT_SPK, KAT_SPK_SIGNATURE, 2, KAT_OPK).to_bytes()
    )
    info = native.parse_prekey_message(KAT_FIRST_SESSION_MESSAGE)
    assert (info.identity_key, info.base_key) == (KAT_ALICE_IK, KAT_EK)
    assert (info.signed_prekey_id, info.one_time_prekey_id) == (1, 2)
    spk = native.SignedPrekey.from_bytes(b"\x01" + h("00000001") + SPK_PRIVATE + KAT_SPK_SIGNATURE)
    opk = native.OneTimePrekey.from_bytes(b"\x01" + h("00000002") + OPK_PRIVATE)
    assert (spk.public_key, opk.public_key) == (KAT_SPK, KAT_OPK)
    bob, plaintext = native.Session.accept(BOB_SEED, spk, opk, KAT_FIRST_SESSION_MESSAGE)
    assert plaintext == KAT_FIRST_PLAINTEXT
    assert (bob.local_identity_key, bob.remote_identity_key) == (KAT_BOB_IK, KAT_ALICE_IK)


# --- 3. the Rust core against the reference on random inputs -----------------------------------


@given(private=key32, seed=key32)
def test_key_conversions_match(private: bytes, seed: bytes) -> None:
    assert native.x25519_public_key(private) == ref.x25519_public_key(private)
    public = ref.ed25519_public_key(seed)
    assert native.ed25519_public_to_x25519(public) == ref.ed25519_public_to_x25519(public)
    assert native.ed25519_seed_to_x25519(seed) == ref.ed25519_seed_to_x25519(seed)


def test_x25519_keypair_is_consistent() -> None:
    pairs = [native.x25519_keypair() for _ in range(8)]
    assert len({private for private, _ in pairs}) == 8
    for private, public in pairs:
        assert ref.x25519_public_key(private) == public


@given(rk=key32, dh=key32, ck=key32)
def test_kdfs_match(rk: bytes, dh: bytes, ck: bytes) -> None:
    assert native.kdf_rk(rk, dh) == ref.kdf_rk(rk, dh)
    assert native.kdf_ck(ck) == ref.kdf_ck(ck)
    assert native.message_key_material(ck) == ref.message_key_material(ck)


@given(mk=key32, plaintext=st.binary(max_size=600), ad=st.binary(max_size=120))
def test_seal_matches(mk: bytes, plaintext: bytes, ad: bytes) -> None:
    sealed = native.seal(mk, plaintext, ad)
    assert sealed == ref.seal(mk, plaintext, ad)
    assert native.open_sealed(mk, sealed, ad) == plaintext
    assert ref.open_sealed(mk, sealed, ad) == plaintext
    forged = sealed[:-1] + bytes([sealed[-1] ^ 0x40])
    with pytest.raises(errors.DecryptionError):
        native.open_sealed(mk, forged, ad)


@given(alice=key32, bob=key32, spk=key32, opk=key32, ek=key32, use_opk=st.booleans())
def test_x3dh_interoperates(
    alice: bytes, bob: bytes, spk: bytes, opk: bytes, ek: bytes, use_opk: bool
) -> None:
    alice_ik, bob_ik = ref.ed25519_public_key(alice), ref.ed25519_public_key(bob)
    spk_public, ek_public = ref.x25519_public_key(spk), ref.x25519_public_key(ek)
    opk_public = ref.x25519_public_key(opk) if use_opk else None
    opk_private = opk if use_opk else None
    signature = ref.sign_prekey(bob, spk_public)
    bundle = native.PrekeyBundle(
        bob_ik, 7, spk_public, signature, 9 if use_opk else None, opk_public
    )
    bundle.verify()
    # Reference initiator, Rust responder; then Rust initiator, reference responder.
    sk = ref.x3dh_initiate(alice, ek, bob_ik, spk_public, signature, opk_public)
    assert native.x3dh_respond(bob, spk, opk_private, alice_ik, ek_public) == sk
    assert native.x3dh_initiate(alice, ek, bundle) == sk
    assert ref.x3dh_respond(bob, spk, opk_private, alice_ik, ek_public) == sk


@given(seed=key32, prekey_id=st.integers(0, 2**32 - 1))
def test_signed_prekeys_match(seed: bytes, prekey_id: int) -> None:
    spk = native.SignedPrekey.generate(seed, prekey_id)
    assert spk.id == prekey_id
    assert ref.x25519_public_key(spk.private_key) == spk.public_key
    # Ed25519 signatures are deterministic: the reference must produce the same bytes.
    assert spk.signature == ref.sign_prekey(seed, spk.public_key)
    forged_signature = bytes([spk.signature[0] ^ 1]) + spk.signature[1:]
    forged = native.PrekeyBundle(
        ref.ed25519_public_key(seed), prekey_id, spk.public_key, forged_signature
    )
    with pytest.raises(errors.InvalidSignature):
        forged.verify()


@given(
    data=st.data(),
    sk=key32,
    ad=st.binary(max_size=64),
    responder_private=key32,
    initiator_private=key32,
    reference_initiates=st.booleans(),
)
def test_ratchet_conversation_between_reference_and_rust(
    data: st.DataObject,
    sk: bytes,
    ad: bytes,
    responder_private: bytes,
    initiator_private: bytes,
    reference_initiates: bool,
) -> None:
    initiator, responder = (
        (ReferenceRatchet, native.RatchetState)
        if reference_initiates
        else (native.RatchetState, ReferenceRatchet)
    )
    sides = [
        initiator.init_initiator(
            sk, ad, ref.x25519_public_key(responder_private), ratchet_private=initiator_private
        ),
        responder.init_responder(sk, ad, responder_private),
    ]
    assert sides[0].ratchet_public_key == ref.x25519_public_key(initiator_private)
    assert sides[1].ratchet_public_key == ref.x25519_public_key(responder_private)
    converse(data, sides)
    for side in sides:
        if not isinstance(side, ReferenceRatchet):
            assert side.associated_data == ad


@given(
    data=st.data(),
    alice=key32,
    bob=key32,
    spk_id=st.integers(0, 2**32 - 1),
    opk_id=st.none() | st.integers(0, 2**32 - 1),
    reference_initiates=st.booleans(),
)
def test_session_conversation_between_reference_and_rust(
    data: st.DataObject,
    alice: bytes,
    bob: bytes,
    spk_id: int,
    opk_id: int | None,
    reference_initiates: bool,
) -> None:
    # The responder's prekeys come from Rust; the reference reads their documented format.
    spk = native.SignedPrekey.generate(bob, spk_id)
    opk = None if opk_id is None else native.OneTimePrekey.generate(opk_id)
    opk_private = None if opk is None else opk.private_key
    bundle = native.PrekeyBundle(
        ref.ed25519_public_key(bob),
        spk.id,
        spk.public_key,
        spk.signature,
        opk_id,
        None if opk is None else opk.public_key,
    )
    reference_bundle = ReferenceBundle.from_bytes(bundle.to_bytes())
    assert reference_bundle.to_bytes() == bundle.to_bytes()
    assert native.PrekeyBundle.from_bytes(reference_bundle.to_bytes()).to_bytes() == (
        bundle.to_bytes()
    )

    initiator: Any
    responder: Any
    if reference_initiates:
        initiator = ReferenceSession.initiate(alice, reference_bundle)
        first = initiator.encrypt(b"first")
        assert native.is_prekey_message(first)
        info = native.parse_prekey_message(first)
        assert (info.identity_key, info.signed_prekey_id, info.one_time_prekey_id) == (
            ref.ed25519_public_key(alice),
            spk_id,
            opk_id,
        )
        responder, plaintext = native.Session.accept(bob, spk, opk, first)
    else:
        initiator = native.Session.initiate(alice, bundle)
        first = initiator.encrypt(b"first")
        responder, plaintext = ReferenceSession.accept(
            bob, spk_id, spk.private_key, opk_id, opk_private, first
        )
    assert plaintext == b"first"
    converse(data, [initiator, responder], responder_can_send=True)


@pytest.mark.parametrize("gap", [ref.MAX_SKIP, ref.MAX_SKIP + 1])
def test_skipped_key_limit_matches(gap: int) -> None:
    sk, ad, bob_private = bytes([1]) * 32, b"ad", bytes([2]) * 32
    alice = ReferenceRatchet.init_initiator(sk, ad, ref.x25519_public_key(bob_private))
    messages = [alice.encrypt(b"%d" % n) for n in range(gap + 1)]
    reference_bob = ReferenceRatchet.init_responder(sk, ad, bob_private)
    rust_bob = native.RatchetState.init_responder(sk, ad, bob_private)
    if gap <= ref.MAX_SKIP:
        assert reference_bob.decrypt(messages[gap]) == rust_bob.decrypt(messages[gap])
        assert reference_bob.skipped_message_keys == rust_bob.skipped_message_keys == gap
        assert reference_bob.decrypt(messages[7]) == rust_bob.decrypt(messages[7]) == b"7"
        assert reference_bob.skipped_message_keys == rust_bob.skipped_message_keys == gap - 1
    else:
        with pytest.raises(ref.ReferenceTooManySkipped):
            reference_bob.decrypt(messages[gap])
        with pytest.raises(errors.TooManySkippedMessages):
            rust_bob.decrypt(messages[gap])


# --- the conversation driver shared by (1) and (3) ---------------------------------------------


def converse(data: st.DataObject, sides: list[Any], *, responder_can_send: bool = False) -> None:
    """Drive ``sides[0]`` (initiator) and ``sides[1]`` (responder) through a random conversation.

    The sides are ratchet states or sessions, reference or Rust, in any mix. Each step either
    sends a random plaintext from one side or delivers one of the messages in flight to the
    other side, in any order; sometimes a delivered message is replayed, or a message in flight
    is tampered with, and both must be refused without disturbing the state. The Rust sides are
    sometimes serialised and reloaded. Whatever is still in flight at the end is delivered in a
    random order.
    """
    in_flight: list[list[tuple[bytes, bytes]]] = [[], []]  # messages towards side i
    delivered: list[list[bytes]] = [[], []]

    def deliver(to: int, index: int) -> None:
        nonlocal responder_can_send
        plaintext, message = in_flight[to].pop(index)
        assert sides[to].decrypt(message) == plaintext
        delivered[to].append(message)
        responder_can_send = responder_can_send or to == 1

    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.sampled_from(["send", "send", "deliver", "replay", "tamper"]))
        if action == "send":
            sender = data.draw(st.integers(0, 1 if responder_can_send else 0), label="sender")
            plaintext = data.draw(st.binary(max_size=100), label="plaintext")
            message = sides[sender].encrypt(plaintext)
            if hasattr(sides[sender], "ratchet_public_key"):  # a bare ratchet message
                padded = (len(plaintext) // 16 + 1) * 16
                assert len(message) == ref.HEADER_LEN + padded + ref.TAG_LEN
                assert message[:32] == sides[sender].ratchet_public_key
            in_flight[1 - sender].append((plaintext, message))
        elif action == "deliver":
            ready = [i for i in (0, 1) if in_flight[i]]
            if ready:
                to = data.draw(st.sampled_from(ready), label="deliver to")
                deliver(to, data.draw(st.integers(0, len(in_flight[to]) - 1), label="index"))
        elif action == "replay":
            ready = [i for i in (0, 1) if delivered[i]]
            if ready:
                to = data.draw(st.sampled_from(ready), label="replay to")
                message = data.draw(st.sampled_from(delivered[to]), label="replayed")
                expect_refusal(sides[to], message)
        else:
            ready = [i for i in (0, 1) if in_flight[i]]
            if ready:
                to = data.draw(st.sampled_from(ready), label="tamper to")
                _, message = data.draw(st.sampled_from(in_flight[to]), label="tampered")
                position = data.draw(st.integers(0, len(message) - 1), label="position")
                flip = data.draw(st.integers(1, 255), label="flip")
                forged = (
                    message[:position] + bytes([message[position] ^ flip]) + message[position + 1 :]
                )
                expect_refusal(sides[to], forged)
        for i, side in enumerate(sides):
            if not is_reference(side) and data.draw(st.booleans(), label="serialise"):
                sides[i] = type(side).from_bytes(side.to_bytes())

    for to in (0, 1):
        while in_flight[to]:
            deliver(to, data.draw(st.integers(0, len(in_flight[to]) - 1), label="final index"))


def is_reference(side: object) -> bool:
    return isinstance(side, ReferenceRatchet | ReferenceSession)


def expect_refusal(side: Any, message: bytes) -> None:
    before = snapshot(side)
    with pytest.raises((ReferenceCryptoError, errors.CryptoError)):
        side.decrypt(message)
    assert snapshot(side) == before


def snapshot(side: Any) -> object:
    if isinstance(side, ReferenceSession):
        return side.answered, snapshot(side.ratchet)
    if isinstance(side, ReferenceRatchet):
        return dict(side.__dict__, mkskipped=dict(side.mkskipped))
    return side.to_bytes()
