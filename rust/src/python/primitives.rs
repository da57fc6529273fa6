//! Primitives (for known-answer tests and interoperability), X3DH and the prekey types over
//! `ratchet::{kdf, keys, x3dh}`; Ed25519 signing (`signing`) and Argon2id (`password`) for the
//! homeserver.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::IntoPyResult;
use crate::password::{self, Argon2idParams};
use crate::ratchet::keys::{self, array32, IdentityKeyPair};
use crate::ratchet::{kdf, x3dh, CryptoError};
use crate::search;
use crate::signing;

fn bytes<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, data)
}

fn key32(data: &[u8], what: &'static str) -> Result<[u8; 32], CryptoError> {
    array32(data, CryptoError::InvalidKey(what))
}

/// A fresh X25519 key pair as ``(private, public)``, 32 bytes each.
#[pyfunction]
fn x25519_keypair(py: Python<'_>) -> (Bound<'_, PyBytes>, Bound<'_, PyBytes>) {
    let secret = keys::x25519_generate();
    let public = keys::x25519_public(&secret);
    (bytes(py, secret.as_bytes()), bytes(py, &public))
}

/// The X25519 public key of a 32-byte private key.
#[pyfunction]
fn x25519_public_key<'py>(py: Python<'py>, private_key: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let secret = keys::x25519_secret_from_slice(private_key).py_err(py)?;
    Ok(bytes(py, &keys::x25519_public(&secret)))
}

/// Birational map of an Ed25519 public key to its X25519 (Montgomery u) form.
#[pyfunction]
fn ed25519_public_to_x25519<'py>(
    py: Python<'py>,
    public_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    Ok(bytes(
        py,
        &keys::ed25519_public_to_x25519(public_key).py_err(py)?,
    ))
}

/// The X25519 private key of an Ed25519 seed: SHA-512(seed)[:32] (clamped on use).
#[pyfunction]
fn ed25519_seed_to_x25519<'py>(py: Python<'py>, seed: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let seed = zeroize::Zeroizing::new(key32(seed, "an Ed25519 seed is 32 bytes").py_err(py)?);
    Ok(bytes(py, keys::ed25519_seed_to_x25519(&seed).as_bytes()))
}

/// The Ed25519 public key of a 32-byte seed.
#[pyfunction]
fn ed25519_public_key<'py>(py: Python<'py>, seed: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Ok(bytes(py, &signing::public_key(seed).py_err(py)?))
}

/// The 64-byte Ed25519 signature of ``message`` under a 32-byte seed.
#[pyfunction]
fn ed25519_sign<'py>(
    py: Python<'py>,
    seed: &[u8],
    message: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    Ok(bytes(py, &signing::sign(seed, message).py_err(py)?))
}

/// Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``
/// (strict: a malformed or small-order key, or a malleable signature, is not valid).
#[pyfunction]
fn ed25519_verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    signing::verify(public_key, message, signature)
}

/// Argon2id (RFC 9106, version 0x13) of ``password`` and ``salt``; runs without the GIL.
#[pyfunction]
fn argon2id<'py>(
    py: Python<'py>,
    password: &[u8],
    salt: &[u8],
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
    length: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let params = Argon2idParams {
        memory_kib,
        iterations,
        lanes,
        length,
    };
    let out = py
        .detach(|| password::argon2id(password, salt, params))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(bytes(py, &out))
}

/// KDF_RK → ``(new_root_key, chain_key)``.
#[pyfunction]
fn kdf_rk<'py>(
    py: Python<'py>,
    root_key: &[u8],
    dh_output: &[u8],
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let rk = key32(root_key, "a root key is 32 bytes").py_err(py)?;
    let dh = key32(dh_output, "a DH output is 32 bytes").py_err(py)?;
    let (new_rk, ck) = kdf::kdf_rk(&rk, &dh);
    Ok((bytes(py, new_rk.as_ref()), bytes(py, ck.as_ref())))
}

/// KDF_CK → ``(next_chain_key, message_key)``.
#[pyfunction]
fn kdf_ck<'py>(
    py: Python<'py>,
    chain_key: &[u8],
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let ck = key32(chain_key, "a chain key is 32 bytes").py_err(py)?;
    let (next, mk) = kdf::kdf_ck(&ck);
    Ok((bytes(py, next.as_ref()), bytes(py, mk.as_ref())))
}

/// ENCRYPT's expansion of a message key → ``(aes_key, hmac_key, iv)``.
#[pyfunction]
fn message_key_material<'py>(
    py: Python<'py>,
    message_key: &[u8],
) -> PyResult<(
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
)> {
    let mk = key32(message_key, "a message key is 32 bytes").py_err(py)?;
    let m = kdf::message_key_material(&mk);
    Ok((
        bytes(py, m.aes_key.as_ref()),
        bytes(py, m.hmac_key.as_ref()),
        bytes(py, m.iv.as_ref()),
    ))
}

