//! The routing table: 256 k-buckets around the local key, least-recently-seen eviction through a
//! caller-run ping, and per-network-prefix limits against eclipse attacks.
//!
//! Rules, in the order [`RoutingTable::insert`] applies them:
//!
//! 1. The local key is never an entry.
//! 2. A known entry is updated (addresses, last-seen time, prefix) and moves to the tail of its
//!    bucket: buckets are ordered least recently seen first.
//! 3. A new entry is refused if its prefix already has `max_per_prefix_per_bucket` entries in
//!    its bucket or `max_per_prefix` entries in the table.
//! 4. A new entry goes at the tail of a bucket with room.
//! 5. In a full bucket nothing is evicted: the candidate is parked as the bucket's pending entry
//!    and the caller is asked to ping the bucket's oldest entry. [`RoutingTable::ping_ok`] keeps
//!    the oldest (long-lived peers are the likeliest to stay, and an attacker cannot flush them
//!    by flooding new IDs); [`RoutingTable::ping_failed`] evicts it and inserts the candidate.
//!    One ping per bucket is outstanding at a time; a pending entry older than
//!    `pending_timeout_ms` may be replaced by a newer candidate. The same candidate inserted
//!    again stays linked to the entry it waits on, and the answer names that entry (even if it
//!    has been seen since and is no longer the oldest), so the ping already under way settles it.
//!
//! Times are milliseconds on any monotonic clock the caller chooses; the table never reads one.

use std::collections::HashMap;
use std::fmt;

use rand_core::RngCore;

use super::key::{Distance, Key, KEY_BITS};
use super::prefix::IpPrefix;

/// Tunables of a [`RoutingTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Bucket capacity (Kademlia's k).
    pub k: usize,
    /// Most entries sharing one IP prefix in one bucket.
    pub max_per_prefix_per_bucket: usize,
    /// Most entries sharing one IP prefix in the whole table.
    pub max_per_prefix: usize,
    /// Addresses kept per entry; extra ones are dropped (a peer may claim any number).
    pub max_addrs_per_entry: usize,
    /// How long a bucket's pending candidate blocks newer candidates while the caller pings.
    pub pending_timeout_ms: u64,
}

impl Default for TableConfig {
    fn default() -> TableConfig {
        TableConfig {
            k: 20,
            max_per_prefix_per_bucket: 2,
            max_per_prefix: 10,
            max_addrs_per_entry: 16,
            pending_timeout_ms: 60_000,
        }
    }
}

/// One contact in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    peer_id: Vec<u8>,
    key: Key,
    addrs: Vec<Vec<u8>>,
    last_seen_ms: u64,
    ip_prefix: Option<IpPrefix>,
}

impl Entry {
    /// A contact: its peer ID bytes (opaque; the key is their SHA-256), its addresses (opaque,
    /// e.g. binary multiaddrs), when it was last seen, and the prefix of the address it was
    /// seen on (`None` exempts it from the prefix limits, e.g. for configured bootstrap nodes).
    pub fn new(
        peer_id: Vec<u8>,
        addrs: Vec<Vec<u8>>,
        last_seen_ms: u64,
        ip_prefix: Option<IpPrefix>,
    ) -> Entry {
        let key = Key::from_peer_id_bytes(&peer_id);
        Entry {
            peer_id,
            key,
            addrs,
            last_seen_ms,
            ip_prefix,
        }
    }

    /// The peer ID bytes.
    pub fn peer_id(&self) -> &[u8] {
        &self.peer_id
    }

    /// The key: SHA-256 of the peer ID bytes.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The addresses, as given (at most `max_addrs_per_entry` of them).
    pub fn addrs(&self) -> &[Vec<u8>] {
        &self.addrs
    }

    /// When the peer was last seen (caller's clock, milliseconds).
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms
    }

    /// The network prefix the limits count this entry under.
    pub fn ip_prefix(&self) -> Option<IpPrefix> {
        self.ip_prefix
    }
}

/// What [`RoutingTable::insert`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new entry, at the tail of its bucket.
    Inserted,
    /// A known entry: refreshed and moved to the tail of its bucket.
    Updated,
    /// The bucket is full; the candidate waits. Ping `oldest` and report the result with
    /// [`RoutingTable::ping_ok`] or [`RoutingTable::ping_failed`].
    Pending {
        /// Key of the bucket's least recently seen entry.
        oldest: Key,
        /// Its peer ID, to dial it.
        oldest_peer_id: Vec<u8>,
    },
    /// Not inserted.
    Refused(Refused),
}

/// Why an entry was not inserted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The entry is the local node.
    LocalKey,
    /// Its bucket already holds `limit` entries from `prefix`.
    BucketPrefixLimit {
        /// The crowded prefix.
        prefix: IpPrefix,
        /// The per-bucket limit.
        limit: usize,
    },
    /// The table already holds `limit` entries from `prefix`.
    TablePrefixLimit {
        /// The crowded prefix.
        prefix: IpPrefix,
        /// The table-wide limit.
        limit: usize,
    },
    /// The bucket is full and a ping of its oldest entry is already outstanding for another
    /// candidate; try again once that ping is reported (or `pending_timeout_ms` passed).
    BucketFull,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::LocalKey => write!(f, "the local node is not a routing table entry"),
            Refused::BucketPrefixLimit { prefix, limit } => write!(
                f,
                "bucket already holds {limit} entries from {prefix}; \
                 peers from other networks are preferred"
            ),
            Refused::TablePrefixLimit { prefix, limit } => write!(
                f,
                "routing table already holds {limit} entries from {prefix}; \
                 peers from other networks are preferred"
            ),
            Refused::BucketFull => write!(
                f,
                "bucket full and a ping of its oldest entry is outstanding; \
                 retry after ping_ok/ping_failed"
            ),
        }
    }
}

