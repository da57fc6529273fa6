"""libp2p TLS 1.3 peer authentication: the self-signed certificate with the public-key extension.

Spec: libp2p/specs `tls/tls.md`. A host never signs its certificate with its host key. It makes an
ephemeral certificate key, and proves it owns the host key by putting a SignedKey into the
extension 1.3.6.1.4.1.53594.1.1::

    SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }

where ``publicKey`` is the protobuf ``PublicKey{Type = 1; Data = 2}`` of the host key and
``signature`` is the host key's signature over ``"libp2p-tls-handshake:" || SPKI-DER`` of the
certificate key. Verifying a peer's certificate yields its host key, hence its peer ID.

Only Ed25519 host keys are accepted (every teia peer has one; others are refused with
`UnsupportedKeyType`). The certificate key may be any type `cryptography` verifies; we make
ECDSA P-256 ones, which every libp2p implementation accepts.

Everything here is pure: the clock is an argument.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptographyInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtensionOID, NameOID

from teia.errors import InvalidCertificate, InvalidSignedKey, UnsupportedKeyType
from teia.identity import PeerId

__all__ = [
    "ALPN",
    "EXTENSION_OID",
    "MAX_SIGNED_KEY_SIZE",
    "SIGNATURE_PREFIX",
    "CertifiedKey",
    "SignedKey",
    "VerifiedPeer",
    "generate_certificate",
    "host_key_protobuf",
    "peer_id_of",
    "verify_certificate_chain",
]

ALPN = "libp2p"
EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNATURE_PREFIX = b"libp2p-tls-handshake:"

# A SignedKey holding an Ed25519 host key is 2 + 2 + 36 + 2 + 64 = 106 bytes; RSA-4096 host keys
# (which we refuse, but must parse far enough to say so) stay well under this.
MAX_SIGNED_KEY_SIZE = 4096

# Some implementations set these; none of them changes how a libp2p certificate is verified,
# so a critical one is understood. Any other critical extension aborts the handshake.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        EXTENSION_OID,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)

# Clock skew tolerated by peers checking our NotBefore.
_BACKDATE = dt.timedelta(hours=1)
# The certificate key is ephemeral and never stored; a long window only avoids expiry while a
# node runs. Other implementations use about the same.
DEFAULT_VALIDITY = dt.timedelta(days=365 * 100)

_ED25519_KEY_TYPE = 1
_ED25519_PROTOBUF_PREFIX = b"\x12\x20"  # field 2 (Data), wire type 2, length 32

_TAG_SEQUENCE = 0x30
_TAG_OCTET_STRING = 0x04


# --- DER (just what SignedKey and the TBSCertificate walk need) ---------------------------------


def _read_tlv(data: bytes, offset: int, end: int) -> tuple[int, int, int]:
    """Read one DER TLV at ``offset``; return (tag, value start, value end). Strict DER only."""
    if offset >= end:
        raise InvalidSignedKey("DER: truncated (expected a tag)")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise InvalidSignedKey("DER: high-tag-number form is not used here")
    offset += 1
    if offset >= end:
        raise InvalidSignedKey("DER: truncated (expected a length)")
    first = data[offset]
    offset += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise InvalidSignedKey("DER: indefinite length is not allowed")
    else:
        count = first & 0x7F
        if count > 4:
            raise InvalidSignedKey("DER: length field too long")
        if offset + count > end:
            raise InvalidSignedKey("DER: truncated length")
        raw = data[offset : offset + count]
        if raw[0] == 0:
            raise InvalidSignedKey("DER: non-minimal length (leading zero)")
        length = int.from_bytes(raw, "big")
        if length < 0x80:
            raise InvalidSignedKey("DER: non-minimal length (long form for a short value)")
        offset += count
    if length > end - offset:
        raise InvalidSignedKey("DER: value runs past the end of its container")
    return tag, offset, offset + length


def _encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _encode_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _encode_length(len(value)) + value


@dataclass(frozen=True, slots=True)
class SignedKey:
    """The value of the libp2p public-key extension."""

    public_key: bytes
    """The host key as a protobuf ``PublicKey`` message."""
    signature: bytes
    """The host key's signature over `SIGNATURE_PREFIX` and the certificate key's SPKI DER."""

    def to_der(self) -> bytes:
        body = _encode_tlv(_TAG_OCTET_STRING, self.public_key) + _encode_tlv(
            _TAG_OCTET_STRING, self.signature
        )
        encoded = _encode_tlv(_TAG_SEQUENCE, body)
        if len(encoded) > MAX_SIGNED_KEY_SIZE:
            raise InvalidSignedKey(f"SignedKey of {len(encoded)} bytes is over the limit")
        return encoded

    @classmethod
    def from_der(cls, data: bytes) -> SignedKey:
        """Parse exactly one DER SignedKey; anything else raises `InvalidSignedKey`."""
        if len(data) > MAX_SIGNED_KEY_SIZE:
            raise InvalidSignedKey(
                f"SignedKey of {len(data)} bytes is over the {MAX_SIGNED_KEY_SIZE}-byte limit"
            )
        tag, start, end = _read_tlv(data, 0, len(data))
        if tag != _TAG_SEQUENCE:
            raise InvalidSignedKey("SignedKey: expected a SEQUENCE")
        if end != len(data):
            raise InvalidSignedKey("SignedKey: trailing bytes after the SEQUENCE")
        fields: list[bytes] = []
        offset = start
        while offset < end:
            if len(fields) == 2:
                raise InvalidSignedKey("SignedKey: more than two fields")
            tag, value_start, value_end = _read_tlv(data, offset, end)
            if tag != _TAG_OCTET_STRING:
                raise InvalidSignedKey("SignedKey: fields must be OCTET STRINGs")
            fields.append(bytes(data[value_start:value_end]))
            offset = value_end
        if len(fields) != 2:
            raise InvalidSignedKey("SignedKey: expected publicKey and signature")
        return cls(public_key=fields[0], signature=fields[1])


def _subject_public_key_info(tbs_certificate: bytes) -> bytes:
    """The exact SubjectPublicKeyInfo DER bytes inside a TBSCertificate.

    The host key signed these bytes as sent; re-serialising the parsed key could differ (for
    instance a compressed EC point), so we take them verbatim.
    """
    try:
        tag, start, end = _read_tlv(tbs_certificate, 0, len(tbs_certificate))
        if tag != _TAG_SEQUENCE:
            raise InvalidCertificate("TBSCertificate is not a SEQUENCE")
        offset = start
        tag, _, value_end = _read_tlv(tbs_certificate, offset, end)
        if tag == 0xA0:  # [0] EXPLICIT version
            offset = value_end
        # serialNumber, signature, issuer, validity, subject — then subjectPublicKeyInfo.
        for _ in range(5):
            _, _, offset = _read_tlv(tbs_certificate, offset, end)
        tag, _, value_end = _read_tlv(tbs_certificate, offset, end)
    except InvalidSignedKey as exc:
        raise InvalidCertificate(f"certificate structure: {exc}") from exc
    if tag != _TAG_SEQUENCE:
        raise InvalidCertificate("certificate has no SubjectPublicKeyInfo where expected")
    return tbs_certificate[offset:value_end]


# --- host keys and peer IDs -------------------------------------------------------------------


def _encode_host_key(public_key: ed25519.Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bytes([0x08, _ED25519_KEY_TYPE]) + _ED25519_PROTOBUF_PREFIX + raw


def host_key_protobuf(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """The host key as libp2p's protobuf ``PublicKey`` (what identify and peer IDs carry)."""
    return _encode_host_key(public_key)


