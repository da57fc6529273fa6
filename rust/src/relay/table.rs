//! Per-allocation state with lifetimes: permissions, channel bindings, and the byte-rate token
//! bucket. Sans-IO: every call takes the current time; nothing here reads a clock.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::{CHANNEL_MAX, CHANNEL_MIN};

/// After a channel binding expires, neither its number nor its peer may be bound to anything
/// else for this long (RFC 8656 §12: "MUST NOT be bound to a different transport address until
/// 5 minutes after the binding expired").
pub const CHANNEL_QUARANTINE: Duration = Duration::from_secs(300);

/// Installed permissions: peer IP → expiry (RFC 8656 §9; ports are not part of a permission).
#[derive(Debug, Default)]
pub struct Permissions {
    expiry: HashMap<IpAddr, Instant>,
}

impl Permissions {
    /// Install or refresh the permission for `ip` until `now + lifetime`; a zero lifetime removes it.
    pub fn install(&mut self, ip: IpAddr, now: Instant, lifetime: Duration) {
        if lifetime.is_zero() {
            self.expiry.remove(&ip);
        } else {
            self.expiry.insert(ip, now + lifetime);
        }
    }

    /// Make the permission for `ip` last at least until `now + lifetime` (never shortens it).
    pub fn extend(&mut self, ip: IpAddr, now: Instant, lifetime: Duration) {
        let until = now + lifetime;
        let entry = self.expiry.entry(ip).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// Whether a permission for `ip` is live at `now`.
    #[inline]
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        self.expiry.get(&ip).is_some_and(|&until| now < until)
    }

    /// Forget expired permissions.
    pub fn sweep(&mut self, now: Instant) {
        self.expiry.retain(|_, until| now < *until);
    }

    /// Installed permissions, live or not yet swept.
    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }
}

/// Why a channel could not be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    /// Not in 0x4000–0x4FFF.
    OutOfRange(u16),
    /// The number is bound (or quarantined) to another peer.
    NumberInUse { channel: u16, peer: SocketAddr },
    /// The peer is bound (or quarantined) to another number.
    PeerInUse { peer: SocketAddr, channel: u16 },
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::OutOfRange(c) => write!(
                f,
                "channel number {c:#06x} is outside {CHANNEL_MIN:#06x}-{CHANNEL_MAX:#06x}"
            ),
            ChannelError::NumberInUse { channel, peer } => {
                write!(f, "channel {channel:#06x} is bound to {peer}")
            }
            ChannelError::PeerInUse { peer, channel } => {
                write!(f, "peer {peer} is bound to channel {channel:#06x}")
            }
        }
    }
}

impl std::error::Error for ChannelError {}

#[derive(Debug, Clone, Copy)]
struct Binding {
    peer: SocketAddr,
    until: Instant,
}

/// Channel bindings of one allocation: number ↔ peer transport address, both ways unique.
#[derive(Debug, Default)]
pub struct Channels {
    by_number: HashMap<u16, Binding>,
    by_peer: HashMap<SocketAddr, u16>,
}

