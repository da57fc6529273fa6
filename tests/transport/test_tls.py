"""libp2p TLS certificates: generation, verification, the spec's test vectors, the DER parser."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import InvalidCertificate, InvalidSignedKey, UnsupportedKeyType
from teia.identity import PeerId
from teia.transport import tls

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)

# libp2p/specs tls/tls.md, "Test vectors" (certificates valid 1975..4096).
VECTOR_ED25519 = bytes.fromhex(
    "308201ae30820156a0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c"
    "69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f343039363031"
    "30313133303030305a302031123010060355040a13096c69627032702e696f310a3008060355040513013130"
    "59301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9"
    "d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569e"
    "a37c307a3078060a2b0601040183a25a0101046a3068042408011220a77f1d92fedb59dddaea5a1c4abd1ac2fb"
    "de7d7b879ed364501809923d7c11b90440d90d2769db992d5e6195dbb08e706b6651e024fda6cfb8846694a435"
    "519941cac215a8207792e42849cccc6cd8136c6e4bde92a58c5e08cfd4206eb5fe0bf909300a06082a8648ce3d"
    "0403020346003043021f50f6b6c52711a881778718238f650c9fb48943ae6ee6d28427dc6071ae55e702203625"
    "f116a7a454db9c56986c82a25682f7248ea1cb764d322ea983ed36a31b77"
)
VECTOR_ED25519_PEER_ID = "12D3KooWM6CgA9iBFZmcYAHA6A2qvbAxqfkmrYiRQuz3XEsk4Ksv"

VECTOR_SECP256K1 = bytes.fromhex(
    "308201ba3082015fa0030201020204499602d2300a06082a8648ce3d040302302031123010060355040a13096c"
    "69627032702e696f310a300806035504051301313020170d3735303130313133303030305a180f343039363031"
    "30313133303030305a302031123010060355040a13096c69627032702e696f310a3008060355040513013130"
    "59301306072a8648ce3d020106082a8648ce3d030107034200040c901d423c831ca85e27c73c263ba132721bb9"
    "d7a84c4f0380b2a6756fd601331c8870234dec878504c174144fa4b14b66a651691606d8173e55bd37e381569e"
    "a38184308181307f060a2b0601040183a25a01010471306f0425080212210206dc6968726765b820f050263ece"
    "cf7f71e4955892776c0970542efd689d2382044630440220145e15a991961f0d08cd15425bb95ec93f6ffa03c5"
    "a385eedc34ecf464c7a8ab022026b3109b8a3f40ef833169777eb2aa337cfb6282f188de0666d1bcec2a4690dd"
    "300a06082a8648ce3d0403020349003046022100e1a217eeef9ec9204b3f774a08b70849646b6a1e6b8b27f93d"
    "c00ed58545d9fe022100b00dafa549d0f03547878338c7b15e7502888f6d45db387e5ae6b5d46899cef0"
)


def test_spec_vector_ed25519_yields_its_peer_id() -> None:
    peer = tls.verify_certificate_chain([VECTOR_ED25519], now=NOW)
    assert peer.peer_id == PeerId.from_string(VECTOR_ED25519_PEER_ID)
    assert str(peer.peer_id) == VECTOR_ED25519_PEER_ID


def test_spec_vector_secp256k1_is_refused_as_unsupported() -> None:
    with pytest.raises(UnsupportedKeyType, match="Secp256k1"):
        tls.verify_certificate_chain([VECTOR_SECP256K1], now=NOW)


def test_spec_vector_tampered_signature_is_rejected() -> None:
    # Flip one bit of the host-key signature inside the extension (and re-sign nothing): the
    # certificate's own self-signature then fails first, which is also a rejection.
    index = VECTOR_ED25519.index(bytes.fromhex("0440d90d27"))
    tampered = bytearray(VECTOR_ED25519)
    tampered[index + 5] ^= 1
    with pytest.raises(InvalidCertificate):
        tls.verify_certificate_chain([bytes(tampered)], now=NOW)


def test_round_trip_learns_the_host_key() -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    certified = tls.generate_certificate(host, now=NOW)
    peer = tls.verify_certificate_chain([certified.certificate], now=NOW)
    assert peer.peer_id == tls.peer_id_of(host.public_key())
    assert peer.peer_id.to_bytes()[:6] == bytes.fromhex("002408011220")
    der = certified.certificate.public_bytes(serialization.Encoding.DER)
    assert tls.verify_certificate_chain([der], now=NOW).peer_id == peer.peer_id


def test_validity_window_is_enforced() -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    certified = tls.generate_certificate(host, now=NOW, validity=dt.timedelta(days=1))
    tls.verify_certificate_chain([certified.certificate], now=NOW - dt.timedelta(minutes=30))
    with pytest.raises(InvalidCertificate, match="expired"):
        tls.verify_certificate_chain([certified.certificate], now=NOW + dt.timedelta(days=2))
    with pytest.raises(InvalidCertificate, match="not valid yet"):
        tls.verify_certificate_chain([certified.certificate], now=NOW - dt.timedelta(hours=2))


def test_more_than_one_certificate_is_rejected() -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    cert = tls.generate_certificate(host, now=NOW).certificate
    with pytest.raises(InvalidCertificate, match="exactly one"):
        tls.verify_certificate_chain([cert, cert], now=NOW)
    with pytest.raises(InvalidCertificate, match="exactly one"):
        tls.verify_certificate_chain([], now=NOW)


def test_garbage_certificate_is_rejected() -> None:
    with pytest.raises(InvalidCertificate, match="does not parse"):
        tls.verify_certificate_chain([b"\x30\x03\x02\x01\x00"], now=NOW)


def _custom_certificate(
    extensions: list[tuple[x509.ExtensionType, bool]],
    *,
    signed_key_for: ec.EllipticCurvePrivateKey | None = None,
    host: ed25519.Ed25519PrivateKey | None = None,
) -> x509.Certificate:
    """A certificate built by hand, to produce the failure cases our generator never makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    host = host or ed25519.Ed25519PrivateKey.generate()
    target = signed_key_for or key
    spki = target.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed = tls.SignedKey(
        public_key=tls._encode_host_key(host.public_key()),
        signature=host.sign(tls.SIGNATURE_PREFIX + spki),
    )
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    for extension, critical in extensions:
        if extension is SIGNED_KEY_PLACEHOLDER:
            extension = x509.UnrecognizedExtension(tls.EXTENSION_OID, signed.to_der())
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


