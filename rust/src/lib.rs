//! teia's native extension: the hot paths, as plain Rust modules with plain types.
//!
//! Each module is usable and tested without Python (`cargo test`). The PyO3 glue lives in
//! `python/` behind the `python` feature and only converts types and errors.

pub mod kad;
pub mod password;
pub mod ratchet;
// epoll and recvmmsg/sendmmsg: the relay data plane is Linux-only.
#[cfg(target_os = "linux")]
pub mod relay;
pub mod search;
pub mod signing;

#[cfg(feature = "python")]
mod python;
