//! Typed errors of the crypto core. They never carry key material or plaintext.

use std::fmt;

/// Everything that can go wrong in the crypto core. The Python layer maps each variant to the
/// exception of the same meaning in `teia.errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// Wrong length, or a public key that is low-order / gives a non-contributory DH output.
    InvalidKey(&'static str),
    /// A signature that does not verify under the claimed key.
    InvalidSignature(&'static str),
    /// Truncated, oversize or malformed input, rejected before any decryption.
    InvalidMessage(&'static str),
    /// Authentication failed (forged, corrupted, or for another session).
    Decryption(&'static str),
    /// The message key was already used (replay or duplicate).
    DuplicateMessage,
    /// The message would skip more keys than allowed.
    TooManySkipped,
    /// Serialised state that is corrupt or of an unsupported version.
    InvalidState(&'static str),
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::InvalidKey(why) => write!(f, "invalid key: {why}"),
            CryptoError::InvalidSignature(why) => write!(f, "invalid signature: {why}"),
            CryptoError::InvalidMessage(why) => write!(f, "invalid message: {why}"),
            CryptoError::Decryption(why) => write!(f, "decryption failed: {why}"),
            CryptoError::DuplicateMessage => {
                write!(f, "duplicate message: its key was already used (replay?)")
            }
            CryptoError::TooManySkipped => write!(
                f,
                "message skips too many message keys (limit {})",
                crate::ratchet::kdf::MAX_SKIP
            ),
            CryptoError::InvalidState(why) => write!(f, "invalid serialised state: {why}"),
        }
    }
}

impl std::error::Error for CryptoError {}

pub type Result<T> = std::result::Result<T, CryptoError>;
