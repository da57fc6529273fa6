//! The iterative Kademlia lookup (FIND_NODE) as a sans-IO state machine.
//!
//! The caller drives it:
//!
//! ```text
//! loop {
//!     match lookup.poll(now) {
//!         Action::Send { peer } => start a FIND_NODE(target) request to `peer`,
//!         Action::Wait { until } => sleep until `until` or a response/failure arrives,
//!         Action::Done => break,
//!     }
//! }
//! on a response:  lookup.on_response(peer_id, closer_peers)
//! on an error:    lookup.on_failure(peer_id)
//! lookup.results()  // the k closest peers that answered, closest first
//! ```
//!
//! Rules:
//!
//! - Candidates are kept in XOR distance order to the target. Failed and timed-out peers are
//!   skipped; of the first `k` remaining, the closest not yet asked is asked next, with at most
//!   `alpha` requests in flight.
//! - A request unanswered after `request_timeout_ms` times out in [`Lookup::poll`]: the peer
//!   stops counting as in flight (a slow peer never holds a slot), and stops counting among the
//!   k closest. If its answer still arrives before the lookup is done, it is used.
//! - The lookup is done when the first `k` non-failed candidates have all answered, or when no
//!   candidate is left to ask and none is in flight, or when `max_requests` were sent and none
//!   is in flight.
//! - Hostile input is bounded: answers from peers that were not asked (or answered already) are
//!   ignored, at most `max_peers_per_response` peers are read from one answer, each peer is
//!   tracked at most once, and at most `max_candidates` candidates are kept (the farthest go).
//!   `max_requests` bounds the work; the lookup has no overall deadline of its own (wrap the
//!   driving loop in one), since each request already has one.

use std::collections::{BTreeMap, HashSet};

use super::key::{Distance, Key};
use super::table::Entry;

/// Tunables of a [`Lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupConfig {
    /// How many closest peers the lookup finds (Kademlia's k).
    pub k: usize,
    /// Most requests in flight at once (Kademlia's alpha).
    pub alpha: usize,
    /// How long a request may take before its peer counts as failed.
    pub request_timeout_ms: u64,
    /// Most peers read from one answer; the rest are ignored.
    pub max_peers_per_response: usize,
    /// Most candidates tracked; when full, the farthest ones are dropped (never less than `k`).
    pub max_candidates: usize,
    /// Most requests the lookup sends in total.
    pub max_requests: usize,
    /// Addresses kept per peer; extra ones are dropped.
    pub max_addrs_per_peer: usize,
}

impl Default for LookupConfig {
    fn default() -> LookupConfig {
        LookupConfig {
            k: 20,
            alpha: 3,
            request_timeout_ms: 10_000,
            max_peers_per_response: 20,
            max_candidates: 400,
            max_requests: 200,
            max_addrs_per_peer: 16,
        }
    }
}

/// A peer as the lookup sees it: peer ID bytes (opaque; the key is their SHA-256) and addresses
/// (opaque, e.g. binary multiaddrs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    peer_id: Vec<u8>,
    key: Key,
    addrs: Vec<Vec<u8>>,
}

impl Peer {
    /// A peer from its peer ID bytes and addresses.
    pub fn new(peer_id: Vec<u8>, addrs: Vec<Vec<u8>>) -> Peer {
        let key = Key::from_peer_id_bytes(&peer_id);
        Peer {
            peer_id,
            key,
            addrs,
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

    /// The addresses.
    pub fn addrs(&self) -> &[Vec<u8>] {
        &self.addrs
    }

    /// The peer ID bytes and addresses.
    pub fn into_parts(self) -> (Vec<u8>, Vec<Vec<u8>>) {
        (self.peer_id, self.addrs)
    }
}

impl From<&Entry> for Peer {
    fn from(entry: &Entry) -> Peer {
        Peer {
            peer_id: entry.peer_id().to_vec(),
            key: *entry.key(),
            addrs: entry.addrs().to_vec(),
        }
    }
}

/// What the caller should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a FIND_NODE request for the target to `peer`, then report the outcome with
    /// [`Lookup::on_response`] or [`Lookup::on_failure`].
    Send {
        /// The peer to ask.
        peer: Peer,
    },
    /// Nothing to do until a response or failure arrives, or until time `until` (when the
    /// earliest outstanding request times out); then poll again.
    Wait {
        /// Time (ms) of the next timeout.
        until: u64,
    },
    /// The lookup is over; see [`Lookup::results`].
    Done,
}

/// Counters of one lookup (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Requests sent.
    pub requests: usize,
    /// Answers accepted (late ones included).
    pub responses: usize,
    /// Answers accepted after their request had timed out.
    pub late_responses: usize,
    /// Failures reported.
    pub failures: usize,
    /// Requests that timed out.
    pub timeouts: usize,
    /// Answers ignored: unsolicited, duplicate, or after the end.
    pub ignored_responses: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NotContacted,
    Waiting { deadline: u64 },
    TimedOut,
    Failed,
    Responded,
}

