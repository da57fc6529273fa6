//! Kademlia routing core: XOR keys, k-buckets and the iterative lookup state machine (sans-IO).
//!
//! Compatible with libp2p's kad-dht keyspace (SHA-256 of peer IDs and record keys, XOR metric,
//! 256 buckets). Nothing here does I/O or reads a clock: callers pass times in milliseconds and
//! carry the requests a [`Lookup`] asks for. Peer IDs and addresses are opaque bytes.
//!
//! - [`key`]: [`Key`], [`Distance`].
//! - [`prefix`]: [`IpPrefix`], the network tag the eclipse limits count.
//! - [`table`]: [`RoutingTable`] with least-recently-seen buckets and prefix limits.
//! - [`lookup`]: [`Lookup`], the iterative FIND_NODE state machine.

pub mod key;
pub mod lookup;
pub mod prefix;
pub mod table;

#[cfg(test)]
mod simulation;
#[cfg(test)]
mod testutil;

pub use key::{Distance, Key, KEY_BITS, KEY_BYTES};
pub use lookup::{Action, Lookup, LookupConfig, LookupStats, Peer};
pub use prefix::IpPrefix;
pub use table::{Entry, Eviction, InsertOutcome, Refused, RoutingTable, TableConfig};
