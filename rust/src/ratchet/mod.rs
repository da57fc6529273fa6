//! Signal-protocol crypto core: X3DH, the Double Ratchet and sender keys (and a CPace-style
//! PAKE for linking devices).
//!
//! Parameters and wire formats are specified in `docs/crypto.md`.

pub mod cpace;
pub mod double_ratchet;
pub mod errors;
pub mod kdf;
pub mod keys;
pub mod sender_keys;
pub mod session;
pub mod x3dh;

pub use errors::{CryptoError, Result};