impl std::error::Error for Refused {}

/// What [`RoutingTable::ping_failed`] (or [`RoutingTable::remove`]) changed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Eviction {
    /// The removed entry, if it was in the table.
    pub evicted: Option<Entry>,
    /// The pending candidate that took the freed slot, if any.
    pub promoted: Option<Key>,
}

#[derive(Clone, Debug)]
struct Pending {
    entry: Entry,
    oldest: Key,
    since_ms: u64,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    pending: Option<Pending>,
    /// Last time a lookup covered this bucket's range or a new entry joined it.
    refreshed_ms: Option<u64>,
}

impl Bucket {
    fn position(&self, key: &Key) -> Option<usize> {
        self.entries.iter().position(|e| e.key == *key)
    }

    fn count_prefix(&self, prefix: &IpPrefix) -> usize {
        self.entries
            .iter()
            .filter(|e| e.ip_prefix.as_ref() == Some(prefix))
            .count()
    }
}

/// A Kademlia routing table around a local key. See the module documentation for the rules.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    local: Key,
    config: TableConfig,
    buckets: Vec<Bucket>,
    prefix_counts: HashMap<IpPrefix, usize>,
    len: usize,
    /// The buckets that have entries: `closest` visits only those (most of the 256 are empty).
    occupied: BucketSet,
}

impl RoutingTable {
    /// An empty table around `local` (the local node's key).
    pub fn new(local: Key, config: TableConfig) -> RoutingTable {
        RoutingTable {
            local,
            config,
            buckets: vec![Bucket::default(); KEY_BITS],
            prefix_counts: HashMap::new(),
            len: 0,
            occupied: BucketSet::default(),
        }
    }

    /// The local node's key.
    pub fn local_key(&self) -> &Key {
        &self.local
    }

    /// The configuration.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// Number of entries (pending candidates not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bucket `key` belongs in; `None` for the local key.
    pub fn bucket_index(&self, key: &Key) -> Option<usize> {
        self.local.distance(key).bucket_index()
    }

    /// Inserts or refreshes `entry` at time `now_ms`. See the module documentation.
    pub fn insert(&mut self, mut entry: Entry, now_ms: u64) -> InsertOutcome {
        let Some(index) = self.bucket_index(&entry.key) else {
            return InsertOutcome::Refused(Refused::LocalKey);
        };
        entry.addrs.truncate(self.config.max_addrs_per_entry);

        if let Some(pos) = self.buckets[index].position(&entry.key) {
            return self.update(index, pos, entry);
        }

        if let Some(prefix) = entry.ip_prefix {
            if let Err(refused) = self.check_prefix(index, &prefix) {
                return InsertOutcome::Refused(refused);
            }
        }

        let k = self.config.k;
        let pending_timeout = self.config.pending_timeout_ms;
        let bucket = &mut self.buckets[index];
        if bucket.entries.len() < k {
            bucket.entries.push(entry);
            bucket.refreshed_ms = bucket.refreshed_ms.max(Some(now_ms));
            self.count_in(index);
            return InsertOutcome::Inserted;
        }

        let Some(oldest) = bucket.entries.first() else {
            // k == 0: no bucket ever has room.
            return InsertOutcome::Refused(Refused::BucketFull);
        };
        let (oldest_key, oldest_peer_id) = (oldest.key, oldest.peer_id.clone());
        match &mut bucket.pending {
            Some(p) if p.entry.key == entry.key => {
                // The same candidate again: keep its place and its link, take the fresher data.
                // The link stays on the entry the caller was first asked to ping, even if that
                // entry has since been seen and is no longer the oldest: that ping may still be
                // outstanding, and its ping_ok/ping_failed must be the one that settles the
                // candidate. So the answer names the linked entry, not the current oldest.
                p.entry = entry;
                let linked = bucket.entries.iter().find(|e| e.key == p.oldest);
                if let Some(linked) = linked {
                    return InsertOutcome::Pending {
                        oldest: linked.key,
                        oldest_peer_id: linked.peer_id.clone(),
                    };
                }
                // Not reached: removing any entry of a bucket settles its pending candidate, so
                // the linked entry is present while the candidate waits. Relink to be safe.
                p.oldest = oldest_key;
            }
            Some(p) if now_ms.saturating_sub(p.since_ms) < pending_timeout => {
                return InsertOutcome::Refused(Refused::BucketFull);
            }
            slot => {
                *slot = Some(Pending {
                    entry,
                    oldest: oldest_key,
                    since_ms: now_ms,
                });
            }
        }
        InsertOutcome::Pending {
            oldest: oldest_key,
            oldest_peer_id,
        }
    }

    fn update(&mut self, index: usize, pos: usize, entry: Entry) -> InsertOutcome {
        let old_prefix = self.buckets[index].entries[pos].ip_prefix;
        if entry.ip_prefix != old_prefix {
            if let Some(prefix) = entry.ip_prefix {
                if let Err(refused) = self.check_prefix(index, &prefix) {
                    return InsertOutcome::Refused(refused);
                }
            }
            if let Some(old) = old_prefix {
                self.prefix_counts_sub(&old);
            }
            if let Some(new) = entry.ip_prefix {
                *self.prefix_counts.entry(new).or_insert(0) += 1;
            }
        }
        let bucket = &mut self.buckets[index];
        bucket.entries.remove(pos);
        bucket.entries.push(entry);
        InsertOutcome::Updated
    }