#[derive(Clone, Debug)]
struct Candidate {
    peer: Peer,
    state: State,
}

/// One iterative lookup for a target key. See the module documentation.
#[derive(Clone, Debug)]
pub struct Lookup {
    target: Key,
    local: Option<Key>,
    config: LookupConfig,
    /// By distance to the target, which identifies a key (XOR with the target is a bijection).
    candidates: BTreeMap<Distance, Candidate>,
    /// The candidates in `Waiting` state (at most alpha), so timeouts need no full scan.
    waiting: Vec<Distance>,
    /// Every key ever offered as a candidate, so a dropped or failed peer is not re-added.
    seen: HashSet<Key>,
    stats: LookupStats,
    done: bool,
}

impl Lookup {
    /// A lookup for `target`, starting from `seeds` (usually the routing table's
    /// [`closest`](super::RoutingTable::closest) entries). `local` is the local node's key,
    /// never asked nor returned even when other peers report it.
    pub fn new(target: Key, local: Option<Key>, seeds: Vec<Peer>, config: LookupConfig) -> Lookup {
        let mut lookup = Lookup {
            target,
            local,
            config,
            candidates: BTreeMap::new(),
            waiting: Vec::new(),
            seen: HashSet::new(),
            stats: LookupStats::default(),
            done: false,
        };
        for seed in seeds {
            lookup.add_candidate(seed);
        }
        lookup
    }

    /// The key being looked up.
    pub fn target(&self) -> &Key {
        &self.target
    }

    /// The configuration.
    pub fn config(&self) -> &LookupConfig {
        &self.config
    }

    /// The counters so far.
    pub fn stats(&self) -> LookupStats {
        self.stats
    }

    /// Requests in flight that have not timed out.
    pub fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    /// Whether [`Lookup::poll`] has returned [`Action::Done`].
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next thing to do at time `now` (ms). Call it until it returns [`Action::Wait`] or
    /// [`Action::Done`], and again after every response, failure or wake-up.
    pub fn poll(&mut self, now: u64) -> Action {
        if self.done {
            return Action::Done;
        }
        let candidates = &mut self.candidates;
        let stats = &mut self.stats;
        self.waiting.retain(|d| match candidates.get_mut(d) {
            Some(c) => match c.state {
                State::Waiting { deadline } if deadline <= now => {
                    c.state = State::TimedOut;
                    stats.timeouts += 1;
                    false
                }
                State::Waiting { .. } => true,
                _ => false,
            },
            None => false,
        });

        // Among the first k candidates still in the running: the closest one not yet asked,
        // and whether any is still being waited for.
        let mut live = 0;
        let mut next = None;
        let mut waiting_in_top = false;
        for (distance, c) in &self.candidates {
            if live >= self.config.k {
                break;
            }
            match c.state {
                State::Failed | State::TimedOut => continue,
                State::Responded => {}
                State::Waiting { .. } => waiting_in_top = true,
                State::NotContacted => {
                    if next.is_none() {
                        next = Some(*distance);
                    }
                }
            }
            live += 1;
        }

        if next.is_none() && !waiting_in_top {
            return self.finish();
        }
        if let Some(distance) = next {
            if self.waiting.len() < self.config.alpha
                && self.stats.requests < self.config.max_requests
            {
                if let Some(c) = self.candidates.get_mut(&distance) {
                    c.state = State::Waiting {
                        deadline: now.saturating_add(self.config.request_timeout_ms),
                    };
                    self.waiting.push(distance);
                    self.stats.requests += 1;
                    return Action::Send {
                        peer: c.peer.clone(),
                    };
                }
            }
        }
        match self.earliest_deadline() {
            Some(until) => Action::Wait { until },
            // Nothing in flight and nothing may be sent (request budget spent, or alpha = 0).
            None => self.finish(),
        }
    }