/// ENCRYPT: AES-256-CBC/PKCS#7 ciphertext with the 32-byte HMAC-SHA256 tag appended.
#[pyfunction]
fn seal<'py>(
    py: Python<'py>,
    message_key: &[u8],
    plaintext: &[u8],
    associated_data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let mk = key32(message_key, "a message key is 32 bytes").py_err(py)?;
    Ok(bytes(py, &kdf::seal(&mk, plaintext, associated_data)))
}

/// DECRYPT, the inverse of :func:`seal`.
#[pyfunction]
fn open_sealed<'py>(
    py: Python<'py>,
    message_key: &[u8],
    sealed: &[u8],
    associated_data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let mk = key32(message_key, "a message key is 32 bytes").py_err(py)?;
    Ok(bytes(
        py,
        &kdf::open(&mk, sealed, associated_data).py_err(py)?,
    ))
}

/// X3DH as the initiator with an explicit ephemeral key → the 32-byte shared secret SK.
#[pyfunction]
fn x3dh_initiate<'py>(
    py: Python<'py>,
    identity_seed: &[u8],
    ephemeral_private: &[u8],
    bundle: PyRef<'_, PrekeyBundle>,
) -> PyResult<Bound<'py, PyBytes>> {
    let identity = IdentityKeyPair::from_seed(identity_seed).py_err(py)?;
    let ephemeral = keys::x25519_secret_from_slice(ephemeral_private).py_err(py)?;
    let sk = x3dh::initiate(&identity, &ephemeral, &bundle.inner).py_err(py)?;
    Ok(bytes(py, sk.as_ref()))
}

/// X3DH as the responder → the 32-byte shared secret SK.
#[pyfunction]
fn x3dh_respond<'py>(
    py: Python<'py>,
    identity_seed: &[u8],
    signed_prekey_private: &[u8],
    one_time_prekey_private: Option<&[u8]>,
    initiator_identity_key: &[u8],
    initiator_ephemeral_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let identity = IdentityKeyPair::from_seed(identity_seed).py_err(py)?;
    let spk = keys::x25519_secret_from_slice(signed_prekey_private).py_err(py)?;
    let opk = one_time_prekey_private
        .map(keys::x25519_secret_from_slice)
        .transpose()
        .py_err(py)?;
    let sk = x3dh::respond(
        &identity,
        &spk,
        opk.as_ref(),
        initiator_identity_key,
        initiator_ephemeral_key,
    )
    .py_err(py)?;
    Ok(bytes(py, sk.as_ref()))
}

/// AD = IK_A ‖ IK_B (the raw 32-byte Ed25519 public keys).
#[pyfunction]
fn x3dh_associated_data<'py>(
    py: Python<'py>,
    initiator_identity_key: &[u8],
    responder_identity_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let a = key32(initiator_identity_key, "an identity key is 32 bytes").py_err(py)?;
    let b = key32(responder_identity_key, "an identity key is 32 bytes").py_err(py)?;
    Ok(bytes(py, &x3dh::associated_data(&a, &b)))
}

/// What a responder publishes so that others can start sessions with it.
#[pyclass(module = "teia._native", name = "PrekeyBundle", frozen)]
pub struct PrekeyBundle {
    pub(crate) inner: keys::PrekeyBundle,
}

#[pymethods]
impl PrekeyBundle {
    #[new]
    #[pyo3(signature = (
        identity_key,
        signed_prekey_id,
        signed_prekey,
        signed_prekey_signature,
        one_time_prekey_id = None,
        one_time_prekey = None,
    ))]
    fn new(
        py: Python<'_>,
        identity_key: &[u8],
        signed_prekey_id: u32,
        signed_prekey: &[u8],
        signed_prekey_signature: &[u8],
        one_time_prekey_id: Option<u32>,
        one_time_prekey: Option<&[u8]>,
    ) -> PyResult<Self> {
        let opk = match (one_time_prekey_id, one_time_prekey) {
            (Some(id), Some(key)) => Some((id, key)),
            (None, None) => None,
            _ => {
                return Err(CryptoError::InvalidKey(
                    "one_time_prekey_id and one_time_prekey go together",
                ))
                .py_err(py)
            }
        };
        let inner = keys::PrekeyBundle::new(
            identity_key,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            opk,
        )
        .py_err(py)?;
        Ok(PrekeyBundle { inner })
    }

    #[getter]
    fn identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.identity_key)
    }

    #[getter]
    fn signed_prekey_id(&self) -> u32 {
        self.inner.signed_prekey_id
    }

    #[getter]
    fn signed_prekey<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.signed_prekey)
    }

    #[getter]
    fn signed_prekey_signature<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.signed_prekey_signature)
    }

    #[getter]
    fn one_time_prekey_id(&self) -> Option<u32> {
        self.inner.one_time_prekey.map(|(id, _)| id)
    }

    #[getter]
    fn one_time_prekey<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.one_time_prekey.map(|(_, key)| bytes(py, &key))
    }

    /// Raises ``InvalidSignature`` unless the identity key signed the signed prekey.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.verify().py_err(py)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(PrekeyBundle {
            inner: keys::PrekeyBundle::from_bytes(data).py_err(py)?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "PrekeyBundle(signed_prekey_id={}, one_time_prekey_id={:?})",
            self.inner.signed_prekey_id,
            self.inner.one_time_prekey.map(|(id, _)| id)
        )
    }
}

