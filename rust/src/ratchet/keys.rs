//! Key types of the pairwise protocol: the Ed25519 identity key and its X25519 form, signed and
//! one-time prekeys, and the prekey bundle a responder publishes (`docs/crypto.md`, "Keys").
//!
//! Every public key that comes from outside is validated here before any DH uses it: Ed25519
//! points must be canonical and not small-order; X25519 u-coordinates must not be low-order.
//! Private keys live in `StaticSecret` / `Zeroizing` and are wiped on drop.

use curve25519_dalek::edwards::CompressedEdwardsY;
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::OsRng;
use sha2::{Digest, Sha512};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use super::errors::{CryptoError, Result};

/// Byte prefix of `Encode(PK)` for X25519 keys (X3DH §2.5).
pub const KEY_TYPE_X25519: u8 = 0x05;
/// Version byte of serialised prekeys and bundles.
pub const KEY_FORMAT_VERSION: u8 = 0x01;

/// Length of a serialised `SignedPrekey`: version ‖ id ‖ private ‖ signature.
const SIGNED_PREKEY_LEN: usize = 1 + 4 + 32 + 64;
/// Length of a serialised `OneTimePrekey`: version ‖ id ‖ private.
const ONE_TIME_PREKEY_LEN: usize = 1 + 4 + 32;
/// Length of a bundle without a one-time prekey: version ‖ IK ‖ spk_id ‖ SPK ‖ sig ‖ has_opk.
const BUNDLE_BASE_LEN: usize = 1 + 32 + 4 + 32 + 64 + 1;

/// A fixed-size array from a slice, or `err` if the length differs.
pub fn array32(bytes: &[u8], err: CryptoError) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| err)
}

/// Reads big-endian u32 at `at` (the caller has checked the length).
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Whether an X25519 u-coordinate is of low order (8·P is the identity), on the curve or its
/// twist. Such keys make DH outputs predictable and are refused.
pub fn is_low_order_x25519(public: &[u8; 32]) -> bool {
    // 8 = 0b1000, most significant bit first.
    let eight = [true, false, false, false];
    MontgomeryPoint(*public)
        .mul_bits_be(eight.into_iter())
        .to_bytes()
        == [0u8; 32]
}

/// Validates an X25519 public key from outside: 32 bytes, not low-order.
pub fn x25519_public_from_slice(bytes: &[u8]) -> Result<[u8; 32]> {
    let public = array32(
        bytes,
        CryptoError::InvalidKey("an X25519 public key is 32 bytes"),
    )?;
    if is_low_order_x25519(&public) {
        return Err(CryptoError::InvalidKey("low-order X25519 public key"));
    }
    Ok(public)
}

/// An X25519 private key from 32 bytes (clamped on use).
pub fn x25519_secret_from_slice(bytes: &[u8]) -> Result<StaticSecret> {
    let mut raw = Zeroizing::new(array32(
        bytes,
        CryptoError::InvalidKey("an X25519 private key is 32 bytes"),
    )?);
    let secret = StaticSecret::from(*raw);
    raw.zeroize();
    Ok(secret)
}

