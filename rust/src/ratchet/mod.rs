//! Signal-protocol crypto core: X3DH, the Double Ratchet and sender keys.
//!
//! Parameters and wire formats are specified in `docs/crypto.md`.

pub mod errors;
pub mod kdf;

pub use errors::{CryptoError, Result};
