//! An in-memory Kademlia network driving the real [`RoutingTable`] and [`Lookup`] with a fake
//! clock: nodes join one by one through bootstrap contacts, then some go dead or slow, and
//! lookups are checked against the brute-force k closest.
//!
//! Run with `--nocapture` to see the figures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use super::testutil::SplitMix64;
use super::{Action, Distance, Entry, InsertOutcome, IpPrefix, Key, Lookup, LookupConfig, Peer};
use super::{RoutingTable, TableConfig};

const K: usize = 20;
const TIMEOUT_MS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Answers within 5–80 ms.
    Good,
    /// Half refuse at once (connection refused), half never answer.
    Dead,
    /// Answers, but only after the request timeout.
    Slow,
}

struct Node {
    peer_id: Vec<u8>,
    key: Key,
    prefix: Option<IpPrefix>,
    table: RoutingTable,
    behaviour: Behaviour,
}

struct Network {
    nodes: Vec<Node>,
    by_key: HashMap<Key, usize>,
    rng: SplitMix64,
    now: u64,
    join_lookups: usize,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at: u64,
    seq: u64,
    node: usize,
    answers: bool,
}

impl Network {
    fn new(n: usize, seed: u64) -> Network {
        let mut rng = SplitMix64::new(seed);
        let mut nodes = Vec::with_capacity(n);
        let mut by_key = HashMap::new();
        for i in 0..n {
            // An identity-multihash-shaped peer ID: 0x00, length 36, then key bytes.
            let mut peer_id = vec![0x00, 0x24];
            peer_id.extend_from_slice(&rng.bytes::<36>());
            let key = Key::from_peer_id_bytes(&peer_id);
            // Most nodes on their own /24; one in ten in a few crowded hosting networks.
            let ip = if rng.chance(10) {
                Ipv4Addr::new(203, 0, rng.below(8) as u8, rng.below(256) as u8)
            } else {
                Ipv4Addr::new(10, rng.below(256) as u8, rng.below(256) as u8, 1)
            };
            let table = RoutingTable::new(key, TableConfig::default());
            by_key.insert(key, i);
            nodes.push(Node {
                peer_id,
                key,
                prefix: Some(IpPrefix::from_ip(IpAddr::V4(ip))),
                table,
                behaviour: Behaviour::Good,
            });
        }
        Network {
            nodes,
            by_key,
            rng,
            now: 1,
            join_lookups: 0,
        }
    }

    /// Node `at` learns that `other` is alive, running the ping flow when a bucket is full.
    fn learn(&mut self, at: usize, other: usize) {
        let now = self.now;
        let entry = Entry::new(
            self.nodes[other].peer_id.clone(),
            vec![vec![other as u8]],
            now,
            self.nodes[other].prefix,
        );
        if let InsertOutcome::Pending { oldest, .. } = self.nodes[at].table.insert(entry, now) {
            let alive = self
                .by_key
                .get(&oldest)
                .is_some_and(|&o| self.nodes[o].behaviour != Behaviour::Dead);
            if alive {
                self.nodes[at].table.ping_ok(&oldest, now);
            } else {
                self.nodes[at].table.ping_failed(&oldest);
            }
        }
    }

