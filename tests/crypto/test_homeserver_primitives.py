"""The homeserver's Ed25519 and Argon2id from ``teia._native`` against the `cryptography`
package, which computed them before issue 10's memory work: hashes and signing keys stored then
must keep working, and both sides must agree on every signature.

Random inputs and parameters (hypothesis), RFC 9106's Argon2id vector (secret and associated
data are not exposed to Python; the cargo test checks the full vector, this one the PHC strings
cryptography wrote), and the PHC codec of `teia.homeserver.passwords` both ways.
"""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from hypothesis import given, settings
from hypothesis import strategies as st

from teia import _native as native
from teia import errors
from teia.homeserver.keys import SigningKey, VerifyKey
from teia.homeserver.passwords import hash_password, verify_password

argon2_params = st.tuples(
    st.integers(1, 4),  # lanes
    st.integers(0, 64),  # extra KiB above the 8 per lane minimum
    st.integers(1, 3),  # iterations
    st.integers(4, 80),  # output length
)


@settings(max_examples=60, deadline=None)
@given(
    password=st.binary(max_size=80),
    salt=st.binary(min_size=8, max_size=40),
    params=argon2_params,
)
def test_argon2id_matches_cryptography(
    password: bytes, salt: bytes, params: tuple[int, int, int, int]
) -> None:
    lanes, extra, iterations, length = params
    memory = 8 * lanes + extra
    theirs = Argon2id(
        salt=salt, length=length, iterations=iterations, lanes=lanes, memory_cost=memory
    ).derive(password)
    assert native.argon2id(password, salt, memory, iterations, lanes, length) == theirs


def test_argon2id_at_the_homeserver_cost_matches_cryptography() -> None:
    salt, password = b"0123456789abcdef", b"correct horse battery staple"
    theirs = Argon2id(salt=salt, length=32, iterations=3, lanes=4, memory_cost=65_536).derive(
        password
    )
    assert native.argon2id(password, salt, 65_536, 3, 4, 32) == theirs


def test_argon2id_rfc9106_vector_through_cryptography() -> None:
    # RFC 9106 §5.3 needs a secret and associated data: cryptography computes it, and the same
    # function without them is what the cross-check above compares
    tag = Argon2id(
        salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32,
        ad=b"\x04" * 12, secret=b"\x03" * 8,
    ).derive(b"\x01" * 32)  # fmt: skip
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


@pytest.mark.parametrize(
    ("salt", "memory", "iterations", "lanes", "length"),
    [
        (b"short", 64, 1, 1, 32),
        (b"saltsalt", 64, 0, 1, 32),
        (b"saltsalt", 64, 1, 0, 32),
        (b"saltsalt", 64, 1, 1, 3),
        (b"saltsalt", 7, 1, 1, 32),
    ],
)
def test_argon2id_out_of_range_is_a_value_error(
    salt: bytes, memory: int, iterations: int, lanes: int, length: int
) -> None:
    with pytest.raises(ValueError, match="Argon2id"):
        native.argon2id(b"pw", salt, memory, iterations, lanes, length)


@settings(max_examples=10, deadline=None)
@given(password=st.binary(max_size=40), lanes=st.integers(1, 4), iterations=st.integers(1, 3))
def test_phc_strings_of_cryptography_verify_and_ours_verify_there(
    password: bytes, lanes: int, iterations: int
) -> None:
    memory = 8 * lanes + 16
    stored = Argon2id(
        salt=b"sixteen byte slt", length=32, iterations=iterations, lanes=lanes,
        memory_cost=memory,
    ).derive_phc_encoded(password)  # fmt: skip
    assert verify_password(password, stored)
    assert not verify_password(password + b"x", stored)
    ours = hash_password(password, memory_kib=memory, iterations=iterations, lanes=lanes)
    Argon2id.verify_phc_encoded(password, ours)  # raises if it does not match


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain",
        "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "$argon2id$v=16$m=64,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdA$AAAAAAAAAAAAAAAAAAAAAA",  # 4-byte salt
        "$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "$argon2id$v=19$m=9999999999,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA",  # 9.3 TiB
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$AAA",  # 2-byte hash
        "$argon2id$v=19$m=64,t=1,p=1$c2Fsd!NhbHQ$AAAAAAAAAAAAAAAAAAAAAA",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\n",
    ],
)
def test_malformed_or_costly_phc_strings_do_not_verify(encoded: str) -> None:
    assert not verify_password(b"pw", encoded)


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=200))
def test_ed25519_agrees_with_cryptography(seed: bytes, message: bytes) -> None:
    theirs = Ed25519PrivateKey.from_private_bytes(seed)
    public = native.ed25519_public_key(seed)
    assert public == theirs.public_key().public_bytes_raw()
    signature = native.ed25519_sign(seed, message)
    assert signature == theirs.sign(message)  # RFC 8032 signatures are deterministic
    Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    assert native.ed25519_verify(public, message, theirs.sign(message))
    assert not native.ed25519_verify(public, message + b"!", signature)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not native.ed25519_verify(public, message, tampered)
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(public).verify(tampered, message)


def test_ed25519_malformed_input() -> None:
    with pytest.raises(errors.InvalidKey):
        native.ed25519_sign(b"\x00" * 31, b"m")
    with pytest.raises(errors.InvalidKey):
        native.ed25519_public_key(b"\x00" * 33)
    signature = native.ed25519_sign(b"\x01" * 32, b"m")
    public = native.ed25519_public_key(b"\x01" * 32)
    assert not native.ed25519_verify(public[:31], b"m", signature)
    assert not native.ed25519_verify(public, b"m", signature[:63])
    assert not native.ed25519_verify(b"\x01" + b"\x00" * 31, b"m", signature)  # the identity


def test_a_signing_key_file_written_before_keeps_its_public_key() -> None:
    theirs = Ed25519PrivateKey.generate()
    line = SigningKey("ed25519:abc", theirs.private_bytes_raw()).to_line()
    key = SigningKey.from_line(line)
    assert key.public.raw == theirs.public_key().public_bytes_raw()
    assert repr(theirs.private_bytes_raw()) not in repr(key)
    assert VerifyKey(key.public.raw).verify(theirs.sign(b"x"), b"x")
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKey(b"\x00" * 31)