    fn check_prefix(&self, index: usize, prefix: &IpPrefix) -> Result<(), Refused> {
        let limit = self.config.max_per_prefix_per_bucket;
        if self.buckets[index].count_prefix(prefix) >= limit {
            return Err(Refused::BucketPrefixLimit {
                prefix: *prefix,
                limit,
            });
        }
        let limit = self.config.max_per_prefix;
        if self.prefix_counts.get(prefix).copied().unwrap_or(0) >= limit {
            return Err(Refused::TablePrefixLimit {
                prefix: *prefix,
                limit,
            });
        }
        Ok(())
    }

    /// Accounts for the entry just pushed at the tail of bucket `index`.
    fn count_in(&mut self, index: usize) {
        self.len += 1;
        self.occupied.insert(index);
        if let Some(prefix) = self.buckets[index].entries.last().and_then(|e| e.ip_prefix) {
            *self.prefix_counts.entry(prefix).or_insert(0) += 1;
        }
    }

    fn prefix_counts_sub(&mut self, prefix: &IpPrefix) {
        if let Some(count) = self.prefix_counts.get_mut(prefix) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.prefix_counts.remove(prefix);
            }
        }
    }

    /// The oldest entry `oldest` answered a ping: it becomes the most recently seen entry of its
    /// bucket, and a candidate waiting on this ping is dropped. Returns whether `oldest` is in
    /// the table.
    pub fn ping_ok(&mut self, oldest: &Key, now_ms: u64) -> bool {
        let Some(index) = self.bucket_index(oldest) else {
            return false;
        };
        let bucket = &mut self.buckets[index];
        if bucket.pending.as_ref().is_some_and(|p| p.oldest == *oldest) {
            bucket.pending = None;
        }
        let Some(pos) = bucket.position(oldest) else {
            return false;
        };
        let mut entry = bucket.entries.remove(pos);
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        bucket.entries.push(entry);
        true
    }

    /// The entry `oldest` did not answer a ping: it is evicted, and the bucket's pending
    /// candidate (if any, and if the prefix limits still allow it) takes its place.
    pub fn ping_failed(&mut self, oldest: &Key) -> Eviction {
        self.remove_entry(oldest)
    }

    /// Removes the entry for `key`, if present. A pending candidate of its bucket takes the
    /// freed slot (see [`RoutingTable::ping_failed`], which reports that).
    pub fn remove(&mut self, key: &Key) -> Option<Entry> {
        self.remove_entry(key).evicted
    }

    fn remove_entry(&mut self, key: &Key) -> Eviction {
        let Some(index) = self.bucket_index(key) else {
            return Eviction::default();
        };
        let bucket = &mut self.buckets[index];
        if bucket.pending.as_ref().is_some_and(|p| p.entry.key == *key) {
            // Removing a candidate that is still pending: forget it.
            bucket.pending = None;
        }
        let Some(pos) = bucket.position(key) else {
            return Eviction::default();
        };
        let evicted = bucket.entries.remove(pos);
        if bucket.entries.is_empty() {
            self.occupied.remove(index);
        }
        self.len = self.len.saturating_sub(1);
        if let Some(prefix) = evicted.ip_prefix {
            self.prefix_counts_sub(&prefix);
        }
        let promoted = self.promote_pending(index);
        Eviction {
            evicted: Some(evicted),
            promoted,
        }
    }

    fn promote_pending(&mut self, index: usize) -> Option<Key> {
        let pending = self.buckets[index].pending.take()?;
        if self.buckets[index].entries.len() >= self.config.k {
            return None;
        }
        if let Some(prefix) = pending.entry.ip_prefix {
            // Other inserts may have filled the prefix quota since the candidate was parked.
            self.check_prefix(index, &prefix).ok()?;
        }
        let key = pending.entry.key;
        self.buckets[index].entries.push(pending.entry);
        self.count_in(index);
        Some(key)
    }

    /// The entry for `key`, if present.
    pub fn get(&self, key: &Key) -> Option<&Entry> {
        let index = self.bucket_index(key)?;
        let bucket = &self.buckets[index];
        bucket.position(key).map(|pos| &bucket.entries[pos])
    }

    /// Whether `key` has an entry.
    pub fn contains(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// All entries, bucket by bucket (closest bucket first), least recently seen first within a
    /// bucket.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// The entries of bucket `index` (least recently seen first); empty if `index` ≥ 256.
    pub fn bucket(&self, index: usize) -> &[Entry] {
        self.buckets.get(index).map_or(&[], |b| &b.entries)
    }

    /// The candidate waiting on a ping in bucket `index`, if any.
    pub fn pending(&self, index: usize) -> Option<&Entry> {
        self.buckets.get(index)?.pending.as_ref().map(|p| &p.entry)
    }

    /// Up to `n` entries closest to `target` by XOR distance, closest first.
    ///
    /// Walks the buckets in increasing distance to `target` and sorts only the buckets it takes,
    /// so the cost is that of the few buckets that hold the answer, not of the whole table.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<&Entry> {
        let mut found: Vec<(Distance, &Entry)> = Vec::with_capacity(n.min(self.len));
        if n == 0 {
            return Vec::new();
        }
        for index in BucketWalk::new(&self.local.distance(target), self.occupied) {
            let entries = &self.buckets[index].entries;
            // `start < n`: the walk stops once `n` are found.
            let start = found.len();
            found.extend(entries.iter().map(|e| (e.key.distance(target), e)));
            let needed = n - start;
            if found.len() - start > needed {
                // A big bucket (a large k): select the needed nearest, then sort only those.
                found[start..].select_nth_unstable_by_key(needed, |a| a.0);
                found.truncate(n);
            }
            found[start..].sort_unstable_by_key(|a| a.0);
            if found.len() >= n {
                break;
            }
        }
        found.into_iter().map(|(_, e)| e).collect()
    }

    /// Records that a lookup for `target` ran at `now_ms`, which refreshes `target`'s bucket.
    pub fn mark_refreshed(&mut self, target: &Key, now_ms: u64) {
        if let Some(index) = self.bucket_index(target) {
            let bucket = &mut self.buckets[index];
            bucket.refreshed_ms = bucket.refreshed_ms.max(Some(now_ms));
        }
    }

    /// Buckets due for a refresh: neither a lookup into their range nor a new entry in the last
    /// `max_age_ms` (or ever). Buckets closer than the closest non-empty bucket are skipped: with
    /// the network's size they are almost surely empty, and the self-lookup a node runs when it
    /// joins (and periodically) covers them.
    pub fn stale_buckets(&self, now_ms: u64, max_age_ms: u64) -> Vec<usize> {
        let Some(first) = self.buckets.iter().position(|b| !b.entries.is_empty()) else {
            return Vec::new();
        };
        (first..KEY_BITS)
            .filter(|&i| match self.buckets[i].refreshed_ms {
                None => true,
                Some(at) => now_ms.saturating_sub(at) >= max_age_ms,
            })
            .collect()
    }

    /// For each stale bucket (see [`RoutingTable::stale_buckets`]), a random key in its range to
    /// look up. After each lookup, call [`RoutingTable::mark_refreshed`] with its target.
    pub fn refresh_targets<R: RngCore + ?Sized>(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        rng: &mut R,
    ) -> Vec<Key> {
        self.stale_buckets(now_ms, max_age_ms)
            .into_iter()
            .filter_map(|i| self.local.random_in_bucket(i, rng))
            .collect()
    }
}

