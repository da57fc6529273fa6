//! The Double Ratchet (`RatchetState`) and pairwise sessions (`Session`) over
//! `ratchet::{double_ratchet, session}`.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::IntoPyResult;
use super::primitives::{OneTimePrekey, PrekeyBundle, SignedPrekey};
use crate::ratchet::keys::{self, array32};
use crate::ratchet::{double_ratchet, session, CryptoError};

fn bytes<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, data)
}

/// Double Ratchet state of one side of a conversation.
#[pyclass(module = "teia._native", name = "RatchetState")]
pub struct RatchetState {
    inner: double_ratchet::RatchetState,
}

#[pymethods]
impl RatchetState {
    /// RatchetInitAlice; ``ratchet_private`` fixes the first sending ratchet key (tests).
    #[staticmethod]
    #[pyo3(signature = (shared_secret, associated_data, remote_ratchet_public, ratchet_private = None))]
    fn init_initiator(
        py: Python<'_>,
        shared_secret: &[u8],
        associated_data: &[u8],
        remote_ratchet_public: &[u8],
        ratchet_private: Option<&[u8]>,
    ) -> PyResult<Self> {
        let sk = zeroize::Zeroizing::new(
            array32(
                shared_secret,
                CryptoError::InvalidKey("a shared secret is 32 bytes"),
            )
            .py_err(py)?,
        );
        let remote = keys::x25519_public_from_slice(remote_ratchet_public).py_err(py)?;
        let dhs = match ratchet_private {
            Some(private) => keys::x25519_secret_from_slice(private).py_err(py)?,
            None => keys::x25519_generate(),
        };
        let inner =
            double_ratchet::RatchetState::init_initiator(&sk, associated_data, &remote, dhs)
                .py_err(py)?;
        Ok(RatchetState { inner })
    }

    /// RatchetInitBob with the responder's ratchet key pair (its signed prekey).
    #[staticmethod]
    fn init_responder(
        py: Python<'_>,
        shared_secret: &[u8],
        associated_data: &[u8],
        ratchet_private: &[u8],
    ) -> PyResult<Self> {
        let sk = zeroize::Zeroizing::new(
            array32(
                shared_secret,
                CryptoError::InvalidKey("a shared secret is 32 bytes"),
            )
            .py_err(py)?,
        );
        let dhs = keys::x25519_secret_from_slice(ratchet_private).py_err(py)?;
        let inner =
            double_ratchet::RatchetState::init_responder(&sk, associated_data, dhs).py_err(py)?;
        Ok(RatchetState { inner })
    }

    /// RatchetEncrypt → ``header ‖ ciphertext ‖ tag``.
    fn encrypt<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        Ok(bytes(py, &self.inner.encrypt(plaintext).py_err(py)?))
    }

    /// RatchetDecrypt; transactional: on any error the state is unchanged.
    fn decrypt<'py>(&mut self, py: Python<'py>, message: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        Ok(bytes(py, &self.inner.decrypt(message).py_err(py)?))
    }

    /// Versioned serialisation (contains secrets: the caller encrypts it at rest).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.to_bytes())
    }

    /// Inverse of :meth:`to_bytes`; raises ``InvalidSessionState``.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(RatchetState {
            inner: double_ratchet::RatchetState::from_bytes(data).py_err(py)?,
        })
    }

    /// The current sending ratchet public key.
    #[getter]
    fn ratchet_public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.ratchet_public_key())
    }

    /// How many skipped message keys are stored.
    #[getter]
    fn skipped_message_keys(&self) -> usize {
        self.inner.skipped_message_keys()
    }

    /// The session AD.
    #[getter]
    fn associated_data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, self.inner.associated_data())
    }

    fn __repr__(&self) -> String {
        format!(
            "RatchetState(skipped_message_keys={})",
            self.inner.skipped_message_keys()
        )
    }
}

/// The clear fields of an initial (prekey) message, so the responder can find its keys.
#[pyclass(module = "teia._native", name = "PrekeyMessageInfo", frozen)]
pub struct PrekeyMessageInfo {
    identity_key: [u8; 32],
    base_key: [u8; 32],
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
}

