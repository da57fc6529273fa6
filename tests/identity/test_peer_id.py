"""libp2p keys and peer IDs: spec vectors, round trips, and malformed input."""

from __future__ import annotations

import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidKeyEncoding, InvalidPeerId
from teia.identity import Identity, KeyType, PeerId, base58, verify
from teia.identity.keys import (
    decode_private_key,
    decode_public_key,
    encode_private_key,
    encode_public_key,
)

# libp2p/specs peer-ids/peer-ids.md, "Test vectors": Ed25519 private and public key protobufs.
SPEC_ED25519_PRIVATE = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_ED25519_PUBLIC = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_SECP256K1_PUBLIC = bytes.fromhex(
    "08021221037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"
)
SPEC_ECDSA_PUBLIC = bytes.fromhex(
    "0803125b3059301306072a8648ce3d020106082a8648ce3d030107034200"
    "04de3d300fa36ae0e8f5d530899d83abab44abf3161f162a4bc901d8e6ecda020e"
    "8b6d5f8da30525e71d6851510c098e5c47c646a597fb4dcec034e9f77c409e62"
)

# libp2p/specs tls/tls.md, "Test vectors" 1-3: the host keys inside the certificates and the
# peer IDs the spec says they authenticate.
TLS_VECTORS = [
    (
        "08011220a77f1d92fedb59dddaea5a1c4abd1ac2fbde7d7b879ed364501809923d7c11b9",
        "12D3KooWM6CgA9iBFZmcYAHA6A2qvbAxqfkmrYiRQuz3XEsk4Ksv",
    ),
    (
        "0803125b3059301306072a8648ce3d020106082a8648ce3d03010703420004bf30511f909414ebdd"
        "3242178fd290f093a551cf75c973155de0bb5a96fedf6cb5d52da7563e794b512f66e60c7f55ba8a3a"
        "cf3dd72a801980d205e8a1ad29f2",
        "QmfXbAwNjJLXfesgztEHe8HwgVDCMMpZ9Eax1HYq6hn9uE",
    ),
    (
        "080212210206dc6968726765b820f050263ececf7f71e4955892776c0970542efd689d2382",
        "16Uiu2HAkutTMoTzDw1tCvSRtu6YoixJwS46S1ZFxW8hSx9fWHiPs",
    ),
]

# libp2p/specs peer-ids/peer-ids.md, "String representation" examples: the CID and the raw
# base58 form name the same (sha256) peer.
SPEC_CID = "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe"
SPEC_SHA256_B58 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
SPEC_ED25519_B58 = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


# --- key encodings ------------------------------------------------------------------------


def test_spec_ed25519_private_key_derives_the_spec_public_key() -> None:
    identity = Identity.from_private_key_protobuf(SPEC_ED25519_PRIVATE)
    assert identity.public_key_protobuf == SPEC_ED25519_PUBLIC
    assert identity.private_seed == SPEC_ED25519_PRIVATE[4:36]
    assert identity.to_private_key_protobuf() == SPEC_ED25519_PRIVATE
    assert decode_public_key(SPEC_ED25519_PUBLIC) == (KeyType.ED25519, SPEC_ED25519_PUBLIC[4:])


def test_legacy_96_byte_private_key_is_accepted_when_consistent() -> None:
    seed_and_public = SPEC_ED25519_PRIVATE[4:]
    legacy = b"\x08\x01\x12\x60" + seed_and_public + seed_and_public[32:]
    assert decode_private_key(legacy) == seed_and_public[:32]
    tampered = legacy[:-1] + bytes([legacy[-1] ^ 1])
    with pytest.raises(InvalidKeyEncoding, match="public halves differ"):
        decode_private_key(tampered)


