//! Argon2id (RFC 9106, version 0x13) for password hashing, the same function the `cryptography`
//! package computes, so hashes stored by either verify with the other.
//!
//! The work memory (`memory_kib`) is allocated for the call and zeroized before it is freed
//! (the `argon2` crate's `zeroize` feature); the caller zeroizes the output it does not return.

use std::fmt;

use argon2::{Algorithm, Argon2, AssociatedData, ParamsBuilder, Version};
use zeroize::Zeroizing;

/// The cost and output parameters of one Argon2id computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2idParams {
    /// Memory in KiB (at least 8 per lane).
    pub memory_kib: u32,
    /// Passes over the memory (at least 1).
    pub iterations: u32,
    /// Degree of parallelism (1 to 2^24 - 1); computed sequentially here.
    pub lanes: u32,
    /// Output length in bytes (at least 4).
    pub length: usize,
}

/// Parameters or inputs out of Argon2's ranges (e.g. a salt under 8 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHashError(String);

impl fmt::Display for PasswordHashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Argon2id: {}", self.0)
    }
}

impl std::error::Error for PasswordHashError {}

impl From<argon2::Error> for PasswordHashError {
    fn from(err: argon2::Error) -> Self {
        PasswordHashError(err.to_string())
    }
}

/// Argon2id of `password` and `salt`, with an optional `secret` (the key K) and associated data
/// `ad` (X) of RFC 9106; `password` and `salt` alone is what password storage uses.
pub fn argon2id_keyed(
    password: &[u8],
    salt: &[u8],
    secret: &[u8],
    ad: &[u8],
    params: Argon2idParams,
) -> Result<Zeroizing<Vec<u8>>, PasswordHashError> {
    let mut builder = ParamsBuilder::new();
    builder
        .m_cost(params.memory_kib)
        .t_cost(params.iterations)
        .p_cost(params.lanes)
        .output_len(params.length);
    if !ad.is_empty() {
        builder.data(AssociatedData::new(ad)?);
    }
    let built = builder.build()?;
    let context = if secret.is_empty() {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, built)
    } else {
        Argon2::new_with_secret(secret, Algorithm::Argon2id, Version::V0x13, built)?
    };
    let mut out = Zeroizing::new(vec![0u8; params.length]);
    context.hash_password_into(password, salt, &mut out)?;
    Ok(out)
}

/// Argon2id of `password` and `salt` (no secret, no associated data).
pub fn argon2id(
    password: &[u8],
    salt: &[u8],
    params: Argon2idParams,
) -> Result<Zeroizing<Vec<u8>>, PasswordHashError> {
    argon2id_keyed(password, salt, &[], &[], params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9106_argon2id_test_vector() {
        // RFC 9106 section 5.3: password 32 x 0x01, salt 16 x 0x02, secret 8 x 0x03,
        // associated data 12 x 0x04, 32 KiB, 3 passes, 4 lanes, 32-byte tag.
        let params = Argon2idParams {
            memory_kib: 32,
            iterations: 3,
            lanes: 4,
            length: 32,
        };
        let tag = argon2id_keyed(&[1; 32], &[2; 16], &[3; 8], &[4; 12], params).unwrap();
        assert_eq!(
            hex::encode(&*tag),
            "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"
        );
    }

    #[test]
    fn output_depends_on_every_input() {
        let params = Argon2idParams {
            memory_kib: 64,
            iterations: 1,
            lanes: 2,
            length: 16,
        };
        let base = argon2id(b"password", b"saltsalt", params).unwrap();
        assert_eq!(base.len(), 16);
        assert_eq!(base, argon2id(b"password", b"saltsalt", params).unwrap());
        assert_ne!(base, argon2id(b"passwore", b"saltsalt", params).unwrap());
        assert_ne!(base, argon2id(b"password", b"saltsalu", params).unwrap());
        for changed in [
            Argon2idParams {
                memory_kib: 72,
                ..params
            },
            Argon2idParams {
                iterations: 2,
                ..params
            },
            Argon2idParams { lanes: 1, ..params },
        ] {
            assert_ne!(base, argon2id(b"password", b"saltsalt", changed).unwrap());
        }
    }

    #[test]
    fn out_of_range_parameters_are_errors() {
        let params = Argon2idParams {
            memory_kib: 64,
            iterations: 1,
            lanes: 1,
            length: 32,
        };
        assert!(argon2id(b"pw", b"short", params).is_err());
        for bad in [
            Argon2idParams {
                iterations: 0,
                ..params
            },
            Argon2idParams { lanes: 0, ..params },
            Argon2idParams {
                length: 3,
                ..params
            },
            Argon2idParams {
                memory_kib: 4,
                lanes: 1,
                ..params
            },
        ] {
            let err = argon2id(b"pw", b"saltsalt", bad).unwrap_err();
            assert!(err.to_string().starts_with("Argon2id: "));
        }
    }
}