    /// Runs one lookup from `origin` to `target` through the network. With `learn`, the asked
    /// nodes learn the origin and the origin learns those that answer (what a real node does).
    fn lookup(&mut self, origin: usize, target: Key, learn: bool) -> Lookup {
        let seeds = self.nodes[origin]
            .table
            .closest(&target, K)
            .into_iter()
            .map(Peer::from)
            .collect();
        let config = LookupConfig {
            request_timeout_ms: TIMEOUT_MS,
            ..LookupConfig::default()
        };
        let mut lookup = Lookup::new(target, Some(self.nodes[origin].key), seeds, config);
        let mut events = BinaryHeap::new();
        let mut seq = 0;
        loop {
            match lookup.poll(self.now) {
                Action::Send { peer } => {
                    let Some(&node) = self.by_key.get(peer.key()) else {
                        panic!("lookup asked an unknown peer");
                    };
                    let (delay, answers) = match self.nodes[node].behaviour {
                        Behaviour::Good => (5 + self.rng.below(75), true),
                        Behaviour::Slow => (TIMEOUT_MS + 1 + self.rng.below(2_000), true),
                        Behaviour::Dead if self.rng.chance(50) => (1, false),
                        // Never answers: no event, the lookup's timeout takes care of it.
                        Behaviour::Dead => continue,
                    };
                    seq += 1;
                    events.push(Reverse(Event {
                        at: self.now + delay,
                        seq,
                        node,
                        answers,
                    }));
                }
                Action::Wait { until } => {
                    assert!(until > self.now, "Wait must move time forward");
                    let next = events.peek().map(|Reverse(e)| e.at);
                    match next {
                        Some(at) if at <= until => {
                            let Some(Reverse(e)) = events.pop() else {
                                unreachable!()
                            };
                            self.now = self.now.max(e.at);
                            self.deliver(&mut lookup, origin, e, learn);
                        }
                        _ => self.now = until,
                    }
                }
                Action::Done => break,
            }
        }
        if learn {
            for peer in lookup.unresponsive() {
                self.nodes[origin].table.ping_failed(peer.key());
            }
        }
        self.now += 1;
        lookup
    }

    fn deliver(&mut self, lookup: &mut Lookup, origin: usize, e: Event, learn: bool) {
        let peer_id = self.nodes[e.node].peer_id.clone();
        if !e.answers {
            lookup.on_failure(&peer_id);
            return;
        }
        let closer: Vec<Peer> = self.nodes[e.node]
            .table
            .closest(lookup.target(), K)
            .into_iter()
            .map(Peer::from)
            .collect();
        if learn {
            self.learn(e.node, origin);
        }
        if lookup.on_response(&peer_id, closer) && learn {
            self.learn(origin, e.node);
        }
    }

    /// All nodes by distance to `target` (brute force), with their behaviour.
    fn by_distance(&self, target: &Key) -> Vec<(Key, Behaviour)> {
        let mut all: Vec<(Distance, Key, Behaviour)> = self
            .nodes
            .iter()
            .map(|n| (n.key.distance(target), n.key, n.behaviour))
            .collect();
        // Only the head matters: a partial selection keeps the debug-build test quick.
        let head = (4 * K).min(all.len().saturating_sub(1));
        all.select_nth_unstable_by(head, |a, b| a.0.cmp(&b.0));
        all.truncate(head + 1);
        all.sort_unstable_by_key(|a| a.0);
        all.into_iter().map(|(_, k, b)| (k, b)).collect()
    }

    /// Nodes join one at a time: a few contacts among the earlier nodes, a self-lookup, then a
    /// lookup into each bucket farther than the closest neighbour (a refresh).
    fn bootstrap(&mut self, contacts: usize, max_refreshes: usize) {
        let n = self.nodes.len();
        for i in 1..n {
            for _ in 0..contacts.min(i) {
                let other = self.rng.below(i as u64) as usize;
                self.learn(i, other);
            }
            let self_key = self.nodes[i].key;
            self.lookup(i, self_key, true);
            let now = self.now;
            let mut targets = self.nodes[i].table.refresh_targets(now, 1, &mut self.rng);
            targets.truncate(max_refreshes);
            self.join_lookups += 1 + targets.len();
            for target in targets {
                self.lookup(i, target, true);
                self.nodes[i].table.mark_refreshed(&target, self.now);
            }
        }
    }
}

#[derive(Default, Debug)]
struct Figures {
    lookups: usize,
    /// Lookups that found every good node among the k closest nodes that are not dead.
    exact: usize,
    /// Lookups that found every good node among the k closest nodes, dead ones included: what
    /// Kademlia can promise while tables still hold dead entries (each node answers with its k
    /// closest, dead ones among them, so live nodes just past them stay unmentioned).
    exact_visible: usize,
    recall_sum: f64,
    requests_sum: usize,
    requests_max: usize,
    timeouts_sum: usize,
    failures_sum: usize,
    duration_sum: u64,
}

