"""An independent, pure-Python reference of teia's end-to-end crypto (``docs/crypto.md``).

Written from the specifications, not from the Rust core: Signal's X3DH (rev. 1, 2016-11-04) and
Double Ratchet (rev. 1, 2016-11-20, §5.2 recommended cryptographic functions) with teia's
parameters. The primitives come from ``cryptography`` (OpenSSL); the Ed25519 → X25519
public-key map is computed here from the curve equations, so it does not share code with either
``cryptography`` or the Rust core.

It is deliberately plain — one function per spec function, the spec's names, no caching — so it
reads as the spec in code. It is the oracle for the known-answer and cross-check tests, and the
slow baseline in ``benchmarks/``. It is not hardened (no zeroisation, no constant-time bignum
arithmetic) and must never be used outside tests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# --- parameters (docs/crypto.md) -------------------------------------------------------------

X3DH_INFO = b"teia X3DH v1"
RATCHET_INFO = b"teia Ratchet v1"
MESSAGE_KEYS_INFO = b"teia MessageKeys v1"
ZERO_SALT = bytes(32)
X3DH_F = b"\xff" * 32  # X3DH §2.2: 32 0xFF bytes before the DH outputs for X25519
ENCODE_PREFIX = b"\x05"  # X3DH §2.5 Encode(PK): a curve-type byte, then the u-coordinate
HEADER_LEN = 32 + 4 + 4
TAG_LEN = 32
MAX_SKIP = 1000  # per chain
MAX_STORED_SKIPPED = 2000  # in all; the oldest are evicted beyond this

# Curve25519 / edwards25519 field and curve constant.
P = 2**255 - 19
D = (-121665 * pow(121666, -1, P)) % P


class ReferenceCryptoError(Exception):
    """Any failure of the reference: bad key, bad signature, bad or replayed message."""


class ReferenceDuplicateMessage(ReferenceCryptoError):
    """A message whose key was already used (or never existed on this chain)."""


class ReferenceTooManySkipped(ReferenceCryptoError):
    """A message that would skip more than MAX_SKIP keys on one chain."""


# --- primitives -------------------------------------------------------------------------------


def x25519(private_key: bytes, public_key: bytes) -> bytes:
    """X25519 (RFC 7748) of a 32-byte scalar and a u-coordinate; all-zero outputs are refused."""
    try:
        out = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(public_key)
        )
    except ValueError as exc:  # OpenSSL refuses the all-zero (non-contributory) result
        raise ReferenceCryptoError("low-order X25519 public key") from exc
    if out == bytes(32):
        raise ReferenceCryptoError("low-order X25519 public key")
    return out


def x25519_public_key(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def x25519_keypair() -> tuple[bytes, bytes]:
    private = os.urandom(32)
    return private, x25519_public_key(private)


def ed25519_public_key(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(message)


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except Exception as exc:  # InvalidSignature, or a public key that does not decode
        raise ReferenceCryptoError("bad Ed25519 signature") from exc


def clamp(scalar: bytes) -> bytes:
    """RFC 7748 §5 decodeScalar25519's bit twiddling, as bytes."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def ed25519_seed_to_x25519(seed: bytes) -> bytes:
    """RFC 8032 §5.1.5: the secret scalar is the low half of SHA-512(seed), clamped on use."""
    return hashlib.sha512(seed).digest()[:32]