/// A set of bucket indices (0..256) as a bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BucketSet([u64; KEY_BITS / 64]);

impl BucketSet {
    /// The set bits of a distance: bucket `i` is in the set when bit `i` of `d` is 1.
    fn of_distance(d: &Distance) -> BucketSet {
        let bytes = d.as_bytes();
        let mut words = [0u64; KEY_BITS / 64];
        for (j, word) in words.iter_mut().enumerate() {
            // Word j holds bits 64j..64j+63, which are big-endian bytes 24-8j..32-8j.
            let mut chunk = [0u8; 8];
            chunk.copy_from_slice(&bytes[24 - 8 * j..32 - 8 * j]);
            *word = u64::from_be_bytes(chunk);
        }
        BucketSet(words)
    }

    fn contains(&self, i: usize) -> bool {
        i < KEY_BITS && self.0[i / 64] >> (i % 64) & 1 == 1
    }

    fn insert(&mut self, i: usize) {
        if i < KEY_BITS {
            self.0[i / 64] |= 1 << (i % 64);
        }
    }

    fn remove(&mut self, i: usize) {
        if i < KEY_BITS {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The indices strictly below `b`.
    fn below(b: usize) -> BucketSet {
        let mut words = [0u64; KEY_BITS / 64];
        for (j, word) in words.iter_mut().enumerate() {
            let lo = 64 * j;
            *word = if b >= lo + 64 {
                u64::MAX
            } else if b <= lo {
                0
            } else {
                (1u64 << (b - lo)) - 1
            };
        }
        BucketSet(words)
    }

    fn and(self, other: BucketSet) -> BucketSet {
        let mut words = self.0;
        for (w, o) in words.iter_mut().zip(other.0) {
            *w &= o;
        }
        BucketSet(words)
    }

    fn complement(self) -> BucketSet {
        BucketSet(self.0.map(|w| !w))
    }

    /// Removes and returns the smallest index.
    fn pop_lowest(&mut self) -> Option<usize> {
        for (j, word) in self.0.iter_mut().enumerate() {
            if *word != 0 {
                let bit = word.trailing_zeros() as usize;
                *word &= *word - 1;
                return Some(64 * j + bit);
            }
        }
        None
    }

    /// Removes and returns the largest index.
    fn pop_highest(&mut self) -> Option<usize> {
        for (j, word) in self.0.iter_mut().enumerate().rev() {
            if *word != 0 {
                let bit = 63 - word.leading_zeros() as usize;
                *word &= !(1 << bit);
                return Some(64 * j + bit);
            }
        }
        None
    }
}

/// The non-empty buckets in increasing distance of their entries to a target at distance `d`
/// from the local key (every entry of an earlier bucket is closer than every entry of a later
/// one).
///
/// With `b` the bucket of `d` and an entry at distance `x` from the local key (top bit `i`), its
/// distance to the target is `x ^ d`:
/// - `i == b`: the top bits cancel, distance < 2^b: the closest bucket.
/// - `i < b`: distance has top bit `b`, bits between `b` and `i` equal those of `d`, and bit `i`
///   is `!d_i`. Of two such buckets `i > j`, bucket `i` is closer exactly when `d_i` is 1. So:
///   buckets `i < b` with `d_i = 1` by descending `i`, then those with `d_i = 0` by ascending `i`.
/// - `i > b`: distance has top bit `i`: by ascending `i`, after all of the above.
///
/// For `d = 0` (target is the local key) the order is simply ascending. Lazy, and driven by
/// bitmaps, because `closest` usually stops after one or two buckets.
struct BucketWalk {
    own: Option<usize>,
    below_set: BucketSet,
    below_clear: BucketSet,
    above: BucketSet,
}

impl BucketWalk {
    fn new(d: &Distance, occupied: BucketSet) -> BucketWalk {
        let Some(b) = d.bucket_index() else {
            return BucketWalk {
                own: None,
                below_set: BucketSet::default(),
                below_clear: BucketSet::default(),
                above: occupied,
            };
        };
        let below = BucketSet::below(b).and(occupied);
        let bits = BucketSet::of_distance(d);
        BucketWalk {
            own: Some(b).filter(|&b| occupied.contains(b)),
            below_set: below.and(bits),
            below_clear: below.and(bits.complement()),
            above: occupied.and(BucketSet::below(b + 1).complement()),
        }
    }
}

impl Iterator for BucketWalk {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        self.own
            .take()
            .or_else(|| self.below_set.pop_highest())
            .or_else(|| self.below_clear.pop_lowest())
            .or_else(|| self.above.pop_lowest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kad::testutil::SplitMix64;
    use std::net::{IpAddr, Ipv4Addr};

    fn peer(n: u64) -> Vec<u8> {
        let mut id = b"peer-".to_vec();
        id.extend_from_slice(&n.to_be_bytes());
        id
    }

    fn prefix(a: u8, b: u8, c: u8) -> Option<IpPrefix> {
        Some(IpPrefix::from_ip(IpAddr::V4(Ipv4Addr::new(a, b, c, 1))))
    }

    /// Peer IDs whose keys land in bucket `index` of `local`, found by trying counters.
    fn peers_in_bucket(local: &Key, index: usize, count: usize, salt: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut n = salt << 32;
        while out.len() < count {
            let id = peer(n);
            if local.distance(&Key::from_peer_id_bytes(&id)).bucket_index() == Some(index) {
                out.push(id);
            }
            n += 1;
        }
        out
    }

    fn small_config(k: usize) -> TableConfig {
        TableConfig {
            k,
            max_per_prefix_per_bucket: usize::MAX,
            max_per_prefix: usize::MAX,
            ..TableConfig::default()
        }
    }

    #[test]
    fn kad_table_refuses_local_key() {
        let local_id = peer(0);
        let mut t = RoutingTable::new(Key::from_peer_id_bytes(&local_id), TableConfig::default());
        let out = t.insert(Entry::new(local_id, vec![], 1, None), 1);
        assert_eq!(out, InsertOutcome::Refused(Refused::LocalKey));
        assert!(t.is_empty());
    }

    #[test]
    fn kad_table_insert_update_moves_to_tail() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(4));
        let ids = peers_in_bucket(&local, 255, 3, 1);
        for (i, id) in ids.iter().enumerate() {
            let out = t.insert(
                Entry::new(id.clone(), vec![vec![i as u8]], i as u64, None),
                10,
            );
            assert_eq!(out, InsertOutcome::Inserted);
        }
        assert_eq!(t.len(), 3);
        let e = Entry::new(ids[0].clone(), vec![b"new".to_vec()], 99, None);
        assert_eq!(t.insert(e, 99), InsertOutcome::Updated);
        assert_eq!(t.len(), 3);
        let order: Vec<&[u8]> = t.bucket(255).iter().map(|e| e.peer_id()).collect();
        assert_eq!(order, vec![&ids[1][..], &ids[2][..], &ids[0][..]]);
        let got = t.get(&Key::from_peer_id_bytes(&ids[0])).expect("present");
        assert_eq!(got.addrs(), &[b"new".to_vec()]);
        assert_eq!(got.last_seen_ms(), 99);
        assert_eq!(t.iter().count(), 3);
    }

    #[test]
    fn kad_table_full_bucket_ping_ok_keeps_oldest() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(2));
        let ids = peers_in_bucket(&local, 255, 4, 2);
        for id in &ids[..2] {
            assert_eq!(
                t.insert(Entry::new(id.clone(), vec![], 1, None), 1),
                InsertOutcome::Inserted
            );
        }
        let oldest = Key::from_peer_id_bytes(&ids[0]);
        let out = t.insert(Entry::new(ids[2].clone(), vec![], 2, None), 2);
        assert_eq!(
            out,
            InsertOutcome::Pending {
                oldest,
                oldest_peer_id: ids[0].clone()
            }
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.pending(255).map(|e| e.peer_id()), Some(&ids[2][..]));
        // A second candidate while the ping is outstanding is refused …
        let out = t.insert(Entry::new(ids[3].clone(), vec![], 3, None), 3);
        assert_eq!(out, InsertOutcome::Refused(Refused::BucketFull));
        // … the same candidate again is still pending.
        let out = t.insert(Entry::new(ids[2].clone(), vec![], 4, None), 4);
        assert!(matches!(out, InsertOutcome::Pending { .. }));