impl Figures {
    fn mean_recall(&self) -> f64 {
        self.recall_sum / self.lookups.max(1) as f64
    }

    fn print(&self, label: &str) {
        let n = self.lookups.max(1) as f64;
        println!(
            "{label}: {} lookups; all live k closest found in {:.1}%, all visible ones in {:.1}%, \
             mean recall {:.4}; requests mean {:.1} max {}; failures mean {:.2}, timeouts mean \
             {:.2}; simulated duration mean {:.0} ms",
            self.lookups,
            100.0 * self.exact as f64 / n,
            100.0 * self.exact_visible as f64 / n,
            self.mean_recall(),
            self.requests_sum as f64 / n,
            self.requests_max,
            self.failures_sum as f64 / n,
            self.timeouts_sum as f64 / n,
            self.duration_sum as f64 / n,
        );
    }
}

fn run_lookups(net: &mut Network, count: usize) -> Figures {
    let mut figures = Figures::default();
    let n = net.nodes.len() as u64;
    for _ in 0..count {
        let origin = loop {
            let o = net.rng.below(n) as usize;
            if net.nodes[o].behaviour == Behaviour::Good {
                break o;
            }
        };
        let target = Key::from_hashed(net.rng.bytes());
        let start = net.now;
        let lookup = net.lookup(origin, target, false);
        let stats = lookup.stats();
        let found: Vec<Key> = lookup.results().iter().map(|p| *p.key()).collect();
        for key in &found {
            assert_ne!(net.nodes[net.by_key[key]].behaviour, Behaviour::Dead);
        }
        let sorted = found
            .windows(2)
            .all(|w| w[0].distance(&target) < w[1].distance(&target));
        assert!(sorted, "results not in distance order");

        // Good nodes must be found; slow ones may or may not make it before the end.
        let nearest = net.by_distance(&target);
        let wanted: Vec<&Key> = nearest
            .iter()
            .filter(|(_, b)| *b != Behaviour::Dead)
            .take(K)
            .filter(|(_, b)| *b == Behaviour::Good)
            .map(|(k, _)| k)
            .collect();
        let hits = wanted.iter().filter(|k| found.contains(k)).count();
        let visible_found = nearest
            .iter()
            .take(K)
            .filter(|(_, b)| *b == Behaviour::Good)
            .all(|(k, _)| found.contains(k));

        figures.lookups += 1;
        figures.exact += usize::from(hits == wanted.len());
        figures.exact_visible += usize::from(visible_found);
        figures.recall_sum += hits as f64 / wanted.len().max(1) as f64;
        figures.requests_sum += stats.requests;
        figures.requests_max = figures.requests_max.max(stats.requests);
        figures.timeouts_sum += stats.timeouts;
        figures.failures_sum += stats.failures;
        figures.duration_sum += net.now - start;
    }
    figures
}

/// Builds a network of `nodes`, runs `lookups` lookups healthy, then again with 10% of the nodes
/// dead and 5% slow (the tables not told), and returns both sets of figures.
///
/// With `maintenance`, the degraded network then runs one round of maintenance (every live node
/// looks up its own key, learning who answers and dropping who does not, as nodes do
/// periodically) and is measured again.
fn simulate(
    nodes: usize,
    lookups: usize,
    join_refreshes: usize,
    maintenance: bool,
    seed: u64,
) -> (Figures, Figures, Option<Figures>) {
    let started = Instant::now();
    let mut net = Network::new(nodes, seed);
    net.bootstrap(3, join_refreshes);
    let table_sizes: usize = net.nodes.iter().map(|n| n.table.len()).sum();
    println!(
        "bootstrap of {nodes} nodes: {} lookups, {:.1}s wall, mean table size {:.1}",
        net.join_lookups,
        started.elapsed().as_secs_f64(),
        table_sizes as f64 / nodes as f64
    );
    for node in &net.nodes {
        assert!(!node.table.contains(&node.key));
        assert!(node.table.len() >= K, "a node ended with a tiny table");
    }

    let healthy = run_lookups(&mut net, lookups);
    healthy.print("healthy");

    for node in &mut net.nodes {
        node.behaviour = match net.rng.below(100) {
            0..=9 => Behaviour::Dead,
            10..=14 => Behaviour::Slow,
            _ => Behaviour::Good,
        };
    }
    let degraded = run_lookups(&mut net, lookups);
    degraded.print("10% dead, 5% slow");
    let after = maintenance.then(|| {
        for i in 0..nodes {
            if net.nodes[i].behaviour != Behaviour::Dead {
                let target = net.nodes[i].key;
                net.lookup(i, target, true);
            }
        }
        let after = run_lookups(&mut net, lookups);
        after.print("10% dead, 5% slow, after one maintenance round");
        after
    });
    println!("total wall time {:.1}s", started.elapsed().as_secs_f64());
    (healthy, degraded, after)
}

