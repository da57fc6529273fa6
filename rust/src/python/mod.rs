//! The thin PyO3 layer: `teia._native`. Each submodule converts types and errors only.

use pyo3::prelude::*;

mod errors;
mod group;
mod kad;
mod pake;
mod primitives;
#[cfg(target_os = "linux")]
mod relay;
mod session;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    primitives::register(m)?;
    session::register(m)?;
    group::register(m)?;
    kad::register(m)?;
    pake::register(m)?;
    #[cfg(target_os = "linux")]
    relay::register(m)?;
    Ok(())
}