def test_private_key_with_wrong_public_half_is_refused() -> None:
    bad = SPEC_ED25519_PRIVATE[:-1] + bytes([SPEC_ED25519_PRIVATE[-1] ^ 1])
    with pytest.raises(InvalidKeyEncoding, match="does not match the seed"):
        decode_private_key(bad)


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ("", "must start with the Type field"),
        ("1220" + "00" * 32, "must start with the Type field"),
        ("0801", "Data field"),
        ("08011220" + "00" * 31, "truncated"),
        ("08011220" + "00" * 33, "trailing"),
        ("0801122100" + "00" * 32, "not 32"),
        ("08041201" + "00", "unknown key type"),
        ("0881001220" + "00" * 32, "not minimally encoded"),
        ("12200801" + "00" * 32, "must start with the Type field"),
    ],
)
def test_public_key_protobuf_must_be_canonical(encoded: str, message: str) -> None:
    with pytest.raises(InvalidKeyEncoding, match=message):
        decode_public_key(bytes.fromhex(encoded))


def test_encode_public_key_checks_ed25519_size() -> None:
    with pytest.raises(InvalidKeyEncoding):
        encode_public_key(b"\x01" * 31)
    assert encode_public_key(SPEC_SECP256K1_PUBLIC[4:], KeyType.SECP256K1) == SPEC_SECP256K1_PUBLIC


def test_encode_private_key_round_trip() -> None:
    seed = bytes(range(32))
    assert decode_private_key(encode_private_key(seed)) == seed
    with pytest.raises(InvalidKeyEncoding):
        encode_private_key(seed[:31])


# --- peer IDs: known answers ----------------------------------------------------------------


@pytest.mark.parametrize(("protobuf", "expected"), TLS_VECTORS)
def test_tls_spec_vectors(protobuf: str, expected: str) -> None:
    peer_id = PeerId.from_public_key_protobuf(bytes.fromhex(protobuf))
    assert str(peer_id) == expected
    assert PeerId.from_string(expected) == peer_id


def test_tls_spec_ed25519_vector_from_raw_key() -> None:
    protobuf, expected = TLS_VECTORS[0]
    peer_id = PeerId.from_public_key(bytes.fromhex(protobuf)[4:])
    assert str(peer_id) == expected
    assert peer_id.public_key == bytes.fromhex(protobuf)[4:]
    assert peer_id.key_type is KeyType.ED25519
    # identity multihash: code 0x00, length 36, then the protobuf itself
    assert peer_id.to_bytes() == b"\x00\x24" + bytes.fromhex(protobuf)


def test_spec_ecdsa_key_is_hashed_with_sha256() -> None:
    peer_id = PeerId.from_public_key_protobuf(SPEC_ECDSA_PUBLIC)
    assert len(SPEC_ECDSA_PUBLIC) > 42
    assert peer_id.to_bytes() == b"\x12\x20" + hashlib.sha256(SPEC_ECDSA_PUBLIC).digest()
    assert str(peer_id).startswith("Qm")
    assert peer_id.public_key is None
    assert peer_id.key_type is None


def test_spec_secp256k1_key_is_inlined_but_has_no_ed25519_key() -> None:
    peer_id = PeerId.from_public_key_protobuf(SPEC_SECP256K1_PUBLIC)
    assert peer_id.to_bytes()[:2] == b"\x00\x25"
    assert str(peer_id).startswith("16Uiu2")
    assert peer_id.key_type is KeyType.SECP256K1
    assert peer_id.public_key is None


def test_spec_string_examples() -> None:
    from_cid = PeerId.from_string(SPEC_CID)
    assert from_cid == PeerId.from_string(SPEC_SHA256_B58)
    assert str(from_cid) == SPEC_SHA256_B58
    assert from_cid.to_cid() == SPEC_CID
    ed = PeerId.from_string(SPEC_ED25519_B58)
    assert str(ed) == SPEC_ED25519_B58
    assert ed.public_key is not None
    assert PeerId.from_public_key(ed.public_key) == ed
    assert PeerId.from_string(ed.to_cid()) == ed
    assert ed.to_cid().startswith("bafzaa")