/// The public key of an X25519 private key.
pub fn x25519_public(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// A fresh X25519 private key from the OS RNG.
pub fn x25519_generate() -> StaticSecret {
    StaticSecret::random_from_rng(OsRng)
}

/// X25519 DH; refuses low-order peer keys through their all-zero (non-contributory) output.
///
/// No separate low-order test here: X25519 clamps the scalar to a multiple of the cofactor, so
/// every low-order point (on the curve or its twist) gives the all-zero output, which
/// `was_contributory` rejects. Keys parsed from outside without a DH are checked with
/// [`is_low_order_x25519`] instead (bundles, saved state).
pub fn dh(secret: &StaticSecret, their_public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>> {
    let shared = secret.diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return Err(CryptoError::InvalidKey("non-contributory DH output"));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// An Ed25519 public key from outside: canonical encoding of a point that is not small-order.
pub fn ed25519_public_from_slice(bytes: &[u8]) -> Result<VerifyingKey> {
    let raw = array32(
        bytes,
        CryptoError::InvalidKey("an Ed25519 public key is 32 bytes"),
    )?;
    let compressed = CompressedEdwardsY(raw);
    let point = compressed
        .decompress()
        .ok_or(CryptoError::InvalidKey("not an Ed25519 point"))?;
    if point.compress() != compressed {
        return Err(CryptoError::InvalidKey(
            "non-canonical Ed25519 point encoding",
        ));
    }
    if point.is_small_order() {
        return Err(CryptoError::InvalidKey("small-order Ed25519 public key"));
    }
    VerifyingKey::from_bytes(&raw).map_err(|_| CryptoError::InvalidKey("not an Ed25519 point"))
}

/// Birational map of a validated Ed25519 public key to its X25519 (Montgomery u) form.
pub fn ed25519_public_to_x25519(bytes: &[u8]) -> Result<[u8; 32]> {
    let key = ed25519_public_from_slice(bytes)?;
    let u = key.to_montgomery().to_bytes();
    // Canonical, not small-order Edwards points map to non-low-order u; checked anyway.
    if is_low_order_x25519(&u) {
        return Err(CryptoError::InvalidKey("low-order X25519 public key"));
    }
    Ok(u)
}

/// The identity key pair, derived from the caller's 32-byte Ed25519 seed.
pub struct IdentityKeyPair {
    signing: SigningKey,
    dh_secret: StaticSecret,
}

impl IdentityKeyPair {
    /// From the 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self> {
        let raw = Zeroizing::new(array32(
            seed,
            CryptoError::InvalidKey("an Ed25519 identity seed is 32 bytes"),
        )?);
        let signing = SigningKey::from_bytes(&raw);
        Ok(IdentityKeyPair {
            signing,
            dh_secret: ed25519_seed_to_x25519(&raw),
        })
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The identity key's X25519 private key.
    pub fn dh_secret(&self) -> &StaticSecret {
        &self.dh_secret
    }

    /// Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// X25519 private key of an Ed25519 seed: SHA-512(seed)[0..32] (clamped by X25519 on use).
pub fn ed25519_seed_to_x25519(seed: &[u8; 32]) -> StaticSecret {
    let mut digest = Sha512::digest(seed);
    let mut scalar = Zeroizing::new([0u8; 32]);
    scalar.copy_from_slice(&digest[..32]);
    digest.as_mut_slice().zeroize();
    StaticSecret::from(*scalar)
}

/// `Encode(PK)` of X3DH §2.5 for an X25519 key: 0x05 ‖ u.
pub fn encode_x25519(public: &[u8; 32]) -> [u8; 33] {
    let mut out = [0u8; 33];
    out[0] = KEY_TYPE_X25519;
    out[1..].copy_from_slice(public);
    out
}

/// Verifies Ed25519(IK, Encode(SPK)) strictly (no small-order keys, canonical signatures).
pub fn verify_prekey_signature(
    identity_key: &[u8; 32],
    signed_prekey: &[u8; 32],
    signature: &[u8; 64],
) -> Result<()> {
    let key = ed25519_public_from_slice(identity_key)?;
    let signature = Signature::from_bytes(signature);
    key.verify_strict(&encode_x25519(signed_prekey), &signature)
        .map_err(|_| {
            CryptoError::InvalidSignature("the identity key did not sign this signed prekey")
        })
}

/// A signed prekey with its private half.
#[derive(Clone)]
pub struct SignedPrekey {
    pub id: u32,
    secret: StaticSecret,
    public: [u8; 32],
    pub signature: [u8; 64],
}

impl SignedPrekey {
    /// A fresh signed prekey, signed by the identity key of `identity_seed`.
    pub fn generate(identity_seed: &[u8], id: u32) -> Result<Self> {
        let identity = IdentityKeyPair::from_seed(identity_seed)?;
        let secret = x25519_generate();
        let public = x25519_public(&secret);
        let signature = identity.sign(&encode_x25519(&public));
        Ok(SignedPrekey {
            id,
            secret,
            public,
            signature,
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// `0x01 ‖ id (u32) ‖ private (32) ‖ signature (64)`; contains the secret.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(SIGNED_PREKEY_LEN));
        out.push(KEY_FORMAT_VERSION);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.secret.as_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() != SIGNED_PREKEY_LEN {
            return Err(CryptoError::InvalidState("a signed prekey is 101 bytes"));
        }
        if data[0] != KEY_FORMAT_VERSION {
            return Err(CryptoError::InvalidState(
                "unsupported signed prekey version",
            ));
        }
        let id = read_u32(data, 1);
        let secret = x25519_secret_from_slice(&data[5..37])
            .map_err(|_| CryptoError::InvalidState("bad private key"))?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&data[37..]);
        let public = x25519_public(&secret);
        Ok(SignedPrekey {
            id,
            secret,
            public,
            signature,
        })
    }
}

/// A one-time prekey with its private half.
#[derive(Clone)]
pub struct OneTimePrekey {
    pub id: u32,
    secret: StaticSecret,
    public: [u8; 32],
}

impl OneTimePrekey {
    pub fn generate(id: u32) -> Self {
        let secret = x25519_generate();
        let public = x25519_public(&secret);
        OneTimePrekey { id, secret, public }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// `0x01 ‖ id (u32) ‖ private (32)`; contains the secret.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(ONE_TIME_PREKEY_LEN));
        out.push(KEY_FORMAT_VERSION);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.secret.as_bytes());
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() != ONE_TIME_PREKEY_LEN {
            return Err(CryptoError::InvalidState("a one-time prekey is 37 bytes"));
        }
        if data[0] != KEY_FORMAT_VERSION {
            return Err(CryptoError::InvalidState(
                "unsupported one-time prekey version",
            ));
        }
        let id = read_u32(data, 1);
        let secret = x25519_secret_from_slice(&data[5..])
            .map_err(|_| CryptoError::InvalidState("bad private key"))?;
        let public = x25519_public(&secret);
        Ok(OneTimePrekey { id, secret, public })
    }
}

/// What a responder publishes: identity key, signed prekey and optionally a one-time prekey.
/// Public keys are checked for length and low order on construction; the signature is checked
/// by [`PrekeyBundle::verify`] (and always before X3DH uses the bundle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyBundle {
    pub identity_key: [u8; 32],
    pub signed_prekey_id: u32,
    pub signed_prekey: [u8; 32],
    pub signed_prekey_signature: [u8; 64],
    pub one_time_prekey: Option<(u32, [u8; 32])>,
}

impl PrekeyBundle {
    pub fn new(
        identity_key: &[u8],
        signed_prekey_id: u32,
        signed_prekey: &[u8],
        signed_prekey_signature: &[u8],
        one_time_prekey: Option<(u32, &[u8])>,
    ) -> Result<Self> {
        let identity_key = ed25519_public_from_slice(identity_key)?.to_bytes();
        let signed_prekey = x25519_public_from_slice(signed_prekey)?;
        let signed_prekey_signature: [u8; 64] = signed_prekey_signature
            .try_into()
            .map_err(|_| CryptoError::InvalidSignature("an Ed25519 signature is 64 bytes"))?;
        let one_time_prekey = match one_time_prekey {
            Some((id, key)) => Some((id, x25519_public_from_slice(key)?)),
            None => None,
        };
        Ok(PrekeyBundle {
            identity_key,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            one_time_prekey,
        })
    }

    /// `InvalidSignature` unless the identity key signed `Encode(SPK)`.
    pub fn verify(&self) -> Result<()> {
        verify_prekey_signature(
            &self.identity_key,
            &self.signed_prekey,
            &self.signed_prekey_signature,
        )
    }

    /// `0x01 ‖ IK (32) ‖ spk_id (u32) ‖ SPK (32) ‖ sig (64) ‖ has_opk (u8) ‖ [opk_id (u32) ‖ OPK (32)]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BUNDLE_BASE_LEN + 36);
        out.push(KEY_FORMAT_VERSION);
        out.extend_from_slice(&self.identity_key);
        out.extend_from_slice(&self.signed_prekey_id.to_be_bytes());
        out.extend_from_slice(&self.signed_prekey);
        out.extend_from_slice(&self.signed_prekey_signature);
        match &self.one_time_prekey {
            Some((id, key)) => {
                out.push(1);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(key);
            }
            None => out.push(0),
        }
        out
    }

    /// Parses the bundle format; `InvalidMessage` when malformed, `InvalidKey` for bad keys.
    /// The signature is not verified here.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() < BUNDLE_BASE_LEN {
            return Err(CryptoError::InvalidMessage("prekey bundle truncated"));
        }
        if data[0] != KEY_FORMAT_VERSION {
            return Err(CryptoError::InvalidMessage(
                "unsupported prekey bundle version",
            ));
        }
        let opk = match data[BUNDLE_BASE_LEN - 1] {
            0 if data.len() == BUNDLE_BASE_LEN => None,
            1 if data.len() == BUNDLE_BASE_LEN + 36 => Some((
                read_u32(data, BUNDLE_BASE_LEN),
                &data[BUNDLE_BASE_LEN + 4..],
            )),
            0 | 1 => {
                return Err(CryptoError::InvalidMessage(
                    "prekey bundle has the wrong length",
                ))
            }
            _ => {
                return Err(CryptoError::InvalidMessage(
                    "prekey bundle one-time prekey flag",
                ))
            }
        };
        PrekeyBundle::new(
            &data[1..33],
            read_u32(data, 33),
            &data[37..69],
            &data[69..133],
            opk,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use curve25519_dalek::constants::EIGHT_TORSION;

    /// The identity point and other small-order Ed25519 encodings.
    pub(crate) fn small_order_ed25519() -> Vec<[u8; 32]> {
        EIGHT_TORSION
            .iter()
            .map(|p| p.compress().to_bytes())
            .collect()
    }

    /// Low-order X25519 u-coordinates (including non-canonical encodings ≥ p).
    pub(crate) fn low_order_x25519() -> Vec<[u8; 32]> {
        let mut v: Vec<[u8; 32]> = EIGHT_TORSION
            .iter()
            .map(|p| p.to_montgomery().to_bytes())
            .collect();
        let mut p = [0xFFu8; 32];
        p[0] = 0xED;
        p[31] = 0x7F; // p = 2^255 - 19, ≡ 0
        v.push(p);
        let mut p1 = p;
        p1[0] = 0xEE; // p + 1 ≡ 1
        v.push(p1);
        let mut pm1 = p;
        pm1[0] = 0xEC; // p - 1 ≡ -1, order 2 on the twist... (u = -1 is low order)
        v.push(pm1);
        v
    }

    #[test]
    fn seed_to_x25519_matches_ed25519_public_conversion() {
        for seed in [[0u8; 32], [1u8; 32], [0xAB; 32]] {
            let id = IdentityKeyPair::from_seed(&seed).unwrap();
            let via_public = ed25519_public_to_x25519(&id.public_key()).unwrap();
            assert_eq!(x25519_public(id.dh_secret()), via_public);
        }
    }

    #[test]
    fn rfc8032_test_1_public_key() {
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let id = IdentityKeyPair::from_seed(&seed).unwrap();
        assert_eq!(
            hex::encode(id.public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
    }

    #[test]
    fn small_order_and_bad_edwards_points_are_rejected() {
        for bad in small_order_ed25519() {
            assert!(matches!(
                ed25519_public_to_x25519(&bad),
                Err(CryptoError::InvalidKey(_))
            ));
        }
        // Non-canonical: y = p + 1 encodes the same point as y = 1 (the identity).
        let mut non_canonical = [0xFFu8; 32];
        non_canonical[0] = 0xEE;
        non_canonical[31] = 0x7F;
        assert!(ed25519_public_to_x25519(&non_canonical).is_err());
        assert!(ed25519_public_to_x25519(&[1u8; 31]).is_err());
    }

    #[test]
    fn low_order_x25519_keys_are_rejected() {
        for bad in low_order_x25519() {
            assert!(is_low_order_x25519(&bad), "{}", hex::encode(bad));
            assert!(x25519_public_from_slice(&bad).is_err());
            let s = x25519_generate();
            assert!(matches!(dh(&s, &bad), Err(CryptoError::InvalidKey(_))));
        }
        let good = x25519_public(&x25519_generate());
        assert!(!is_low_order_x25519(&good));
    }

    #[test]
    fn rfc7748_x25519_vector() {
        let k = hex::decode("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
            .unwrap();
        let u = hex::decode("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
            .unwrap();
        let s = x25519_secret_from_slice(&k).unwrap();
        let out = dh(&s, &u.try_into().unwrap()).unwrap();
        assert_eq!(
            hex::encode(*out),
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
        );
    }

    #[test]
    fn signed_prekey_signature_and_bundle_round_trip() {
        let seed = [7u8; 32];
        let id = IdentityKeyPair::from_seed(&seed).unwrap();
        let spk = SignedPrekey::generate(&seed, 42).unwrap();
        let opk = OneTimePrekey::generate(9);
        for with_opk in [false, true] {
            let opk_public = opk.public_key();
            let opk_part = with_opk.then_some((opk.id, &opk_public[..]));
            let bundle = PrekeyBundle::new(
                &id.public_key(),
                spk.id,
                &spk.public_key(),
                &spk.signature,
                opk_part,
            )
            .unwrap();
            bundle.verify().unwrap();
            let bytes = bundle.to_bytes();
            assert_eq!(PrekeyBundle::from_bytes(&bytes).unwrap(), bundle);
            for cut in 0..bytes.len() {
                assert!(PrekeyBundle::from_bytes(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(PrekeyBundle::from_bytes(&longer).is_err());
            let mut bad = bundle.clone();
            bad.signed_prekey_signature[5] ^= 1;
            assert!(matches!(
                bad.verify(),
                Err(CryptoError::InvalidSignature(_))
            ));
            let mut other = bundle.clone();
            other.signed_prekey = x25519_public(&x25519_generate());
            assert!(matches!(
                other.verify(),
                Err(CryptoError::InvalidSignature(_))
            ));
        }
    }

    #[test]
    fn prekey_serialisation_round_trip_and_garbage() {
        let spk = SignedPrekey::generate(&[3u8; 32], 5).unwrap();
        let back = SignedPrekey::from_bytes(&spk.to_bytes()).unwrap();
        assert_eq!(back.public_key(), spk.public_key());
        assert_eq!(back.signature, spk.signature);
        assert_eq!(back.id, 5);
        let opk = OneTimePrekey::generate(77);
        let back = OneTimePrekey::from_bytes(&opk.to_bytes()).unwrap();
        assert_eq!(back.public_key(), opk.public_key());
        assert_eq!(back.id, 77);
        let (spk_bytes, opk_bytes) = (spk.to_bytes(), opk.to_bytes());
        for cut in 0..spk_bytes.len() {
            assert!(SignedPrekey::from_bytes(&spk_bytes[..cut]).is_err());
        }
        for cut in 0..opk_bytes.len() {
            assert!(OneTimePrekey::from_bytes(&opk_bytes[..cut]).is_err());
        }
        for data in [&spk_bytes[..], &opk_bytes[..]] {
            let mut wrong_version = data.to_vec();
            wrong_version[0] = 2;
            assert!(SignedPrekey::from_bytes(&wrong_version).is_err());
            assert!(OneTimePrekey::from_bytes(&wrong_version).is_err());
        }
    }
}