def ed25519_public_to_x25519(public_key: bytes) -> bytes:
    """The birational map of RFC 7748 §4.1: u = (1 + y) / (1 - y) mod p.

    Refuses encodings that are not a point of edwards25519 (y ≥ p, or no x for this y) and the
    identity's y = 1, for which u is undefined.
    """
    if len(public_key) != 32:
        raise ReferenceCryptoError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if y >= P:
        raise ReferenceCryptoError("non-canonical Ed25519 public key")
    # -x² + y² = 1 + d·x²·y²  ⇒  x² = (y² - 1) / (d·y² + 1); a point needs x² to be a square.
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 != 0 and pow(x2, (P - 1) // 2, P) != 1:
        raise ReferenceCryptoError("Ed25519 public key is not on the curve")
    if y == 1:
        raise ReferenceCryptoError("Ed25519 identity point has no Montgomery form")
    u = (1 + y) * pow(1 - y, -1, P) % P
    return u.to_bytes(32, "little")


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# --- Double Ratchet §5.2 ------------------------------------------------------------------------


def kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    """KDF_RK(rk, dh_out) → (root key, chain key)."""
    out = hkdf_sha256(root_key, dh_output, RATCHET_INFO, 64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK(ck) → (chain key, message key): HMAC with constant inputs 0x02 and 0x01."""
    return hmac_sha256(chain_key, b"\x02"), hmac_sha256(chain_key, b"\x01")


def message_key_material(message_key: bytes) -> tuple[bytes, bytes, bytes]:
    """ENCRYPT's HKDF of the message key → (AES-256 key, HMAC key, CBC IV)."""
    out = hkdf_sha256(ZERO_SALT, message_key, MESSAGE_KEYS_INFO, 80)
    return out[:32], out[32:64], out[64:]


def seal(message_key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ENCRYPT(mk, plaintext, ad) → AES-256-CBC(PKCS#7) ciphertext ‖ HMAC-SHA256 tag."""
    aes_key, hmac_key, iv = message_key_material(message_key)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return ciphertext + hmac_sha256(hmac_key, associated_data + ciphertext)


def open_sealed(message_key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """DECRYPT(mk, ciphertext, ad): check the tag first, then decrypt and unpad."""
    if len(sealed) < 16 + TAG_LEN or (len(sealed) - TAG_LEN) % 16:
        raise ReferenceCryptoError("sealed message has a bad length")
    ciphertext, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
    aes_key, hmac_key, iv = message_key_material(message_key)
    if not hmac.compare_digest(tag, hmac_sha256(hmac_key, associated_data + ciphertext)):
        raise ReferenceCryptoError("authentication tag does not verify")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise ReferenceCryptoError("bad padding") from exc


# --- X3DH -------------------------------------------------------------------------------------


def encode_public_key(public_key: bytes) -> bytes:
    """X3DH §2.5 Encode(PK)."""
    return ENCODE_PREFIX + public_key


def sign_prekey(identity_seed: bytes, prekey_public: bytes) -> bytes:
    """The signed prekey's signature: Ed25519(IK, Encode(SPK))."""
    return ed25519_sign(identity_seed, encode_public_key(prekey_public))


def x3dh_kdf(dh_outputs: bytes) -> bytes:
    """X3DH §2.2 KDF: HKDF(salt = zeros, IKM = F ‖ KM, info) with F = 32 bytes of 0xFF."""
    return hkdf_sha256(ZERO_SALT, X3DH_F + dh_outputs, X3DH_INFO, 32)


def x3dh_initiate(
    identity_seed: bytes,
    ephemeral_private: bytes,
    responder_identity_key: bytes,
    signed_prekey: bytes,
    signed_prekey_signature: bytes,
    one_time_prekey: bytes | None = None,
) -> bytes:
    """X3DH §3.3, Alice's side → SK. The responder's identity key is its Ed25519 public key."""
    ed25519_verify(
        responder_identity_key, signed_prekey_signature, encode_public_key(signed_prekey)
    )
    ik_a = ed25519_seed_to_x25519(identity_seed)
    ik_b = ed25519_public_to_x25519(responder_identity_key)
    dh1 = x25519(ik_a, signed_prekey)
    dh2 = x25519(ephemeral_private, ik_b)
    dh3 = x25519(ephemeral_private, signed_prekey)
    dh4 = b"" if one_time_prekey is None else x25519(ephemeral_private, one_time_prekey)
    return x3dh_kdf(dh1 + dh2 + dh3 + dh4)


def x3dh_respond(
    identity_seed: bytes,
    signed_prekey_private: bytes,
    one_time_prekey_private: bytes | None,
    initiator_identity_key: bytes,
    initiator_ephemeral_key: bytes,
) -> bytes:
    """X3DH §3.4, Bob's side → SK: the same DHs with the private halves on the other side."""
    ik_a = ed25519_public_to_x25519(initiator_identity_key)
    ik_b = ed25519_seed_to_x25519(identity_seed)
    dh1 = x25519(signed_prekey_private, ik_a)
    dh2 = x25519(ik_b, initiator_ephemeral_key)
    dh3 = x25519(signed_prekey_private, initiator_ephemeral_key)
    dh4 = (
        b""
        if one_time_prekey_private is None
        else x25519(one_time_prekey_private, initiator_ephemeral_key)
    )
    return x3dh_kdf(dh1 + dh2 + dh3 + dh4)


def x3dh_associated_data(initiator_identity_key: bytes, responder_identity_key: bytes) -> bytes:
    """AD = Encode-free IK_A ‖ IK_B: teia uses the raw 32-byte Ed25519 public keys."""
    return initiator_identity_key + responder_identity_key


# --- Double Ratchet §3 ------------------------------------------------------------------------


def make_header(ratchet_public: bytes, previous_chain_length: int, message_number: int) -> bytes:
    """HEADER(dh_pair, pn, n) = DHs public (32) ‖ PN (u32 BE) ‖ N (u32 BE)."""
    return ratchet_public + struct.pack(">II", previous_chain_length, message_number)


def parse_header(header: bytes) -> tuple[bytes, int, int]:
    pn, n = struct.unpack(">II", header[32:HEADER_LEN])
    return header[:32], pn, n


@dataclass
class ReferenceRatchet:
    """One side's Double Ratchet state, field for field as in the spec §3.2."""

    ad: bytes
    dhs_private: bytes
    dhs_public: bytes
    dhr: bytes | None
    rk: bytes
    cks: bytes | None
    ckr: bytes | None
    ns: int = 0
    nr: int = 0
    pn: int = 0
    # (ratchet public key, message number) → message key, in insertion (= age) order.
    mkskipped: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    generate_dh: Callable[[], bytes] = field(default=lambda: os.urandom(32), repr=False)

    @classmethod
    def init_initiator(
        cls,
        shared_secret: bytes,
        associated_data: bytes,
        remote_ratchet_public: bytes,
        ratchet_private: bytes | None = None,
    ) -> ReferenceRatchet:
        """RatchetInitAlice(SK, bob_dh_public_key)."""
        dhs_private = os.urandom(32) if ratchet_private is None else ratchet_private
        rk, cks = kdf_rk(shared_secret, x25519(dhs_private, remote_ratchet_public))
        return cls(
            ad=associated_data,
            dhs_private=dhs_private,
            dhs_public=x25519_public_key(dhs_private),
            dhr=remote_ratchet_public,
            rk=rk,
            cks=cks,
            ckr=None,
        )

    @classmethod
    def init_responder(
        cls, shared_secret: bytes, associated_data: bytes, ratchet_private: bytes
    ) -> ReferenceRatchet:
        """RatchetInitBob(SK, bob_dh_key_pair)."""
        return cls(
            ad=associated_data,
            dhs_private=ratchet_private,
            dhs_public=x25519_public_key(ratchet_private),
            dhr=None,
            rk=shared_secret,
            cks=None,
            ckr=None,
        )

    def encrypt(self, plaintext: bytes) -> bytes:
        """RatchetEncrypt → header ‖ ciphertext ‖ tag."""
        if self.cks is None:
            raise ReferenceCryptoError("no sending chain yet: the responder must receive first")
        self.cks, mk = kdf_ck(self.cks)
        header = make_header(self.dhs_public, self.pn, self.ns)
        self.ns += 1
        return header + seal(mk, plaintext, self.ad + header)

    def decrypt(self, message: bytes) -> bytes:
        """RatchetDecrypt; on any error the state is left as it was (spec §3.5)."""
        if len(message) < HEADER_LEN + 16 + TAG_LEN:
            raise ReferenceCryptoError("message too short")
        saved = dict(self.__dict__, mkskipped=dict(self.mkskipped))
        try:
            return self._decrypt(message)
        except BaseException:
            self.__dict__.update(saved)
            raise

    def _decrypt(self, message: bytes) -> bytes:
        header, sealed = message[:HEADER_LEN], message[HEADER_LEN:]
        dh, pn, n = parse_header(header)
        ad = self.ad + header
        mk = self.mkskipped.pop((dh, n), None)
        if mk is not None:
            return open_sealed(mk, sealed, ad)
        if dh != self.dhr:
            self._skip_message_keys(pn)
            self._dh_ratchet(dh)
        if n < self.nr:
            raise ReferenceDuplicateMessage("message key already used")
        self._skip_message_keys(n)
        assert self.ckr is not None
        self.ckr, mk = kdf_ck(self.ckr)
        self.nr += 1
        return open_sealed(mk, sealed, ad)

    def _skip_message_keys(self, until: int) -> None:
        if self.nr + MAX_SKIP < until:
            raise ReferenceTooManySkipped(f"would skip {until - self.nr} message keys")
        if self.ckr is None:
            return
        while self.nr < until:
            self.ckr, mk = kdf_ck(self.ckr)
            assert self.dhr is not None
            self.mkskipped[(self.dhr, self.nr)] = mk
            self.nr += 1
        while len(self.mkskipped) > MAX_STORED_SKIPPED:
            del self.mkskipped[next(iter(self.mkskipped))]

    def _dh_ratchet(self, remote_public: bytes) -> None:
        self.pn = self.ns
        self.ns = 0
        self.nr = 0
        self.dhr = remote_public
        self.rk, self.ckr = kdf_rk(self.rk, x25519(self.dhs_private, self.dhr))
        self.dhs_private = self.generate_dh()
        self.dhs_public = x25519_public_key(self.dhs_private)
        self.rk, self.cks = kdf_rk(self.rk, x25519(self.dhs_private, self.dhr))

    @property
    def ratchet_public_key(self) -> bytes:
        return self.dhs_public

    @property
    def skipped_message_keys(self) -> int:
        return len(self.mkskipped)


# --- teia's wire formats around X3DH (docs/crypto.md: prekey bundle, session messages) --------

FORMAT_VERSION = 1
MESSAGE_NORMAL, MESSAGE_PREKEY = 1, 2


@dataclass(frozen=True)
class ReferenceBundle:
    identity_key: bytes
    signed_prekey_id: int
    signed_prekey: bytes
    signed_prekey_signature: bytes
    one_time_prekey_id: int | None = None
    one_time_prekey: bytes | None = None

    def to_bytes(self) -> bytes:
        out = (
            bytes([FORMAT_VERSION])
            + self.identity_key
            + struct.pack(">I", self.signed_prekey_id)
            + self.signed_prekey
            + self.signed_prekey_signature
        )
        if self.one_time_prekey is None:
            return out + b"\x00"
        assert self.one_time_prekey_id is not None
        return out + b"\x01" + struct.pack(">I", self.one_time_prekey_id) + self.one_time_prekey

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceBundle:
        if (
            len(data) not in (134, 170)
            or data[0] != FORMAT_VERSION
            or data[133] != int(len(data) == 170)
        ):
            raise ReferenceCryptoError("malformed prekey bundle")
        (spk_id,) = struct.unpack(">I", data[33:37])
        bundle = cls(data[1:33], spk_id, data[37:69], data[69:133])
        if len(data) == 134:
            return bundle
        (opk_id,) = struct.unpack(">I", data[134:138])
        return replace(bundle, one_time_prekey_id=opk_id, one_time_prekey=data[138:170])


@dataclass
class ReferenceSession:
    """A pairwise session: X3DH to start, then the Double Ratchet, in teia's message framing."""

    ratchet: ReferenceRatchet
    is_initiator: bool
    # IK_A ‖ EK_A ‖ spk_id ‖ has_opk [‖ opk_id]: the clear fields of every prekey message.
    prekey_fields: bytes
    answered: bool = False

    @classmethod
    def initiate(
        cls,
        identity_seed: bytes,
        bundle: ReferenceBundle,
        ephemeral_private: bytes | None = None,
        ratchet_private: bytes | None = None,
    ) -> ReferenceSession:
        ek = os.urandom(32) if ephemeral_private is None else ephemeral_private
        sk = x3dh_initiate(
            identity_seed,
            ek,
            bundle.identity_key,
            bundle.signed_prekey,
            bundle.signed_prekey_signature,
            bundle.one_time_prekey,
        )
        ik_a = ed25519_public_key(identity_seed)
        ad = x3dh_associated_data(ik_a, bundle.identity_key)
        ratchet = ReferenceRatchet.init_initiator(sk, ad, bundle.signed_prekey, ratchet_private)
        fields = ik_a + x25519_public_key(ek) + struct.pack(">I", bundle.signed_prekey_id)
        if bundle.one_time_prekey_id is None:
            fields += b"\x00"
        else:
            fields += b"\x01" + struct.pack(">I", bundle.one_time_prekey_id)
        return cls(ratchet, is_initiator=True, prekey_fields=fields)

    @staticmethod
    def split_prekey_message(message: bytes) -> tuple[bytes, bytes]:
        """(clear fields, ratchet message) of a prekey message."""
        if len(message) < 2 + 69 or message[:2] != bytes([FORMAT_VERSION, MESSAGE_PREKEY]):
            raise ReferenceCryptoError("not a prekey message")
        end = {0: 71, 1: 75}.get(message[70])
        if end is None or len(message) < end:
            raise ReferenceCryptoError("malformed prekey message")
        return message[2:end], message[end:]

    @classmethod
    def accept(
        cls,
        identity_seed: bytes,
        signed_prekey_id: int,
        signed_prekey_private: bytes,
        one_time_prekey_id: int | None,
        one_time_prekey_private: bytes | None,
        message: bytes,
    ) -> tuple[ReferenceSession, bytes]:
        fields, _ = cls.split_prekey_message(message)
        ik_a, ek_a = fields[:32], fields[32:64]
        (spk_id,) = struct.unpack(">I", fields[64:68])
        opk_id = struct.unpack(">I", fields[69:73])[0] if fields[68] else None
        if spk_id != signed_prekey_id or opk_id != one_time_prekey_id:
            raise ReferenceCryptoError("the message names other prekeys")
        sk = x3dh_respond(identity_seed, signed_prekey_private, one_time_prekey_private, ik_a, ek_a)
        ad = x3dh_associated_data(ik_a, ed25519_public_key(identity_seed))
        ratchet = ReferenceRatchet.init_responder(sk, ad, signed_prekey_private)
        session = cls(ratchet, is_initiator=False, prekey_fields=fields)
        return session, session.decrypt(message)

    def encrypt(self, plaintext: bytes) -> bytes:
        body = self.ratchet.encrypt(plaintext)
        if self.is_initiator and not self.answered:
            return bytes([FORMAT_VERSION, MESSAGE_PREKEY]) + self.prekey_fields + body
        return bytes([FORMAT_VERSION, MESSAGE_NORMAL]) + body

    def decrypt(self, message: bytes) -> bytes:
        if message[:2] == bytes([FORMAT_VERSION, MESSAGE_NORMAL]):
            body = message[2:]
        else:
            fields, body = self.split_prekey_message(message)
            if self.is_initiator or fields != self.prekey_fields:
                raise ReferenceCryptoError("a prekey message of another session")
        plaintext = self.ratchet.decrypt(body)
        self.answered = self.answered or self.is_initiator
        return plaintext
