//! Ed25519 signatures of arbitrary messages under a 32-byte seed (RFC 8032), for callers that
//! hold a long-lived signing key outside the ratchet (the homeserver's server key).
//!
//! Verification is strict: the public key must be a canonical point that is not small-order
//! (`ratchet::keys::ed25519_public_from_slice`) and the signature must pass dalek's
//! `verify_strict` (canonical `S`, no small-order `R`). Honest signers always pass; it only
//! turns away the malleable edge cases a forger could use.

use ed25519_dalek::{Signature, Signer, SigningKey};
use zeroize::Zeroizing;

use crate::ratchet::keys::{array32, ed25519_public_from_slice};
use crate::ratchet::{CryptoError, Result};

fn signing_key(seed: &[u8]) -> Result<SigningKey> {
    // SigningKey zeroizes its expanded secret on drop; the copy of the seed is zeroized here.
    let seed = Zeroizing::new(array32(
        seed,
        CryptoError::InvalidKey("an Ed25519 seed is 32 bytes"),
    )?);
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of a 32-byte seed.
pub fn public_key(seed: &[u8]) -> Result<[u8; 32]> {
    Ok(signing_key(seed)?.verifying_key().to_bytes())
}

/// The 64-byte signature of `message` under `seed`.
pub fn sign(seed: &[u8], message: &[u8]) -> Result<[u8; 64]> {
    Ok(signing_key(seed)?.sign(message).to_bytes())
}

/// Whether `signature` is a valid signature of `message` under `public_key`; a malformed key or
/// signature is simply not valid.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = ed25519_public_from_slice(public_key) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(text: &str) -> [u8; 32] {
        hex::decode(text).unwrap().try_into().unwrap()
    }

    #[test]
    fn rfc8032_test_1() {
        // RFC 8032 section 7.1, TEST 1 (the empty message).
        let seed = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let public = hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let expected = hex::decode(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        )
        .unwrap();
        assert_eq!(public_key(&seed).unwrap(), public);
        assert_eq!(sign(&seed, b"").unwrap().to_vec(), expected);
        assert!(verify(&public, b"", &expected));
    }

    #[test]
    fn rfc8032_test_2() {
        // RFC 8032 section 7.1, TEST 2 (one byte, 0x72).
        let seed = hex32("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb");
        let public = hex32("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        let expected = hex::decode(
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        )
        .unwrap();
        assert_eq!(public_key(&seed).unwrap(), public);
        assert_eq!(sign(&seed, &[0x72]).unwrap().to_vec(), expected);
        assert!(verify(&public, &[0x72], &expected));
    }

    #[test]
    fn forgeries_and_malformed_input_do_not_verify() {
        let seed = [7u8; 32];
        let public = public_key(&seed).unwrap();
        let signature = sign(&seed, b"message").unwrap();
        assert!(verify(&public, b"message", &signature));
        assert!(!verify(&public, b"messagE", &signature));
        let mut flipped = signature;
        flipped[10] ^= 1;
        assert!(!verify(&public, b"message", &flipped));
        assert!(!verify(
            &public_key(&[8u8; 32]).unwrap(),
            b"message",
            &signature
        ));
        assert!(!verify(&public[..31], b"message", &signature));
        assert!(!verify(&public, b"message", &signature[..63]));
        for small in crate::ratchet::keys::tests::small_order_ed25519() {
            assert!(!verify(&small, b"message", &signature));
        }
    }

    #[test]
    fn seed_of_wrong_length_is_refused() {
        assert_eq!(
            sign(&[0u8; 31], b"m"),
            Err(CryptoError::InvalidKey("an Ed25519 seed is 32 bytes"))
        );
        assert!(public_key(&[0u8; 33]).is_err());
    }
}
