//! Sender keys for groups: `GroupSenderKey` and `GroupReceiverKey` over `ratchet::sender_keys`.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::IntoPyResult;
use crate::ratchet::sender_keys::{ReceiverKey, SenderKey};

/// One member's sending chain in one group (secret; encrypt at rest).
#[pyclass(module = "teia._native", name = "GroupSenderKey")]
pub struct GroupSenderKey {
    inner: SenderKey,
}

#[pymethods]
impl GroupSenderKey {
    #[staticmethod]
    #[pyo3(signature = (chain_id = None))]
    fn generate(chain_id: Option<u32>) -> Self {
        GroupSenderKey {
            inner: SenderKey::generate(chain_id),
        }
    }

    #[getter]
    fn chain_id(&self) -> u32 {
        self.inner.chain_id()
    }

    #[getter]
    fn iteration(&self) -> u32 {
        self.inner.iteration()
    }

    #[getter]
    fn signing_public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.signing_public_key())
    }

    /// A signed group message.
    fn encrypt<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        let message = py.detach(|| inner.encrypt(plaintext)).py_err(py)?;
        Ok(PyBytes::new(py, &message))
    }

    /// The message that hands this chain (from its current iteration) to a member.
    fn distribution_message<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.distribution_message())
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(GroupSenderKey {
            inner: SenderKey::from_bytes(data).py_err(py)?,
        })
    }
}

/// A member's copy of another member's sending chain.
#[pyclass(module = "teia._native", name = "GroupReceiverKey")]
pub struct GroupReceiverKey {
    inner: ReceiverKey,
}

#[pymethods]
impl GroupReceiverKey {
    #[staticmethod]
    fn from_distribution_message(py: Python<'_>, message: &[u8]) -> PyResult<Self> {
        Ok(GroupReceiverKey {
            inner: ReceiverKey::from_distribution_message(message).py_err(py)?,
        })
    }

    #[getter]
    fn chain_id(&self) -> u32 {
        self.inner.chain_id()
    }

    #[getter]
    fn signing_public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.signing_public_key())
    }

    /// Verify and decrypt a group message; transactional.
    fn decrypt<'py>(&mut self, py: Python<'py>, message: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        let plaintext = py.detach(|| inner.decrypt(message)).py_err(py)?;
        Ok(PyBytes::new(py, &plaintext))
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        Ok(GroupReceiverKey {
            inner: ReceiverKey::from_bytes(data).py_err(py)?,
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GroupSenderKey>()?;
    m.add_class::<GroupReceiverKey>()?;
    Ok(())
}
