//! Network-prefix tags for the routing table's eclipse limits.
//!
//! An attacker who wants to surround a key cheaply runs many peer IDs from few hosts; capping how
//! many table entries share one network prefix makes that expensive (it must own many networks).
//! The table never looks at addresses itself: the caller tags each entry with the prefix of the
//! address it observed the peer on (not one the peer claims), using [`IpPrefix::from_ip`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Default prefix length for IPv4 addresses: a /24 is roughly one subnet of one operator.
pub const DEFAULT_V4_PREFIX_BITS: u8 = 24;

/// Default prefix length for IPv6 addresses: a /48 is the usual allocation to one site.
pub const DEFAULT_V6_PREFIX_BITS: u8 = 48;

/// A network prefix: an address with the bits after the prefix length cleared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpPrefix {
    /// An IPv4 network.
    V4 {
        /// The network address (host bits zero).
        network: [u8; 4],
        /// The prefix length, 0..=32.
        bits: u8,
    },
    /// An IPv6 network.
    V6 {
        /// The network address (host bits zero).
        network: [u8; 16],
        /// The prefix length, 0..=128.
        bits: u8,
    },
}

impl IpPrefix {
    /// The /24 (IPv4) or /48 (IPv6) containing `ip`. IPv4-mapped IPv6 addresses
    /// (`::ffff:a.b.c.d`) count as IPv4, so a dual-stack socket does not split one host's
    /// network into two tags.
    pub fn from_ip(ip: IpAddr) -> IpPrefix {
        IpPrefix::with_bits(ip, DEFAULT_V4_PREFIX_BITS, DEFAULT_V6_PREFIX_BITS)
    }

    /// The prefix of `ip` with the given lengths; lengths beyond the address size are clamped
    /// (32 for IPv4, 128 for IPv6).
    pub fn with_bits(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> IpPrefix {
        match ip {
            IpAddr::V4(v4) => IpPrefix::v4(v4, v4_bits),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpPrefix::v4(v4, v4_bits),
                None => IpPrefix::v6(v6, v6_bits),
            },
        }
    }

    fn v4(ip: Ipv4Addr, bits: u8) -> IpPrefix {
        let bits = bits.min(32);
        let mut network = ip.octets();
        mask(&mut network, bits);
        IpPrefix::V4 { network, bits }
    }

    fn v6(ip: Ipv6Addr, bits: u8) -> IpPrefix {
        let bits = bits.min(128);
        let mut network = ip.octets();
        mask(&mut network, bits);
        IpPrefix::V6 { network, bits }
    }
}

/// Clears every bit of `bytes` after the first `bits`.
fn mask(bytes: &mut [u8], bits: u8) {
    let bits = usize::from(bits);
    for (i, byte) in bytes.iter_mut().enumerate() {
        let start = i * 8;
        if start >= bits {
            *byte = 0;
        } else if bits - start < 8 {
            *byte &= 0xffu8 << (8 - (bits - start));
        }
    }
}

impl fmt::Debug for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpPrefix::V4 { network, bits } => write!(f, "{}/{bits}", Ipv4Addr::from(*network)),
            IpPrefix::V6 { network, bits } => write!(f, "{}/{bits}", Ipv6Addr::from(*network)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn kad_prefix_v4_is_slash_24() {
        let a = IpPrefix::from_ip(ip("192.0.2.17"));
        assert_eq!(a, IpPrefix::from_ip(ip("192.0.2.250")));
        assert_ne!(a, IpPrefix::from_ip(ip("192.0.3.17")));
        assert_eq!(a.to_string(), "192.0.2.0/24");
    }

    #[test]
    fn kad_prefix_v6_is_slash_48_and_mapped_v4_is_v4() {
        let a = IpPrefix::from_ip(ip("2001:db8:1:2::1"));
        assert_eq!(a, IpPrefix::from_ip(ip("2001:db8:1:ffff::9")));
        assert_ne!(a, IpPrefix::from_ip(ip("2001:db8:2::1")));
        assert_eq!(a.to_string(), "2001:db8:1::/48");
        assert_eq!(
            IpPrefix::from_ip(ip("::ffff:192.0.2.1")),
            IpPrefix::from_ip(ip("192.0.2.99"))
        );
    }

    #[test]
    fn kad_prefix_odd_lengths_and_clamping() {
        let p = IpPrefix::with_bits(ip("10.255.255.255"), 12, 48);
        assert_eq!(p.to_string(), "10.240.0.0/12");
        let p = IpPrefix::with_bits(ip("10.1.2.3"), 200, 200);
        assert_eq!(p.to_string(), "10.1.2.3/32");
        let p = IpPrefix::with_bits(ip("2001:db8::1"), 0, 0);
        assert_eq!(p.to_string(), "::/0");
        let p = IpPrefix::with_bits(ip("2001:db8::1"), 24, 255);
        assert_eq!(p.to_string(), "2001:db8::1/128");
    }
}
