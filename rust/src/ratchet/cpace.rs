//! A CPace-style balanced PAKE over ristretto255: two parties holding the same low-entropy
//! secret agree on a key, and an active attacker gets one online guess per run.
//!
//! Both sides hash the same transcript (the secret and whatever binds the run: identities,
//! a session nonce) to a generator `G = from_uniform_bytes(SHA-512(input))` (ristretto255's
//! constant-time hash-to-group), pick a random scalar `y`, send `Y = y·G`, and compute
//! `K = y·Y'` from the other side's share. A share that does not decode, or a result that is
//! the identity, is refused. The scalar is zeroized when the state is dropped. Deriving the
//! session key from `K` and both shares, and confirming it, is the caller's (see
//! `teia.peer.devicewire`).

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::IsIdentity;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha512};
use zeroize::{Zeroize, Zeroizing};

use super::{CryptoError, Result};

/// One side of one run: the secret scalar and the share it sends.
pub struct CpaceState {
    scalar: Scalar,
    share: [u8; 32],
}

impl CpaceState {
    /// Start a run on the generator hashed from `input`, with a fresh random scalar.
    pub fn new(input: &[u8]) -> Self {
        let mut wide = Zeroizing::new([0u8; 64]);
        OsRng.fill_bytes(wide.as_mut());
        Self::with_scalar(input, Scalar::from_bytes_mod_order_wide(&wide))
    }

    fn with_scalar(input: &[u8], scalar: Scalar) -> Self {
        let generator = generator(input);
        let share = (scalar * generator).compress().to_bytes();
        CpaceState { scalar, share }
    }

    /// The share to send: `y·G`, 32 bytes.
    pub fn share(&self) -> [u8; 32] {
        self.share
    }

    /// `y·Y'` for the other side's share; refuses a share that does not decode, is our own
    /// (a reflection), or leads to the identity.
    pub fn finish(&self, theirs: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let bytes: [u8; 32] = theirs
            .try_into()
            .map_err(|_| CryptoError::InvalidKey("a PAKE share is 32 bytes"))?;
        if bytes == self.share {
            return Err(CryptoError::InvalidKey("the PAKE share is our own"));
        }
        let point = CompressedRistretto(bytes)
            .decompress()
            .ok_or(CryptoError::InvalidKey(
                "the PAKE share is not a ristretto255 point",
            ))?;
        if point.is_identity() {
            return Err(CryptoError::InvalidKey("the PAKE share is the identity"));
        }
        let shared = self.scalar * point;
        if shared.is_identity() {
            return Err(CryptoError::InvalidKey("the PAKE result is the identity"));
        }
        Ok(Zeroizing::new(shared.compress().to_bytes()))
    }
}

impl Drop for CpaceState {
    fn drop(&mut self) {
        self.scalar.zeroize();
    }
}

fn generator(input: &[u8]) -> RistrettoPoint {
    let digest: [u8; 64] = Sha512::digest(input).into();
    RistrettoPoint::from_uniform_bytes(&digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_agrees_and_other_inputs_do_not() {
        let a = CpaceState::new(b"secret|alice|bob|nonce");
        let b = CpaceState::new(b"secret|alice|bob|nonce");
        let ka = a.finish(&b.share()).unwrap();
        let kb = b.finish(&a.share()).unwrap();
        assert_eq!(*ka, *kb);
        let wrong = CpaceState::new(b"secreT|alice|bob|nonce");
        let kw = wrong.finish(&a.share()).unwrap();
        let ka2 = a.finish(&wrong.share()).unwrap();
        assert_ne!(*kw, *ka2);
    }

    #[test]
    fn shares_are_fresh_each_run() {
        let a = CpaceState::new(b"x");
        let b = CpaceState::new(b"x");
        assert_ne!(a.share(), b.share());
    }

    #[test]
    fn bad_shares_are_refused() {
        let a = CpaceState::new(b"x");
        assert!(a.finish(&[0u8; 31]).is_err());
        assert!(a.finish(&a.share()).is_err());
        // The identity encodes as 32 zero bytes.
        assert!(a.finish(&[0u8; 32]).is_err());
        // Not a canonical ristretto255 encoding.
        assert!(a.finish(&[0xffu8; 32]).is_err());
    }

    #[test]
    fn known_scalar_gives_a_known_share() {
        // y = 1: the share is the generator itself.
        let state = CpaceState::with_scalar(b"input", Scalar::ONE);
        assert_eq!(state.share(), generator(b"input").compress().to_bytes());
    }
}