SIGNED_KEY_PLACEHOLDER = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3"), b"")
UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")


def test_hand_built_certificate_verifies() -> None:
    cert = _custom_certificate([(SIGNED_KEY_PLACEHOLDER, False), (UNKNOWN, False)])
    tls.verify_certificate_chain([cert], now=NOW)


def test_missing_extension_is_rejected() -> None:
    cert = _custom_certificate([(UNKNOWN, False)])
    with pytest.raises(InvalidCertificate, match="lacks the libp2p"):
        tls.verify_certificate_chain([cert], now=NOW)


def test_critical_unknown_extension_is_rejected() -> None:
    cert = _custom_certificate([(SIGNED_KEY_PLACEHOLDER, True), (UNKNOWN, True)])
    with pytest.raises(InvalidCertificate, match="critical extension"):
        tls.verify_certificate_chain([cert], now=NOW)


def test_critical_basic_constraints_are_understood() -> None:
    constraints = x509.BasicConstraints(ca=False, path_length=None)
    cert = _custom_certificate([(SIGNED_KEY_PLACEHOLDER, True), (constraints, True)])
    tls.verify_certificate_chain([cert], now=NOW)


def test_host_signature_over_another_key_is_rejected() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cert = _custom_certificate([(SIGNED_KEY_PLACEHOLDER, False)], signed_key_for=other)
    with pytest.raises(InvalidCertificate, match="host-key signature"):
        tls.verify_certificate_chain([cert], now=NOW)