impl Channels {
    /// Bind `channel` to `peer` until `now + lifetime`, or refresh that same binding.
    pub fn bind(
        &mut self,
        channel: u16,
        peer: SocketAddr,
        now: Instant,
        lifetime: Duration,
    ) -> Result<(), ChannelError> {
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
            return Err(ChannelError::OutOfRange(channel));
        }
        let reserved = |b: &Binding| now < b.until + CHANNEL_QUARANTINE;
        if let Some(b) = self.by_number.get(&channel) {
            if b.peer != peer && reserved(b) {
                return Err(ChannelError::NumberInUse {
                    channel,
                    peer: b.peer,
                });
            }
        }
        if let Some(&other) = self.by_peer.get(&peer) {
            if other != channel && self.by_number.get(&other).is_some_and(reserved) {
                return Err(ChannelError::PeerInUse {
                    peer,
                    channel: other,
                });
            }
        }
        // Either a refresh or both sides are free (possibly holding stale entries).
        if let Some(old) = self.by_number.insert(
            channel,
            Binding {
                peer,
                until: now + lifetime,
            },
        ) {
            if old.peer != peer {
                self.by_peer.remove(&old.peer);
            }
        }
        if let Some(old) = self.by_peer.insert(peer, channel) {
            if old != channel {
                self.by_number.remove(&old);
            }
        }
        Ok(())
    }

    /// The peer bound to `channel`, if the binding is live.
    #[inline]
    pub fn peer(&self, channel: u16, now: Instant) -> Option<SocketAddr> {
        self.by_number
            .get(&channel)
            .filter(|b| now < b.until)
            .map(|b| b.peer)
    }

    /// The channel bound to `peer`, if the binding is live.
    #[inline]
    pub fn channel(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        if self.by_number.is_empty() {
            return None;
        }
        let &channel = self.by_peer.get(&peer)?;
        self.peer(channel, now).map(|_| channel)
    }

    /// Forget bindings past their quarantine.
    pub fn sweep(&mut self, now: Instant) {
        let by_peer = &mut self.by_peer;
        self.by_number.retain(|_, b| {
            let keep = now < b.until + CHANNEL_QUARANTINE;
            if !keep {
                by_peer.remove(&b.peer);
            }
            keep
        });
    }

    /// Bindings held, live or quarantined.
    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }
}

/// A byte-rate limiter. A datagram passes while the bucket holds any tokens at all and then
/// takes its full size (the balance may go negative), so datagrams larger than the burst still
/// pass and the long-run rate stays at `rate` bytes per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The smallest burst: a few full-size datagrams.
pub const MIN_BURST: u64 = 16 * 1024;

impl TokenBucket {
    /// A bucket refilling at `rate` bytes per second, starting full; 0 means unlimited. The burst
    /// is 100 ms worth of rate, at least [`MIN_BURST`].
    pub fn new(rate: u64, now: Instant) -> Self {
        let burst = (rate / 10).max(MIN_BURST) as f64;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// The configured rate in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Change the rate; the bucket starts full again.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        *self = TokenBucket::new(rate, now);
    }

