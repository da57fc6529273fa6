//! Maps the crypto core's errors to the exception classes of `teia.errors`.

use pyo3::prelude::*;

use crate::ratchet::CryptoError;

/// Convert a core error into the `teia.errors` exception of the same meaning.
pub fn to_py(py: Python<'_>, err: CryptoError) -> PyErr {
    let class = match &err {
        CryptoError::InvalidKey(_) => "InvalidKey",
        CryptoError::InvalidSignature(_) => "InvalidSignature",
        CryptoError::InvalidMessage(_) => "InvalidMessage",
        CryptoError::Decryption(_) => "DecryptionError",
        CryptoError::DuplicateMessage => "DuplicateMessage",
        CryptoError::TooManySkipped => "TooManySkippedMessages",
        CryptoError::InvalidState(_) => "InvalidSessionState",
    };
    match py
        .import("teia.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((err.to_string(),)))
    {
        Ok(instance) => PyErr::from_value(instance),
        Err(import_error) => import_error,
    }
}

/// Extension trait: `result.py_err(py)?` in binding functions.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, CryptoError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