        assert!(t.ping_ok(&oldest, 5));
        assert!(t.pending(255).is_none());
        let order: Vec<&[u8]> = t.bucket(255).iter().map(|e| e.peer_id()).collect();
        assert_eq!(order, vec![&ids[1][..], &ids[0][..]]);
        assert_eq!(t.get(&oldest).map(|e| e.last_seen_ms()), Some(5));
        assert!(!t.contains(&Key::from_peer_id_bytes(&ids[2])));
    }

    /// A full bucket A, B with candidate C waiting on a ping of A; then A is seen (so B is the
    /// oldest) and C is offered again.
    fn candidate_reinserted_after_oldest_changed() -> (RoutingTable, Vec<Vec<u8>>) {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(2));
        let ids = peers_in_bucket(&local, 255, 3, 8);
        for id in &ids[..2] {
            t.insert(Entry::new(id.clone(), vec![], 1, None), 1);
        }
        let a = Key::from_peer_id_bytes(&ids[0]);
        let first = t.insert(Entry::new(ids[2].clone(), vec![], 2, None), 2);
        assert_eq!(
            first,
            InsertOutcome::Pending {
                oldest: a,
                oldest_peer_id: ids[0].clone()
            }
        );
        assert_eq!(
            t.insert(Entry::new(ids[0].clone(), vec![], 3, None), 3),
            InsertOutcome::Updated
        );
        let order: Vec<&[u8]> = t.bucket(255).iter().map(|e| e.peer_id()).collect();
        assert_eq!(order, vec![&ids[1][..], &ids[0][..]]);
        // The candidate again: still waiting on A's ping, and told so (not to ping B).
        let again = t.insert(
            Entry::new(ids[2].clone(), vec![b"new".to_vec()], 4, None),
            4,
        );
        assert_eq!(again, first);
        assert_eq!(
            t.pending(255).map(|e| e.addrs().to_vec()),
            Some(vec![b"new".to_vec()])
        );
        (t, ids)
    }

    #[test]
    fn kad_table_reinserted_candidate_is_settled_by_outstanding_ping_ok() {
        let (mut t, ids) = candidate_reinserted_after_oldest_changed();
        assert!(t.ping_ok(&Key::from_peer_id_bytes(&ids[0]), 5));
        assert!(t.pending(255).is_none());
        assert!(!t.contains(&Key::from_peer_id_bytes(&ids[2])));
        // The bucket is free for a new candidate at once (no pending_timeout wait).
        let ids2 = peers_in_bucket(t.local_key(), 255, 1, 9);
        assert!(matches!(
            t.insert(Entry::new(ids2[0].clone(), vec![], 6, None), 6),
            InsertOutcome::Pending { .. }
        ));
    }

    #[test]
    fn kad_table_reinserted_candidate_is_promoted_by_outstanding_ping_failed() {
        let (mut t, ids) = candidate_reinserted_after_oldest_changed();
        let ev = t.ping_failed(&Key::from_peer_id_bytes(&ids[0]));
        assert_eq!(
            ev.evicted.map(|e| e.peer_id().to_vec()),
            Some(ids[0].clone())
        );
        assert_eq!(ev.promoted, Some(Key::from_peer_id_bytes(&ids[2])));
        let got = t.get(&Key::from_peer_id_bytes(&ids[2])).expect("promoted");
        assert_eq!(got.addrs(), &[b"new".to_vec()]);
        assert!(t.pending(255).is_none());
    }

    #[test]
    fn kad_table_full_bucket_ping_failed_evicts_oldest() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(2));
        let ids = peers_in_bucket(&local, 254, 4, 3);
        for id in &ids[..2] {
            t.insert(Entry::new(id.clone(), vec![], 1, None), 1);
        }
        let oldest = Key::from_peer_id_bytes(&ids[0]);
        assert!(matches!(
            t.insert(Entry::new(ids[2].clone(), vec![], 2, None), 2),
            InsertOutcome::Pending { .. }
        ));
        let ev = t.ping_failed(&oldest);
        assert_eq!(
            ev.evicted.map(|e| e.peer_id().to_vec()),
            Some(ids[0].clone())
        );
        assert_eq!(ev.promoted, Some(Key::from_peer_id_bytes(&ids[2])));
        let order: Vec<&[u8]> = t.bucket(254).iter().map(|e| e.peer_id()).collect();
        assert_eq!(order, vec![&ids[1][..], &ids[2][..]]);
        assert_eq!(t.len(), 2);
        // Reporting again is harmless.
        assert_eq!(t.ping_failed(&oldest), Eviction::default());
        assert!(!t.ping_ok(&oldest, 9));
    }

    #[test]
    fn kad_table_stale_pending_is_replaced() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(1));
        let ids = peers_in_bucket(&local, 255, 3, 4);
        t.insert(Entry::new(ids[0].clone(), vec![], 0, None), 0);
        assert!(matches!(
            t.insert(Entry::new(ids[1].clone(), vec![], 0, None), 0),
            InsertOutcome::Pending { .. }
        ));
        let later = TableConfig::default().pending_timeout_ms;
        assert!(matches!(
            t.insert(Entry::new(ids[2].clone(), vec![], later, None), later),
            InsertOutcome::Pending { .. }
        ));
        assert_eq!(t.pending(255).map(|e| e.peer_id()), Some(&ids[2][..]));
        // Removing the entry directly also promotes the candidate.
        assert!(t.remove(&Key::from_peer_id_bytes(&ids[0])).is_some());
        assert!(t.contains(&Key::from_peer_id_bytes(&ids[2])));
        assert!(t.pending(255).is_none());
    }

    #[test]
    fn kad_table_zero_k_refuses_everything() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, small_config(0));
        let out = t.insert(Entry::new(peer(1), vec![], 0, None), 0);
        assert_eq!(out, InsertOutcome::Refused(Refused::BucketFull));
        assert!(t.closest(&local, 5).is_empty());
    }

    #[test]
    fn kad_table_prefix_limit_per_bucket() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, TableConfig::default());
        let ids = peers_in_bucket(&local, 255, 4, 5);
        let p = prefix(198, 51, 100);
        assert_eq!(
            t.insert(Entry::new(ids[0].clone(), vec![], 0, p), 0),
            InsertOutcome::Inserted
        );
        assert_eq!(
            t.insert(Entry::new(ids[1].clone(), vec![], 0, p), 0),
            InsertOutcome::Inserted
        );
        let out = t.insert(Entry::new(ids[2].clone(), vec![], 0, p), 0);
        assert_eq!(
            out,
            InsertOutcome::Refused(Refused::BucketPrefixLimit {
                prefix: p.expect("some"),
                limit: 2
            })
        );
        assert!(out_to_string(&out).contains("198.51.100.0/24"));
        // Another network is fine, and so is an untagged entry.
        let other = prefix(198, 51, 101);
        assert_eq!(
            t.insert(Entry::new(ids[2].clone(), vec![], 0, other), 0),
            InsertOutcome::Inserted
        );
        assert_eq!(
            t.insert(Entry::new(ids[3].clone(), vec![], 0, None), 0),
            InsertOutcome::Inserted
        );
        // A known entry moving into the crowded prefix is refused and left as it was.
        let out = t.insert(Entry::new(ids[3].clone(), vec![], 5, p), 5);
        assert!(matches!(
            out,
            InsertOutcome::Refused(Refused::BucketPrefixLimit { .. })
        ));
        assert_eq!(
            t.get(&Key::from_peer_id_bytes(&ids[3]))
                .map(|e| e.ip_prefix()),
            Some(None)
        );
        // Removing one frees the slot.
        t.remove(&Key::from_peer_id_bytes(&ids[0]));
        assert_eq!(
            t.insert(Entry::new(ids[3].clone(), vec![], 6, p), 6),
            InsertOutcome::Updated
        );
    }

    fn out_to_string(out: &InsertOutcome) -> String {
        match out {
            InsertOutcome::Refused(r) => r.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn kad_table_prefix_limit_whole_table() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, TableConfig::default());
        let p = prefix(203, 0, 113);
        let mut inserted = 0;
        let mut refused_table = 0;
        // Two per bucket over several buckets reaches the table limit of 10.
        for index in (240..256).rev() {
            for id in peers_in_bucket(&local, index, 2, 6) {
                match t.insert(Entry::new(id, vec![], 0, p), 0) {
                    InsertOutcome::Inserted => inserted += 1,
                    InsertOutcome::Refused(Refused::TablePrefixLimit { limit: 10, .. }) => {
                        refused_table += 1
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(inserted, 10);
        assert_eq!(refused_table, 22);
        assert_eq!(t.len(), 10);
    }

    #[test]
    fn kad_table_addresses_are_capped() {
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, TableConfig::default());
        let addrs = vec![vec![1u8; 8]; 1000];
        t.insert(Entry::new(peer(1), addrs, 0, None), 0);
        let key = Key::from_peer_id_bytes(&peer(1));
        assert_eq!(t.get(&key).map(|e| e.addrs().len()), Some(16));
    }

    #[test]
    fn kad_bucket_walk_is_a_permutation() {
        let mut rng = SplitMix64::new(11);
        for _ in 0..50 {
            let d = Distance::from_bytes(rng.bytes());
            let all = BucketSet([u64::MAX; 4]);
            let mut order: Vec<usize> = BucketWalk::new(&d, all).collect();
            assert_eq!(order[0], d.bucket_index().expect("nonzero"));
            order.sort_unstable();
            assert_eq!(order, (0..KEY_BITS).collect::<Vec<_>>());
            // With some buckets empty, exactly the others, in the same relative order.
            let some = BucketSet(rng.bytes::<32>().chunks(8).fold([0u64; 4], |mut w, c| {
                w.rotate_left(1);
                w[3] = c.iter().fold(0, |a, &b| a << 8 | u64::from(b));
                w
            }));
            let full: Vec<usize> = BucketWalk::new(&d, all)
                .filter(|&i| some.contains(i))
                .collect();
            assert_eq!(BucketWalk::new(&d, some).collect::<Vec<_>>(), full);
        }
        let order: Vec<usize> =
            BucketWalk::new(&Distance::ZERO, BucketSet([u64::MAX; 4])).collect();
        assert_eq!(order, (0..KEY_BITS).collect::<Vec<_>>());
    }

    fn brute_force<'a>(t: &'a RoutingTable, target: &Key, n: usize) -> Vec<&'a Entry> {
        let mut all: Vec<&Entry> = t.iter().collect();
        all.sort_by_key(|e| e.key().distance(target));
        all.truncate(n);
        all
    }

    #[test]
    fn kad_closest_matches_brute_force_on_random_tables() {
        let mut rng = SplitMix64::new(12);
        for round in 0..20 {
            let local = Key::from_hashed(rng.bytes());
            let k = 1 + rng.below(20) as usize;
            let mut t = RoutingTable::new(local, small_config(k));
            for _ in 0..rng.below(3000) {
                let id: [u8; 16] = rng.bytes();
                t.insert(Entry::new(id.to_vec(), vec![], 0, None), 0);
            }
            for _ in 0..30 {
                // Random targets, the local key, and keys near entries.
                let target = match rng.below(3) {
                    0 => Key::from_hashed(rng.bytes()),
                    1 => local,
                    _ => match t.iter().nth(rng.below(t.len().max(1) as u64) as usize) {
                        Some(e) => e.key().at_distance(&Distance::from_bytes({
                            let mut b = [0u8; 32];
                            b[31] = rng.bytes::<1>()[0];
                            b
                        })),
                        None => local,
                    },
                };
                let n = rng.below(60) as usize;
                let got: Vec<&Key> = t.closest(&target, n).iter().map(|e| e.key()).collect();
                let want: Vec<&Key> = brute_force(&t, &target, n)
                    .iter()
                    .map(|e| e.key())
                    .collect();
                assert_eq!(got, want, "round {round}, n {n}");
            }
        }
    }

    #[test]
    fn kad_table_invariants_hold_under_random_operations() {
        let mut rng = SplitMix64::new(14);
        let local = Key::from_hashed(rng.bytes());
        let config = TableConfig {
            k: 4,
            ..TableConfig::default()
        };
        let mut t = RoutingTable::new(local, config.clone());
        // Few peers and few prefixes, so buckets fill, pings happen and limits bite.
        let ids: Vec<Vec<u8>> = (0..300).map(peer).collect();
        let prefixes: Vec<Option<IpPrefix>> =
            (0..6).map(|i| prefix(192, 0, i)).chain([None]).collect();
        for step in 0..20_000u64 {
            let id = &ids[rng.below(ids.len() as u64) as usize];
            let key = Key::from_peer_id_bytes(id);
            match rng.below(10) {
                0..=5 => {
                    let p = prefixes[rng.below(prefixes.len() as u64) as usize];
                    let index = t.bucket_index(&key).expect("not the local key");
                    let waiting_on = t.buckets[index]
                        .pending
                        .as_ref()
                        .filter(|p| p.entry.key == key)
                        .map(|p| p.oldest);
                    if let InsertOutcome::Pending {
                        oldest,
                        oldest_peer_id,
                    } = t.insert(Entry::new(id.clone(), vec![], step, p), step)
                    {
                        // The answer names the entry the candidate is linked to, which is the
                        // one it already waited on, if it was waiting.
                        let linked = t.buckets[index]
                            .pending
                            .as_ref()
                            .map(|p| (p.entry.key, p.oldest));
                        assert_eq!(linked, Some((key, oldest)));
                        assert_eq!(Key::from_peer_id_bytes(&oldest_peer_id), oldest);
                        if let Some(before) = waiting_on {
                            assert_eq!(oldest, before);
                        }
                        // Settle now, or leave the ping outstanding while other operations run.
                        match rng.below(3) {
                            0 => {
                                t.ping_ok(&oldest, step);
                                assert!(t.buckets[index].pending.is_none());
                            }
                            1 => {
                                t.ping_failed(&oldest);
                                assert!(t.buckets[index].pending.is_none());
                            }
                            _ => {}
                        }
                    }
                }
                6 | 7 => {
                    t.remove(&key);
                }
                8 => {
                    t.ping_ok(&key, step);
                }
                _ => {
                    t.ping_failed(&key);
                }
            }
            assert_eq!(t.len(), t.iter().count());
            let mut per_prefix: HashMap<IpPrefix, usize> = HashMap::new();
            for index in 0..KEY_BITS {
                if let Some(p) = &t.buckets[index].pending {
                    assert!(t.buckets[index].position(&p.oldest).is_some());
                    assert!(t.buckets[index].position(&p.entry.key).is_none());
                }
                let bucket = t.bucket(index);
                assert!(bucket.len() <= config.k);
                assert_eq!(t.occupied.contains(index), !bucket.is_empty());
                let mut in_bucket: HashMap<IpPrefix, usize> = HashMap::new();
                for e in bucket {
                    assert_eq!(t.bucket_index(e.key()), Some(index));
                    if let Some(p) = e.ip_prefix() {
                        *in_bucket.entry(p).or_insert(0) += 1;
                        *per_prefix.entry(p).or_insert(0) += 1;
                    }
                }
                assert!(in_bucket
                    .values()
                    .all(|&n| n <= config.max_per_prefix_per_bucket));
            }
            assert!(per_prefix.values().all(|&n| n <= config.max_per_prefix));
            assert_eq!(per_prefix, t.prefix_counts);
        }
    }

    #[test]
    fn kad_refresh_targets_cover_stale_buckets() {
        let mut rng = SplitMix64::new(13);
        let local = Key::from_raw(b"local");
        let mut t = RoutingTable::new(local, TableConfig::default());
        assert!(t.refresh_targets(1_000, 100, &mut rng).is_empty());
        for id in peers_in_bucket(&local, 250, 1, 7) {
            t.insert(Entry::new(id, vec![], 0, None), 500);
        }
        // Buckets 250..=255; 250 had an insert at 500, so at 550 with max age 100 it is fresh.
        assert_eq!(t.stale_buckets(550, 100), vec![251, 252, 253, 254, 255]);
        let targets = t.refresh_targets(550, 100, &mut rng);
        assert_eq!(targets.len(), 5);
        for (target, index) in targets.iter().zip(251..) {
            assert_eq!(t.bucket_index(target), Some(index));
            t.mark_refreshed(target, 550);
        }
        assert!(t.stale_buckets(599, 100).is_empty());
        assert_eq!(t.stale_buckets(600, 100), vec![250]);
        assert_eq!(t.stale_buckets(650, 100).len(), 6);
    }
}