def test_cid_in_other_multibases() -> None:
    peer_id = PeerId.from_string(SPEC_CID)
    cid_bytes = b"\x01\x72" + peer_id.to_bytes()
    assert PeerId.from_string("z" + base58.encode(cid_bytes)) == peer_id
    assert PeerId.from_string(SPEC_CID.upper().replace("B", "B", 1)) == peer_id
    number = int.from_bytes(cid_bytes, "big")
    digits = ""
    while number:
        number, digit = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
    assert PeerId.from_string("k" + digits) == peer_id


# --- peer IDs: properties -------------------------------------------------------------------


seeds = st.binary(min_size=32, max_size=32)


@given(seeds)
def test_round_trips(seed: bytes) -> None:
    identity = Identity.from_seed(seed)
    peer_id = identity.peer_id
    assert str(peer_id).startswith("12D3KooW")
    assert PeerId.from_string(str(peer_id)) == peer_id
    assert PeerId.from_string(peer_id.to_cid()) == peer_id
    assert PeerId.from_bytes(peer_id.to_bytes()) == peer_id
    assert PeerId.from_public_key(identity.public_key) == peer_id
    assert peer_id.public_key == identity.public_key
    assert hash(PeerId.from_bytes(peer_id.to_bytes())) == hash(peer_id)
    assert pickle.loads(pickle.dumps(peer_id)) == peer_id


@given(st.binary(min_size=1, max_size=200))
def test_sha256_ids_round_trip(key_data: bytes) -> None:
    protobuf = encode_public_key(key_data, KeyType.RSA)
    peer_id = PeerId.from_public_key_protobuf(protobuf)
    assert PeerId.from_string(str(peer_id)) == peer_id
    assert PeerId.from_string(peer_id.to_cid()) == peer_id


@given(st.binary(max_size=60))
def test_garbage_bytes_raise_only_invalid_peer_id(data: bytes) -> None:
    try:
        peer_id = PeerId.from_bytes(data)
    except InvalidPeerId:
        return
    assert peer_id.to_bytes() == data


@given(st.text(max_size=80))
def test_garbage_text_raises_only_invalid_peer_id(text: str) -> None:
    try:
        peer_id = PeerId.from_string(text)
    except InvalidPeerId:
        return
    assert PeerId.from_string(str(peer_id)) == peer_id


@given(seeds, st.data())
def test_every_truncation_is_refused(seed: bytes, data: st.DataObject) -> None:
    raw = Identity.from_seed(seed).peer_id.to_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(InvalidPeerId):
        PeerId.from_bytes(raw[:cut])
    text = str(Identity.from_seed(seed).peer_id)
    with pytest.raises(InvalidPeerId):
        PeerId.from_string(text[: data.draw(st.integers(min_value=0, max_value=len(text) - 1))])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "empty"),
        ("00", "truncated varint"),
        ("0024" + "00" * 10, "declares a 36-byte digest"),
        ("1220" + "00" * 31, "declares a 32-byte digest"),
        ("1210" + "00" * 16, "not 32"),
        ("1320" + "00" * 32, "multihash code 0x13"),
        ("002b" + "00" * 43, "must be sha2-256 hashed"),
        ("1220" + "00" * 200, "too long"),
        ("00040801" + "1200", "does not inline a valid public key"),
        ("0025080112210000" + "00" * 31, "does not inline a valid public key"),
        ("8000" + "1220" + "00" * 32, "not minimally encoded"),
    ],
)
def test_malformed_bytes(data: str, message: str) -> None:
    with pytest.raises(InvalidPeerId, match=message):
        PeerId.from_bytes(bytes.fromhex(data))