#[test]
fn kad_simulated_network_lookups_find_the_k_closest() {
    // Joining nodes run only the self-lookup (no bucket refreshes) to keep the debug build
    // quick; thinner tables make lookups take more hops, not fewer.
    let (healthy, degraded, _) = simulate(3_000, 500, 0, false, 0x7e1a);

    // Healthy network: lookups are exact (a rare miss is a node the prefix limits kept out of
    // its neighbours' tables).
    assert!(healthy.exact * 100 >= healthy.lookups * 97, "{healthy:?}");
    assert!(healthy.requests_max <= 60, "{healthy:?}");

    assert!(
        degraded.exact_visible * 100 >= degraded.lookups * 95,
        "{degraded:?}"
    );
    assert!(
        degraded.exact * 100 >= degraded.lookups * 90,
        "{degraded:?}"
    );
    assert!(degraded.mean_recall() >= 0.98, "{degraded:?}");
    assert!(degraded.requests_max <= 80, "{degraded:?}");
}

/// A larger network with full joins (self-lookup and bucket refreshes), for the figures.
/// `cargo test --release kad_simulated_large -- --ignored --nocapture`
#[test]
#[ignore]
fn kad_simulated_large_network() {
    let (healthy, degraded, after) = simulate(20_000, 2_000, usize::MAX, true, 0x5eed);
    assert!(healthy.exact * 100 >= healthy.lookups * 97, "{healthy:?}");
    let visible = degraded.exact_visible * 100 >= degraded.lookups * 95;
    assert!(visible, "{degraded:?}");
    let after = after.expect("maintenance ran");
    assert!(after.exact * 100 >= after.lookups * 97, "{after:?}");
}

/// Compares the bucket walk of `RoutingTable::closest` with sorting every entry.
/// `cargo test --release kad_bench -- --ignored --nocapture`
#[test]
#[ignore]
fn kad_bench_closest_walk_vs_sort() {
    let mut rng = SplitMix64::new(3);
    let local = Key::from_hashed(rng.bytes());
    let config = TableConfig {
        max_per_prefix: usize::MAX,
        max_per_prefix_per_bucket: usize::MAX,
        ..TableConfig::default()
    };
    let mut table = RoutingTable::new(local, config);
    // Random peer IDs fill the buckets a node in a network of ~1M nodes would fill.
    for _ in 0..1_000_000 {
        let id: [u8; 20] = rng.bytes();
        table.insert(Entry::new(id.to_vec(), vec![], 0, None), 0);
    }
    let targets: Vec<Key> = (0..10_000).map(|_| Key::from_hashed(rng.bytes())).collect();
    let started = Instant::now();
    let mut sink = 0usize;
    for t in &targets {
        sink += table.closest(t, K).len();
    }
    let walk = started.elapsed();
    let started = Instant::now();
    for t in &targets {
        let mut all: Vec<&Entry> = table.iter().collect();
        all.sort_unstable_by_key(|e| e.key().distance(t));
        all.truncate(K);
        sink += all.len();
    }
    let sort = started.elapsed();
    println!(
        "table of {} entries: closest by bucket walk {:.2} µs, by full sort {:.2} µs ({sink})",
        table.len(),
        walk.as_secs_f64() * 1e6 / targets.len() as f64,
        sort.as_secs_f64() * 1e6 / targets.len() as f64,
    );
}