    fn finish(&mut self) -> Action {
        self.done = true;
        Action::Done
    }

    fn earliest_deadline(&self) -> Option<u64> {
        self.waiting
            .iter()
            .filter_map(|d| match self.candidates.get(d)?.state {
                State::Waiting { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    fn stop_waiting(&mut self, distance: &Distance) {
        self.waiting.retain(|d| d != distance);
    }

    /// `peer_id` answered with `closer_peers`. Returns whether the answer was accepted: it is
    /// ignored if the peer was not asked, already answered, failed, or the lookup is done.
    pub fn on_response(&mut self, peer_id: &[u8], closer_peers: Vec<Peer>) -> bool {
        let distance = self.target.distance(&Key::from_peer_id_bytes(peer_id));
        let previous = match self.candidates.get_mut(&distance) {
            Some(c) if !self.done => {
                let previous = c.state;
                if matches!(previous, State::Waiting { .. } | State::TimedOut) {
                    c.state = State::Responded;
                }
                previous
            }
            _ => State::NotContacted,
        };
        match previous {
            State::Waiting { .. } => self.stop_waiting(&distance),
            State::TimedOut => self.stats.late_responses += 1,
            State::NotContacted | State::Failed | State::Responded => {
                self.stats.ignored_responses += 1;
                return false;
            }
        }
        self.stats.responses += 1;
        for peer in closer_peers
            .into_iter()
            .take(self.config.max_peers_per_response)
        {
            self.add_candidate(peer);
        }
        true
    }

    /// The request to `peer_id` failed (connection refused, protocol error, …). Returns whether
    /// the peer had an outstanding (or timed-out) request.
    pub fn on_failure(&mut self, peer_id: &[u8]) -> bool {
        if self.done {
            return false;
        }
        let distance = self.target.distance(&Key::from_peer_id_bytes(peer_id));
        let Some(c) = self.candidates.get_mut(&distance) else {
            return false;
        };
        let previous = c.state;
        match previous {
            State::Waiting { .. } | State::TimedOut => c.state = State::Failed,
            State::NotContacted | State::Failed | State::Responded => return false,
        }
        if matches!(previous, State::Waiting { .. }) {
            self.stop_waiting(&distance);
        }
        self.stats.failures += 1;
        true
    }

    fn add_candidate(&mut self, mut peer: Peer) {
        if self.local == Some(peer.key) || !self.seen.insert(peer.key) {
            return;
        }
        peer.addrs.truncate(self.config.max_addrs_per_peer);
        let distance = self.target.distance(&peer.key);
        let cap = self.config.max_candidates.max(self.config.k);
        if self.candidates.len() >= cap {
            // Drop the farthest candidate that is not in flight, if it is farther than the
            // newcomer; otherwise drop the newcomer.
            let victim = self
                .candidates
                .iter()
                .rev()
                .find(|(_, c)| !matches!(c.state, State::Waiting { .. }))
                .map(|(d, _)| *d);
            match victim {
                Some(v) if v > distance => {
                    self.candidates.remove(&v);
                }
                _ => return,
            }
        }
        self.candidates.insert(
            distance,
            Candidate {
                peer,
                state: State::NotContacted,
            },
        );
    }

    /// The peers that failed or timed out without a late answer: candidates for removal from
    /// the routing table ([`RoutingTable::ping_failed`](super::RoutingTable::ping_failed)).
    pub fn unresponsive(&self) -> Vec<Peer> {
        self.candidates
            .values()
            .filter(|c| matches!(c.state, State::Failed | State::TimedOut))
            .map(|c| c.peer.clone())
            .collect()
    }

    /// The closest peers that answered (at most k), closest first. Complete once the lookup is
    /// done; meanwhile, the best so far.
    pub fn results(&self) -> Vec<Peer> {
        self.candidates
            .values()
            .filter(|c| c.state == State::Responded)
            .take(self.config.k)
            .map(|c| c.peer.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u32) -> Peer {
        Peer::new(n.to_be_bytes().to_vec(), vec![vec![n as u8]])
    }

    fn config(k: usize, alpha: usize) -> LookupConfig {
        LookupConfig {
            k,
            alpha,
            request_timeout_ms: 100,
            ..LookupConfig::default()
        }
    }

    fn sent(action: Action) -> Peer {
        match action {
            Action::Send { peer } => peer,
            other => panic!("expected Send, got {other:?}"),
        }
    }

    #[test]
    fn kad_lookup_without_seeds_is_done() {
        let mut l = Lookup::new(Key::from_raw(b"t"), None, vec![], LookupConfig::default());
        assert_eq!(l.poll(0), Action::Done);
        assert!(l.is_done());
        assert!(l.results().is_empty());
    }

    #[test]
    fn kad_lookup_asks_closest_first_alpha_at_a_time() {
        let target = Key::from_raw(b"t");
        let seeds: Vec<Peer> = (0..10).map(peer).collect();
        let mut by_distance = seeds.clone();
        by_distance.sort_by_key(|p| target.distance(p.key()));
        let mut l = Lookup::new(target, None, seeds, config(20, 3));
        for expected in &by_distance[..3] {
            assert_eq!(&sent(l.poll(0)), expected);
        }
        assert_eq!(l.poll(0), Action::Wait { until: 100 });
        assert_eq!(l.in_flight(), 3);
        assert!(l.on_response(by_distance[1].peer_id(), vec![]));
        assert_eq!(&sent(l.poll(10)), &by_distance[3]);
        assert_eq!(l.poll(10), Action::Wait { until: 100 });
    }

    #[test]
    fn kad_lookup_ignores_unsolicited_and_duplicate_responses() {
        let target = Key::from_raw(b"t");
        let mut l = Lookup::new(target, None, vec![peer(1), peer(2)], config(20, 1));
        let first = sent(l.poll(0));
        let other = if first == peer(1) { peer(2) } else { peer(1) };
        // Not asked yet, and a stranger: ignored, their peers not taken.
        assert!(!l.on_response(other.peer_id(), vec![peer(50)]));
        assert!(!l.on_response(b"stranger", vec![peer(51)]));
        assert!(l.on_response(first.peer_id(), vec![]));
        assert!(!l.on_response(first.peer_id(), vec![peer(52)]));
        assert_eq!(l.stats().ignored_responses, 3);
        assert_eq!(sent(l.poll(1)), other);
        assert!(l.on_response(other.peer_id(), vec![]));
        assert_eq!(l.poll(2), Action::Done);
        assert_eq!(l.results().len(), 2);
        assert!(!l.on_response(other.peer_id(), vec![]));
    }

    #[test]
    fn kad_lookup_timeout_frees_slot_and_late_answer_counts() {
        let target = Key::from_raw(b"t");
        let mut l = Lookup::new(target, None, vec![peer(1), peer(2)], config(20, 1));
        let slow = sent(l.poll(0));
        assert_eq!(l.poll(50), Action::Wait { until: 100 });
        // At the deadline the slow peer times out and the next one is asked.
        let second = sent(l.poll(100));
        assert_ne!(second, slow);
        assert_eq!(l.stats().timeouts, 1);
        assert_eq!(l.in_flight(), 1);
        // The slow peer's late answer is still used.
        assert!(l.on_response(slow.peer_id(), vec![peer(3)]));
        assert_eq!(l.stats().late_responses, 1);
        assert!(l.on_response(second.peer_id(), vec![]));
        let third = sent(l.poll(120));
        assert_eq!(third, peer(3));
        assert!(l.on_failure(third.peer_id()));
        assert!(!l.on_failure(third.peer_id()));
        assert_eq!(l.unresponsive(), vec![peer(3)]);
        assert_eq!(l.poll(130), Action::Done);
        let mut want = vec![slow, second];
        want.sort_by_key(|p| target.distance(p.key()));
        assert_eq!(l.results(), want);
    }

    #[test]
    fn kad_lookup_done_when_k_closest_answered() {
        let target = Key::from_raw(b"t");
        let seeds: Vec<Peer> = (0..6).map(peer).collect();
        let mut by_distance = seeds.clone();
        by_distance.sort_by_key(|p| target.distance(p.key()));
        let mut l = Lookup::new(target, None, seeds, config(2, 3));
        // Only the two closest are ever asked.
        let a = sent(l.poll(0));
        let b = sent(l.poll(0));
        assert_eq!([&a, &b], [&by_distance[0], &by_distance[1]]);
        assert_eq!(l.poll(0), Action::Wait { until: 100 });
        l.on_response(a.peer_id(), vec![]);
        l.on_response(b.peer_id(), vec![]);
        assert_eq!(l.poll(1), Action::Done);
        assert_eq!(l.results(), vec![a, b]);
        assert_eq!(l.stats().requests, 2);
    }

    #[test]
    fn kad_lookup_skips_local_key_and_caps_response_and_candidates() {
        let target = Key::from_raw(b"t");
        let local = peer(999);
        let cfg = LookupConfig {
            max_peers_per_response: 5,
            max_candidates: 30,
            max_addrs_per_peer: 2,
            ..config(20, 1)
        };
        let mut l = Lookup::new(target, Some(*local.key()), vec![peer(1)], cfg);
        let first = sent(l.poll(0));
        let mut flood = vec![local.clone()];
        flood.extend((100..1100).map(|n| Peer::new(peer(n).peer_id, vec![vec![0]; 100])));
        assert!(l.on_response(first.peer_id(), flood));
        // 1 seed + 4 of the first 5 (the local key is skipped).
        assert_eq!(l.candidates.len(), 5);
        assert!(l.candidates.values().all(|c| c.peer.addrs.len() <= 2));
        assert!(l.candidates.values().all(|c| c.peer.key != *local.key()));
        // Many answers: the candidate list never outgrows its cap and stays sorted.
        let mut n = 2000;
        while let Action::Send { peer } = l.poll(1) {
            let batch = (n..n + 5).map(peer_n).collect();
            n += 5;
            l.on_response(peer.peer_id(), batch);
            assert!(l.candidates.len() <= 30);
        }
        assert!(l.is_done());
        assert!(l.stats().requests <= LookupConfig::default().max_requests);
    }

    fn peer_n(n: u32) -> Peer {
        peer(n)
    }

    #[test]
    fn kad_lookup_request_budget_bounds_the_lookup() {
        let target = Key::from_raw(b"t");
        let cfg = LookupConfig {
            max_requests: 7,
            ..config(20, 3)
        };
        let mut l = Lookup::new(target, None, (0..3).map(peer).collect(), cfg);
        let mut n = 10;
        let mut now = 0;
        loop {
            match l.poll(now) {
                Action::Send { peer } => {
                    // Every peer answers with fresh peers, forever.
                    let batch = (n..n + 20).map(peer_n).collect();
                    n += 20;
                    l.on_response(peer.peer_id(), batch);
                }
                Action::Wait { until } => now = until,
                Action::Done => break,
            }
        }
        assert_eq!(l.stats().requests, 7);
    }

    #[test]
    fn kad_lookup_degenerate_configs_terminate() {
        let target = Key::from_raw(b"t");
        for (k, alpha) in [(0, 3), (20, 0), (1, 1)] {
            let mut l = Lookup::new(target, None, (0..5).map(peer).collect(), config(k, alpha));
            let mut now = 0;
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 100, "k={k} alpha={alpha} does not terminate");
                match l.poll(now) {
                    Action::Send { .. } => {}
                    Action::Wait { until } => now = until,
                    Action::Done => break,
                }
            }
        }
        // A timeout near u64::MAX does not overflow.
        let mut l = Lookup::new(target, None, vec![peer(1)], config(20, 3));
        sent(l.poll(u64::MAX - 1));
        assert_eq!(l.poll(u64::MAX - 1), Action::Wait { until: u64::MAX });
        assert_eq!(l.poll(u64::MAX), Action::Done);
    }
}
