//! The TURN data plane (RFC 8656): relayed UDP sockets and the forwarding of ChannelData, Send
//! and Data indications, off the GIL on its own thread. The control plane (STUN/TURN requests,
//! authentication, policy, allocation lifetimes) is Python's; it drives this module through
//! [`DataPlane`]'s methods and receives the STUN messages that are not data.
//!
//! - [`codec`]: ChannelData and Send/Data indication wire formats (no I/O).
//! - [`table`]: permissions, channel bindings and the token bucket, on the caller's clock.
//! - [`stats`]: counters and drop reasons (metadata only).
//! - [`dataplane`]: sockets, the worker thread, the API.
//! - `sys`: epoll and recvmmsg/sendmmsg (Linux).

pub mod codec;
pub mod dataplane;
pub mod stats;
mod sys;
pub mod table;

#[cfg(test)]
mod tests;

pub use dataplane::{AllocationStats, Config, DataPlane, RelayError, PERMISSION_LIFETIME, TICK};
pub use stats::{DropReason, GlobalStats, Traffic};