#[pymethods]
impl PrekeyMessageInfo {
    #[getter]
    fn identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.identity_key)
    }

    #[getter]
    fn base_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.base_key)
    }

    #[getter]
    fn signed_prekey_id(&self) -> u32 {
        self.signed_prekey_id
    }

    #[getter]
    fn one_time_prekey_id(&self) -> Option<u32> {
        self.one_time_prekey_id
    }

    fn __repr__(&self) -> String {
        format!(
            "PrekeyMessageInfo(signed_prekey_id={}, one_time_prekey_id={:?})",
            self.signed_prekey_id, self.one_time_prekey_id
        )
    }
}

/// Parse the clear part of a prekey message; raises ``InvalidMessage``.
#[pyfunction]
fn parse_prekey_message(py: Python<'_>, message: &[u8]) -> PyResult<PrekeyMessageInfo> {
    let parsed = session::parse_prekey_message(message).py_err(py)?;
    Ok(PrekeyMessageInfo {
        identity_key: parsed.identity_key,
        base_key: parsed.base_key,
        signed_prekey_id: parsed.signed_prekey_id,
        one_time_prekey_id: parsed.one_time_prekey_id,
    })
}

/// Whether a session message is an initial (prekey) message.
#[pyfunction]
fn is_prekey_message(message: &[u8]) -> bool {
    session::is_prekey_message(message)
}

/// A pairwise session: X3DH to start, then the Double Ratchet.
#[pyclass(module = "teia._native", name = "Session")]
pub struct Session {
    inner: session::Session,
}

#[pymethods]
impl Session {
    /// Start a session from the responder's bundle (verified first).
    #[staticmethod]
    fn initiate(
        py: Python<'_>,
        identity_seed: &[u8],
        bundle: PyRef<'_, PrekeyBundle>,
    ) -> PyResult<Self> {
        Ok(Session {
            inner: session::Session::initiate(identity_seed, &bundle.inner).py_err(py)?,
        })
    }

    /// Accept an initial message → ``(session, plaintext)``.
    #[staticmethod]
    fn accept<'py>(
        py: Python<'py>,
        identity_seed: &[u8],
        signed_prekey: PyRef<'_, SignedPrekey>,
        one_time_prekey: Option<PyRef<'_, OneTimePrekey>>,
        message: &[u8],
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let (inner, plaintext) = session::Session::accept(
            identity_seed,
            &signed_prekey.inner,
            one_time_prekey.as_ref().map(|k| &k.inner),
            message,
        )
        .py_err(py)?;
        Ok((Session { inner }, bytes(py, &plaintext)))
    }

    /// A session message (a prekey message until the peer has answered).
    fn encrypt<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        Ok(bytes(py, &self.inner.encrypt(plaintext).py_err(py)?))
    }

    /// Decrypt a session message; transactional: on any error the state is unchanged.
    fn decrypt<'py>(&mut self, py: Python<'py>, message: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        Ok(bytes(py, &self.inner.decrypt(message).py_err(py)?))
    }

    #[getter]
    fn local_identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.local_identity_key())
    }

    #[getter]
    fn remote_identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.remote_identity_key())
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(Session {
            inner: session::Session::from_bytes(data).py_err(py)?,
        })
    }

    /// An independent copy (a working copy to decrypt a batch with): what ``from_bytes`` of
    /// ``to_bytes`` gives, without parsing and checking the keys again.
    fn copy(&self) -> Self {
        Session {
            inner: self.inner.clone(),
        }
    }

    fn __copy__(&self) -> Self {
        self.copy()
    }

    fn __repr__(&self) -> String {
        "Session(...)".to_owned()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RatchetState>()?;
    m.add_class::<PrekeyMessageInfo>()?;
    m.add_function(wrap_pyfunction!(parse_prekey_message, m)?)?;
    m.add_function(wrap_pyfunction!(is_prekey_message, m)?)?;
    m.add_class::<Session>()?;
    Ok(())
}