/// A signed prekey with its private half (secret; encrypt at rest).
#[pyclass(module = "teia._native", name = "SignedPrekey", frozen)]
pub struct SignedPrekey {
    pub(crate) inner: keys::SignedPrekey,
}

#[pymethods]
impl SignedPrekey {
    #[staticmethod]
    fn generate(py: Python<'_>, identity_seed: &[u8], prekey_id: u32) -> PyResult<Self> {
        Ok(SignedPrekey {
            inner: keys::SignedPrekey::generate(identity_seed, prekey_id).py_err(py)?,
        })
    }

    #[getter]
    fn id(&self) -> u32 {
        self.inner.id
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.public_key())
    }

    #[getter]
    fn private_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, self.inner.secret().as_bytes())
    }

    #[getter]
    fn signature<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.signature)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(SignedPrekey {
            inner: keys::SignedPrekey::from_bytes(data).py_err(py)?,
        })
    }

    fn __repr__(&self) -> String {
        format!("SignedPrekey(id={})", self.inner.id)
    }
}

/// A one-time prekey with its private half (secret; encrypt at rest).
#[pyclass(module = "teia._native", name = "OneTimePrekey", frozen)]
pub struct OneTimePrekey {
    pub(crate) inner: keys::OneTimePrekey,
}

#[pymethods]
impl OneTimePrekey {
    #[staticmethod]
    fn generate(prekey_id: u32) -> Self {
        OneTimePrekey {
            inner: keys::OneTimePrekey::generate(prekey_id),
        }
    }

    #[getter]
    fn id(&self) -> u32 {
        self.inner.id
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.public_key())
    }

    #[getter]
    fn private_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, self.inner.secret().as_bytes())
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(OneTimePrekey {
            inner: keys::OneTimePrekey::from_bytes(data).py_err(py)?,
        })
    }

    fn __repr__(&self) -> String {
        format!("OneTimePrekey(id={})", self.inner.id)
    }
}

/// Search tokens: HMAC-SHA256(key, word)[:16] of each word (UTF-8), in order.
#[pyfunction]
fn search_tokens<'py>(py: Python<'py>, key: &[u8], words: Vec<String>) -> Vec<Bound<'py, PyBytes>> {
    search::tokens(key, &words)
        .iter()
        .map(|token| bytes(py, token))
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(x25519_keypair, m)?)?;
    m.add_function(wrap_pyfunction!(x25519_public_key, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_public_to_x25519, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_seed_to_x25519, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_public_key, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_sign, m)?)?;
    m.add_function(wrap_pyfunction!(ed25519_verify, m)?)?;
    m.add_function(wrap_pyfunction!(argon2id, m)?)?;
    m.add_function(wrap_pyfunction!(kdf_rk, m)?)?;
    m.add_function(wrap_pyfunction!(kdf_ck, m)?)?;
    m.add_function(wrap_pyfunction!(message_key_material, m)?)?;
    m.add_function(wrap_pyfunction!(seal, m)?)?;
    m.add_function(wrap_pyfunction!(open_sealed, m)?)?;
    m.add_function(wrap_pyfunction!(x3dh_initiate, m)?)?;
    m.add_function(wrap_pyfunction!(x3dh_respond, m)?)?;
    m.add_function(wrap_pyfunction!(x3dh_associated_data, m)?)?;
    m.add_function(wrap_pyfunction!(search_tokens, m)?)?;
    m.add_class::<PrekeyBundle>()?;
    m.add_class::<SignedPrekey>()?;
    m.add_class::<OneTimePrekey>()?;
    Ok(())
}