def test_identity_multihash_over_42_bytes_is_refused() -> None:
    protobuf = encode_public_key(b"\x01" * 40, KeyType.RSA)  # 44 bytes: must be hashed
    with pytest.raises(InvalidPeerId, match="must be sha2-256 hashed"):
        PeerId.from_bytes(bytes([0, len(protobuf)]) + protobuf)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("12D3KooW0000", "not valid base58btc"),
        ("x" * 200, "too long"),
        ("b", "nothing after"),
        ("bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxE", "mixes upper and lower"),
        ("bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqx1", "not valid base32"),
        ("bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxf", "not canonical"),
        # CIDv1 dag-pb (codec 0x70) of the same multihash: a file, not a peer
        ("bafybeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe", "not libp2p-key"),
        ("xyz", "neither base58btc"),
        ("k!", "invalid base36"),
    ],
)
def test_malformed_text(text: str, message: str) -> None:
    with pytest.raises(InvalidPeerId, match=message):
        PeerId.from_string(text)


def test_cid_version_must_be_1() -> None:
    peer_id = PeerId.from_string(SPEC_CID)
    cid0ish = b"\x02\x72" + peer_id.to_bytes()
    with pytest.raises(InvalidPeerId, match="only CIDv1"):
        PeerId.from_string("z" + base58.encode(cid0ish))


def test_from_public_key_accepts_only_32_byte_ed25519_keys() -> None:
    with pytest.raises(InvalidPeerId, match="32 bytes"):
        PeerId.from_public_key(b"\x01" * 33)


def test_from_string_rejects_non_str() -> None:
    with pytest.raises(InvalidPeerId):
        PeerId.from_string(b"12D3KooW")  # type: ignore[arg-type]


def test_peer_id_is_immutable_and_compares_by_value() -> None:
    peer_id = PeerId.from_string(SPEC_ED25519_B58)
    with pytest.raises(AttributeError):
        peer_id._bytes = b""
    assert peer_id != PeerId.from_string(SPEC_SHA256_B58)
    assert peer_id != str(peer_id)
    assert repr(peer_id) == f"PeerId({SPEC_ED25519_B58!r})"
    assert len({peer_id, PeerId.from_string(peer_id.to_cid())}) == 1


# --- identities -----------------------------------------------------------------------------


def test_generate_gives_distinct_identities() -> None:
    first, second = Identity.generate(), Identity.generate()
    assert first != second
    assert first.peer_id != second.peer_id
    assert len(first.private_seed) == 32
    assert len(first.public_key) == 32


def test_from_seed_is_deterministic_and_checks_size() -> None:
    seed = bytes(range(32))
    assert Identity.from_seed(seed) == Identity.from_seed(seed)
    assert Identity.from_seed(seed).private_seed == seed
    for bad in (b"", seed[:31], seed + b"\0"):
        with pytest.raises(InvalidKeyEncoding):
            Identity.from_seed(bad)


@given(seeds, st.binary(max_size=200))
def test_sign_and_verify(seed: bytes, message: bytes) -> None:
    identity = Identity.from_seed(seed)
    signature = identity.sign(message)
    assert len(signature) == 64
    assert verify(identity.public_key, message, signature)
    assert not verify(identity.public_key, message + b"x", signature)
    assert not verify(identity.public_key, message, signature[:-1] + bytes([signature[-1] ^ 1]))
    other = Identity.from_seed(bytes(31) + b"\x01")
    assert not verify(other.public_key, message, signature)


def test_verify_rejects_wrong_sizes_without_raising() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"m")
    assert not verify(identity.public_key[:31], b"m", signature)
    assert not verify(identity.public_key, b"m", signature[:63])
    assert not verify(b"", b"m", b"")


def test_private_key_object_matches() -> None:
    identity = Identity.generate()
    assert identity.private_key.sign(b"m") == identity.sign(b"m")  # Ed25519 is deterministic


def test_repr_never_shows_secrets() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    text = repr(identity) + str(identity)
    assert str(identity.peer_id) in text
    for secret in (identity.private_seed, identity.to_private_key_protobuf()):
        assert secret.hex() not in text
        assert repr(secret) not in text


def test_identity_refuses_pickling() -> None:
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(Identity.generate())


def test_identity_constructor_type_checks() -> None:
    with pytest.raises(TypeError):
        Identity(b"\0" * 32)  # type: ignore[arg-type]
