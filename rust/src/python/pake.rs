//! The CPace-style PAKE (`ratchet::cpace`) as `CpaceState`.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::IntoPyResult;
use crate::ratchet::cpace;

/// One side of one PAKE run over ristretto255 (the scalar stays here, zeroized on drop).
#[pyclass(module = "teia._native", name = "CpaceState")]
pub struct CpaceState {
    inner: cpace::CpaceState,
}

#[pymethods]
impl CpaceState {
    /// Start a run on the generator hashed (SHA-512, then ristretto255's hash-to-group) from
    /// ``transcript``, with a fresh random scalar.
    #[new]
    fn new(transcript: &[u8]) -> Self {
        CpaceState {
            inner: cpace::CpaceState::new(transcript),
        }
    }

    /// The share to send (32 bytes).
    #[getter]
    fn share<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.share())
    }

    /// The shared secret from the other side's share; `InvalidKey` for a share that does not
    /// decode, is our own, or gives the identity.
    fn finish<'py>(&self, py: Python<'py>, theirs: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let shared = self.inner.finish(theirs).py_err(py)?;
        Ok(PyBytes::new(py, shared.as_ref()))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CpaceState>()?;
    Ok(())
}
