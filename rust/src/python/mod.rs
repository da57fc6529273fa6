//! The thin PyO3 layer: `teia._native`. Each submodule converts types and errors only.

use pyo3::prelude::*;

mod errors;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