def _decode_host_key(encoded: bytes) -> ed25519.Ed25519PublicKey:
    """Decode a protobuf PublicKey, accepting only the canonical Ed25519 form.

    libp2p requires deterministic protobuf here (it is hashed into the peer ID), so a
    reordered or padded encoding is malformed, not merely unusual.
    """
    if len(encoded) < 2 or encoded[0] != 0x08:
        raise InvalidSignedKey("host key: protobuf must start with the Type field")
    key_type = encoded[1]
    if key_type & 0x80:
        raise InvalidSignedKey("host key: Type is not a known key type")
    if key_type != _ED25519_KEY_TYPE:
        names = {0: "RSA", 2: "Secp256k1", 3: "ECDSA"}
        name = names.get(key_type, f"type {key_type}")
        raise UnsupportedKeyType(f"peer's host key is {name}; teia accepts only Ed25519 host keys")
    body = encoded[2:]
    if len(body) != 34 or not body.startswith(_ED25519_PROTOBUF_PREFIX):
        raise InvalidSignedKey("host key: Ed25519 key must be exactly 32 bytes, canonical form")
    return ed25519.Ed25519PublicKey.from_public_bytes(body[2:])


def peer_id_of(public_key: ed25519.Ed25519PublicKey) -> PeerId:
    """The peer ID of an Ed25519 host key (`teia.identity.PeerId` does the derivation)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PeerId.from_public_key(raw)


# --- our certificate ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A libp2p certificate and the ephemeral private key it was issued for."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def generate_certificate(
    host_key: ed25519.Ed25519PrivateKey,
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> CertifiedKey:
    """Make a fresh self-signed certificate for ``host_key`` (ECDSA P-256 certificate key)."""
    cert_key = ec.generate_private_key(ec.SECP256R1())
    spki = cert_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed = SignedKey(
        public_key=_encode_host_key(host_key.public_key()),
        signature=host_key.sign(SIGNATURE_PREFIX + spki),
    )
    # The name carries nothing: peers identify each other by the extension alone.
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8))])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(cert_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, signed.to_der()), critical=True)
        .sign(cert_key, hashes.SHA256())
    )
    return CertifiedKey(certificate=certificate, private_key=cert_key)


# --- verifying theirs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """What a verified certificate proves: the remote host key and its peer ID."""

    public_key: ed25519.Ed25519PublicKey
    peer_id: PeerId
    """The peer ID the host key derives (an identity multihash of its protobuf)."""


def verify_certificate_chain(
    chain: Sequence[x509.Certificate | bytes], *, now: dt.datetime
) -> VerifiedPeer:
    """Verify a peer's libp2p certificate chain at time ``now``; return who they are.

    Raises `InvalidCertificate` (or its subclasses `InvalidSignedKey`, `UnsupportedKeyType`) for
    every way a chain can fail the libp2p TLS rules.
    """
    if len(chain) != 1:
        raise InvalidCertificate(
            f"peer sent {len(chain)} certificates; libp2p requires exactly one"
        )
    certificate = chain[0]
    if isinstance(certificate, bytes):
        try:
            certificate = x509.load_der_x509_certificate(certificate)
        except ValueError as exc:
            raise InvalidCertificate(f"certificate does not parse: {exc}") from exc

    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if now < certificate.not_valid_before_utc:
        raise InvalidCertificate("certificate is not valid yet (check the clocks)")
    if now > certificate.not_valid_after_utc:
        raise InvalidCertificate("certificate has expired")

    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, _CryptographyInvalidSignature) as exc:
        raise InvalidCertificate(f"certificate self-signature is not valid: {exc}") from exc

    try:
        extensions = list(certificate.extensions)
    except ValueError as exc:  # duplicate or malformed known extensions
        raise InvalidCertificate(f"certificate extensions do not parse: {exc}") from exc
    signed_key_der: bytes | None = None
    for extension in extensions:
        if extension.oid == EXTENSION_OID:
            value = extension.value
            if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover
                raise InvalidCertificate("libp2p extension has an unexpected form")
            signed_key_der = value.value
        elif extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            raise InvalidCertificate(
                f"certificate has a critical extension we do not understand ({extension.oid})"
            )
        elif extension.oid == ExtensionOID.KEY_USAGE:
            usage = extension.value
            if isinstance(usage, x509.KeyUsage) and not usage.digital_signature:
                raise InvalidCertificate("certificate key may not be used for signatures")
    if signed_key_der is None:
        raise InvalidCertificate("certificate lacks the libp2p public-key extension")

    signed = SignedKey.from_der(signed_key_der)
    host_key = _decode_host_key(signed.public_key)
    spki = _subject_public_key_info(certificate.tbs_certificate_bytes)
    try:
        host_key.verify(signed.signature, SIGNATURE_PREFIX + spki)
    except _CryptographyInvalidSignature as exc:
        raise InvalidCertificate(
            "host-key signature over the certificate key does not verify"
        ) from exc
    return VerifiedPeer(public_key=host_key, peer_id=peer_id_of(host_key))