def test_malformed_signed_key_in_extension_is_rejected() -> None:
    junk = x509.UnrecognizedExtension(tls.EXTENSION_OID, b"\x30\x80\x00\x00")
    cert = _custom_certificate([(junk, False)])
    with pytest.raises(InvalidSignedKey):
        tls.verify_certificate_chain([cert], now=NOW)


def test_self_signature_must_verify() -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    der = bytearray(
        tls.generate_certificate(host, now=NOW).certificate.public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01  # inside the ECDSA signature's s value
    with pytest.raises(InvalidCertificate):
        tls.verify_certificate_chain([bytes(der)], now=NOW)


# --- SignedKey DER ----------------------------------------------------------------------------


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_signed_key_round_trips(public_key: bytes, signature: bytes) -> None:
    encoded = tls.SignedKey(public_key, signature).to_der()
    assert tls.SignedKey.from_der(encoded) == tls.SignedKey(public_key, signature)


@given(st.binary(max_size=300), st.binary(max_size=300), st.data())
def test_truncated_signed_key_is_a_typed_error(
    public_key: bytes, signature: bytes, data: st.DataObject
) -> None:
    encoded = tls.SignedKey(public_key, signature).to_der()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(InvalidSignedKey):
        tls.SignedKey.from_der(encoded[:cut])


@given(st.binary(max_size=64), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_a_typed_error(public_key: bytes, trailer: bytes) -> None:
    encoded = tls.SignedKey(public_key, b"sig").to_der()
    with pytest.raises(InvalidSignedKey):
        tls.SignedKey.from_der(encoded + trailer)


@given(st.binary(max_size=600))
def test_garbage_never_raises_anything_but_the_typed_error(data: bytes) -> None:
    try:
        parsed = tls.SignedKey.from_der(data)
    except InvalidSignedKey:
        return
    assert parsed.to_der() == data  # whatever parses is canonical DER


def test_oversize_is_rejected_both_ways() -> None:
    with pytest.raises(InvalidSignedKey, match="limit"):
        tls.SignedKey.from_der(b"\x30" + b"\x00" * tls.MAX_SIGNED_KEY_SIZE)
    with pytest.raises(InvalidSignedKey, match="limit"):
        tls.SignedKey(b"x" * tls.MAX_SIGNED_KEY_SIZE, b"").to_der()


@pytest.mark.parametrize(
    "der",
    [
        b"\x30\x81\x04\x04\x00\x04\x00",  # long-form length for a short value
        b"\x30\x82\x00\x04\x04\x00\x04\x00",  # leading zero in the length
        b"\x30\x80\x04\x00\x04\x00\x00\x00",  # indefinite length
        b"\x31\x04\x04\x00\x04\x00",  # SET, not SEQUENCE
        b"\x30\x04\x03\x00\x04\x00",  # BIT STRING field
        b"\x30\x02\x04\x00",  # one field
        b"\x30\x06\x04\x00\x04\x00\x04\x00",  # three fields
        b"\x3f\x04\x04\x00\x04\x00",  # high tag number form
        b"\x30\x85\x01\x00\x00\x00\x00",  # five length bytes
        b"",
    ],
)
def test_non_der_encodings_are_rejected(der: bytes) -> None:
    with pytest.raises(InvalidSignedKey):
        tls.SignedKey.from_der(der)


@pytest.mark.parametrize(
    ("encoded", "error"),
    [
        (b"", InvalidSignedKey),
        (b"\x10\x01", InvalidSignedKey),
        (b"\x08\x00\x12\x00", UnsupportedKeyType),
        (b"\x08\x03\x12\x00", UnsupportedKeyType),
        (b"\x08\x81\x01", InvalidSignedKey),
        (b"\x08\x01\x12\x20" + b"\x01" * 31, InvalidSignedKey),
        (b"\x08\x01\x12\x20" + b"\x01" * 33, InvalidSignedKey),
        (b"\x08\x01\x1a\x20" + b"\x01" * 32, InvalidSignedKey),
    ],
)
def test_host_key_protobuf_is_strict(encoded: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        tls._decode_host_key(encoded)