    /// Whether `bytes` may pass at `now`; takes them from the bucket if so.
    #[inline]
    pub fn take(&mut self, bytes: usize, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        if now > self.last {
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst);
            self.last = now;
        }
        if self.tokens > 0.0 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn permissions_expire_on_the_callers_clock() {
        let t0 = Instant::now();
        let mut p = Permissions::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!p.allows(ip, t0));
        p.install(ip, t0, Duration::from_secs(300));
        assert!(p.allows(ip, t0 + Duration::from_secs(299)));
        assert!(!p.allows(ip, t0 + Duration::from_secs(300)));
        assert!(!p.allows("192.0.2.2".parse().unwrap(), t0));
        // A refresh extends it.
        p.install(ip, t0 + Duration::from_secs(200), Duration::from_secs(300));
        assert!(p.allows(ip, t0 + Duration::from_secs(450)));
        p.sweep(t0 + Duration::from_secs(499));
        assert_eq!(p.len(), 1);
        p.sweep(t0 + Duration::from_secs(500));
        assert!(p.is_empty());
        p.install(ip, t0, Duration::from_secs(1));
        p.install(ip, t0, Duration::ZERO);
        assert!(!p.allows(ip, t0));
        // extend only ever lengthens.
        p.extend(ip, t0, Duration::from_secs(10));
        p.extend(ip, t0, Duration::from_secs(5));
        assert!(p.allows(ip, t0 + Duration::from_secs(9)));
    }

    #[test]
    fn channels_bind_refresh_expire_and_quarantine() {
        let t0 = Instant::now();
        let ten = Duration::from_secs(10);
        let mut c = Channels::default();
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.1:1001"));
        assert_eq!(
            c.bind(0x3FFF, a, t0, ten),
            Err(ChannelError::OutOfRange(0x3FFF))
        );
        assert_eq!(
            c.bind(0x5000, a, t0, ten),
            Err(ChannelError::OutOfRange(0x5000))
        );
        c.bind(0x4000, a, t0, ten).unwrap();
        assert_eq!(c.peer(0x4000, t0), Some(a));
        assert_eq!(c.channel(a, t0), Some(0x4000));
        assert_eq!(c.channel(b, t0), None);
        assert!(matches!(
            c.bind(0x4000, b, t0, ten),
            Err(ChannelError::NumberInUse { .. })
        ));
        assert!(matches!(
            c.bind(0x4001, a, t0, ten),
            Err(ChannelError::PeerInUse { .. })
        ));
        // Refresh, then expiry stops forwarding at once.
        c.bind(0x4000, a, t0 + ten, ten).unwrap();
        let expired = t0 + ten + ten;
        assert_eq!(c.peer(0x4000, expired - Duration::from_millis(1)), Some(a));
        assert_eq!(c.peer(0x4000, expired), None);
        assert_eq!(c.channel(a, expired), None);
        // Quarantined: still refused for others, but the same pair may come back.
        assert!(c.bind(0x4000, b, expired, ten).is_err());
        c.sweep(expired + CHANNEL_QUARANTINE - Duration::from_secs(1));
        assert_eq!(c.len(), 1);
        let later = expired + CHANNEL_QUARANTINE;
        c.bind(0x4000, b, later, ten).unwrap();
        assert_eq!(c.peer(0x4000, later), Some(b));
        assert_eq!(c.channel(a, later), None);
        c.bind(0x4001, a, later, ten).unwrap();
        assert_eq!(c.channel(a, later), Some(0x4001));
        c.sweep(later + ten + CHANNEL_QUARANTINE);
        assert!(c.is_empty());
    }

    #[test]
    fn channel_tables_stay_consistent_under_random_operations() {
        let mut seed = 0x1234_5678_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let t0 = Instant::now();
        let mut c = Channels::default();
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_secs(step / 10);
            let channel = CHANNEL_MIN + (next() % 8) as u16;
            let peer = SocketAddr::new("192.0.2.9".parse().unwrap(), 5000 + (next() % 8) as u16);
            match next() % 4 {
                0 | 1 => {
                    let _ = c.bind(channel, peer, now, Duration::from_secs(next() % 600));
                }
                2 => c.sweep(now),
                _ => {}
            }
            // Both directions agree on every live binding.
            for ch in CHANNEL_MIN..CHANNEL_MIN + 8 {
                if let Some(p) = c.peer(ch, now) {
                    assert_eq!(c.channel(p, now), Some(ch));
                }
            }
            assert_eq!(c.by_number.len(), c.by_peer.len());
        }
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut unlimited = TokenBucket::new(0, t0);
        assert!((0..10_000).all(|_| unlimited.take(65_000, t0)));

        let rate = 1_000_000;
        let mut bucket = TokenBucket::new(rate, t0);
        // 10 s of 1200-byte datagrams offered at 10× the rate, in 1 ms steps.
        let mut passed = 0u64;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for _ in 0..8 {
                if bucket.take(1200, now) {
                    passed += 1200;
                }
            }
        }
        let ideal = rate * 10 + rate / 10;
        assert!(passed <= ideal + 1200, "{passed} > {ideal}");
        assert!(
            passed >= ideal - 2 * 1200 - rate / 100,
            "{passed} < {ideal}"
        );

        // A datagram larger than the burst passes on a full bucket, then the debt is paid.
        let mut small = TokenBucket::new(1000, t0);
        assert!(small.take(60_000, t0));
        assert!(!small.take(1, t0 + Duration::from_secs(40)));
        assert!(small.take(1, t0 + Duration::from_secs(45)));
        small.set_rate(0, t0);
        assert_eq!(small.rate(), 0);
        assert!(small.take(1_000_000, t0));
    }
}
