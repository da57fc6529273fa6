"""The Rust Kademlia core through its Python bindings: keys, the routing table's insert / ping /
prefix-limit rules, closest against a brute-force sort, lookups over an in-memory network driven
with explicit time, and garbage inputs."""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia._native import KadLookup, KadRoutingTable, kad_distance, kad_key

LOCAL = b"local peer"
RawPeer = tuple[bytes, list[bytes]]


def as_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def bucket_of(local: bytes, peer_id: bytes) -> int:
    """The bucket index of ``peer_id`` in ``local``'s table: the top set bit of the distance."""
    return as_int(kad_distance(kad_key(local), kad_key(peer_id))).bit_length() - 1


def ids_in_bucket(bucket: int, count: int, salt: str = "", local: bytes = LOCAL) -> list[bytes]:
    """Peer IDs that land in ``bucket`` of ``local``'s table, found by trying counters."""
    found = []
    for n in range(1_000_000):
        peer_id = f"peer {salt} {n}".encode()
        if bucket_of(local, peer_id) == bucket:
            found.append(peer_id)
            if len(found) == count:
                return found
    raise AssertionError("not enough peer IDs found")


def by_distance(target: bytes, peer_ids: list[bytes]) -> list[bytes]:
    return sorted(peer_ids, key=lambda p: as_int(kad_key(p)) ^ as_int(target))


# --- keys --------------------------------------------------------------------------------------


def test_kad_key_is_sha256() -> None:
    for data in (b"", b"abc", bytes(range(256))):
        assert kad_key(data) == hashlib.sha256(data).digest()


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_kad_distance_is_xor(a: bytes, b: bytes) -> None:
    d = kad_distance(a, b)
    assert d == bytes(x ^ y for x, y in zip(a, b, strict=True))
    assert d == kad_distance(b, a)
    assert kad_distance(a, a) == bytes(32)
    # Byte order is integer order.
    assert (d < kad_distance(a, bytes(32))) == (as_int(d) < as_int(a))


# --- routing table: insert, update, pending, ping ----------------------------------------------


def test_insert_update_get_entries() -> None:
    table = KadRoutingTable(LOCAL, max_addrs=3)
    assert len(table) == 0
    assert table.insert(b"a", [b"addr-1"], 10) == ("inserted", None)
    assert table.insert(b"b", [], 11) == ("inserted", None)
    assert table.insert(b"a", [b"addr-2", b"x", b"y", b"z"], 12) == ("updated", None)
    assert len(table) == 2
    assert table.contains(b"a")
    assert not table.contains(b"c")
    # Addresses replaced and capped at max_addrs; last seen refreshed.
    assert table.get(b"a") == ([b"addr-2", b"x", b"y"], 12)
    assert table.get(b"c") is None
    assert sorted(table.entries()) == [(b"a", [b"addr-2", b"x", b"y"], 12), (b"b", [], 11)]
    assert table.remove(b"b")
    assert not table.remove(b"b")
    assert len(table) == 1
    assert "len=1" in repr(table)


def test_local_peer_is_refused() -> None:
    table = KadRoutingTable(LOCAL)
    assert table.insert(LOCAL, [], 0) == ("refused:local-key", None)
    assert len(table) == 0


def test_full_bucket_asks_to_ping_the_oldest() -> None:
    a, b, c, d = ids_in_bucket(255, 4)
    table = KadRoutingTable(LOCAL, k=2)
    table.insert(a, [b"A"], 1)
    table.insert(b, [b"B"], 2)
    assert table.insert(c, [b"C"], 3) == ("pending", a)
    # One outstanding ping per bucket: another candidate is refused for now.
    assert table.insert(d, [], 4) == ("refused:bucket-full", None)
    # The same candidate again still waits on the same ping.
    assert table.insert(c, [b"C2"], 5) == ("pending", a)
    assert len(table) == 2
    assert not table.contains(c)

    # The oldest answered: it stays (now the most recently seen) and the candidate is dropped.
    assert table.ping_ok(a, 6)
    assert table.get(a) == ([b"A"], 6)
    assert not table.contains(c)
    # So the next candidate pings the new oldest, b; b is dead: d takes its slot.
    assert table.insert(d, [b"D"], 7) == ("pending", b)
    assert table.ping_failed(b) == d
    assert not table.contains(b)
    assert table.get(d) == ([b"D"], 7)
    assert len(table) == 2
    # Reporting again, or about strangers, changes nothing.
    assert table.ping_failed(b) is None
    assert not table.ping_ok(b, 8)
    assert table.ping_failed(b"stranger") is None


def test_ping_failed_without_candidate_just_evicts() -> None:
    a, b = ids_in_bucket(254, 2)
    table = KadRoutingTable(LOCAL, k=2)
    table.insert(a, [], 1)
    table.insert(b, [], 1)
    assert table.ping_failed(a) is None
    assert not table.contains(a)
    assert len(table) == 1


def test_candidate_reinserted_after_oldest_was_seen_is_settled_by_that_ping() -> None:
    """The bug fixed in table.rs: the answer and the candidate's link must name the same entry."""
    a, b, c = ids_in_bucket(255, 3, "reinsert")
    for ok in (True, False):
        table = KadRoutingTable(LOCAL, k=2)
        table.insert(a, [], 1)
        table.insert(b, [], 1)
        assert table.insert(c, [], 2) == ("pending", a)
        assert table.insert(a, [], 3) == ("updated", None)  # a seen: b is now the oldest
        assert table.insert(c, [b"fresh"], 4) == ("pending", a)
        if ok:
            assert table.ping_ok(a, 5)
            assert not table.contains(c)
            # Settled: the bucket takes a new candidate at once.
            (e,) = ids_in_bucket(255, 1, "reinsert-next")
            assert table.insert(e, [], 6) == ("pending", b)
        else:
            assert table.ping_failed(a) == c
            assert table.get(c) == ([b"fresh"], 4)


def test_remove_promotes_the_waiting_candidate() -> None:
    a, b, c = ids_in_bucket(255, 3, "remove")
    table = KadRoutingTable(LOCAL, k=2)
    table.insert(a, [], 1)
    table.insert(b, [], 1)
    assert table.insert(c, [], 2) == ("pending", a)
    assert table.remove(b)
    assert table.contains(c)
    assert len(table) == 2


# --- routing table: prefix limits --------------------------------------------------------------


def test_bucket_prefix_limit_counts_ipv4_slash_24() -> None:
    peers = ids_in_bucket(255, 6, "v4")
    table = KadRoutingTable(LOCAL, bucket_prefix_limit=2)
    assert table.insert(peers[0], [], 0, "198.51.100.1")[0] == "inserted"
    assert table.insert(peers[1], [], 0, "198.51.100.200")[0] == "inserted"
    assert table.insert(peers[2], [], 0, "198.51.100.7") == ("refused:bucket-prefix-limit", None)
    # IPv4-mapped IPv6 is the same network.
    assert table.insert(peers[2], [], 0, "::ffff:198.51.100.9")[0] == "refused:bucket-prefix-limit"
    # Another /24, and an exempt entry (no IP), are fine.
    assert table.insert(peers[2], [], 0, "198.51.101.7")[0] == "inserted"
    assert table.insert(peers[3], [], 0)[0] == "inserted"
    # A known entry moving into the crowded network is refused and keeps its old data.
    assert table.insert(peers[3], [b"new"], 5, "198.51.100.3")[0] == "refused:bucket-prefix-limit"
    assert table.get(peers[3]) == ([], 0)
    # Removing one frees the slot.
    assert table.remove(peers[0])
    assert table.insert(peers[3], [], 6, "198.51.100.3") == ("updated", None)


def test_bucket_prefix_limit_counts_ipv6_slash_48() -> None:
    peers = ids_in_bucket(255, 3, "v6")
    table = KadRoutingTable(LOCAL, bucket_prefix_limit=2)
    assert table.insert(peers[0], [], 0, "2001:db8:1::1")[0] == "inserted"
    assert table.insert(peers[1], [], 0, "2001:db8:1:ffff::2")[0] == "inserted"
    assert table.insert(peers[2], [], 0, "2001:db8:1:2:3:4:5:6")[0] == "refused:bucket-prefix-limit"
    assert table.insert(peers[2], [], 0, "2001:db8:2::1")[0] == "inserted"


def test_table_prefix_limit() -> None:
    table = KadRoutingTable(LOCAL, bucket_prefix_limit=2, table_prefix_limit=5)
    outcomes = []
    for bucket in (255, 254, 253, 252):
        for peer_id in ids_in_bucket(bucket, 2, "table"):
            outcomes.append(table.insert(peer_id, [], 0, "203.0.113.50")[0])
    assert outcomes.count("inserted") == 5
    assert outcomes.count("refused:table-prefix-limit") == 3
    assert len(table) == 5


# --- routing table: closest --------------------------------------------------------------------


@given(
    peer_ids=st.lists(st.binary(min_size=1, max_size=12), max_size=300, unique=True),
    k=st.integers(min_value=1, max_value=25),
    target=st.binary(min_size=32, max_size=32),
    n=st.integers(min_value=0, max_value=60),
    local=st.binary(max_size=8),
)
def test_closest_matches_brute_force(
    peer_ids: list[bytes], k: int, target: bytes, n: int, local: bytes
) -> None:
    table = KadRoutingTable(local, k=k)
    inserted = []
    for i, peer_id in enumerate(peer_ids):
        outcome, _ = table.insert(peer_id, [bytes([i % 256])], i)
        if outcome == "inserted":
            inserted.append(peer_id)
        else:
            assert outcome in ("pending", "refused:bucket-full", "refused:local-key")
    assert sorted(p for p, _, _ in table.entries()) == sorted(inserted)
    assert len(table) == len(inserted)
    got = table.closest(target, n)
    assert [p for p, _ in got] == by_distance(target, inserted)[:n]
    for peer_id, addrs in got:
        assert table.get(peer_id) == (addrs, peer_ids.index(peer_id))


def test_closest_on_a_large_random_table() -> None:
    rng = random.Random(4)
    table = KadRoutingTable(LOCAL, k=20)
    for i in range(20_000):
        table.insert(rng.randbytes(16), [], i)
    everyone = [p for p, _, _ in table.entries()]
    for _ in range(50):
        target = rng.randbytes(32)
        assert [p for p, _ in table.closest(target, 20)] == by_distance(target, everyone)[:20]
    # The local key's own neighbourhood too.
    me = kad_key(LOCAL)
    assert [p for p, _ in table.closest(me, 20)] == by_distance(me, everyone)[:20]


# --- routing table: refresh --------------------------------------------------------------------


def test_refresh_targets_and_mark_refreshed() -> None:
    table = KadRoutingTable(LOCAL)
    assert table.refresh_targets(1_000, 100) == []
    for peer_id in ids_in_bucket(254, 2, "refresh"):
        table.insert(peer_id, [], 500)
    # Buckets 254 (fresh: an insert at 500) and 255 (never refreshed).
    (target,) = table.refresh_targets(550, 100)
    assert len(target) == 32
    assert as_int(kad_distance(kad_key(LOCAL), target)).bit_length() - 1 == 255
    table.mark_refreshed(target, 550)
    assert table.refresh_targets(599, 100) == []
    targets = table.refresh_targets(650, 100)
    assert sorted(as_int(kad_distance(kad_key(LOCAL), t)).bit_length() - 1 for t in targets) == [
        254,
        255,
    ]
    # Random each time.
    assert table.refresh_targets(650, 100) != targets


# --- lookups over an in-memory network ---------------------------------------------------------


@dataclass
class Network:
    """Nodes that answer FIND_NODE from their own routing tables, after a latency; dead nodes
    never answer."""

    tables: dict[bytes, KadRoutingTable]
    latency_ms: dict[bytes, int]
    dead: set[bytes] = field(default_factory=set)

    @classmethod
    def build(cls, size: int, seed: int, k: int = 20) -> Network:
        rng = random.Random(seed)
        ids = [f"node {seed} {i}".encode() for i in range(size)]
        tables = {}
        for peer_id in ids:
            table = KadRoutingTable(peer_id, k=k)
            for other in ids:
                table.insert(other, [b"addr of " + other], 0)
            tables[peer_id] = table
        latency = {peer_id: rng.randrange(5, 200) for peer_id in ids}
        return cls(tables, latency)

    def answer(self, peer_id: bytes, target: bytes) -> list[RawPeer]:
        return self.tables[peer_id].closest(target, 20)

    def live_ids(self) -> list[bytes]:
        return [p for p in self.tables if p not in self.dead]


@dataclass
class Run:
    lookup: KadLookup
    finished_at_ms: int
    asked: list[bytes]
    heard_of: set[bytes]


def drive(network: Network, lookup: KadLookup, target: bytes, start_ms: int = 0) -> Run:
    """Poll the lookup with explicit time; deliver answers when they are due."""
    now = start_ms
    due: list[tuple[int, bytes]] = []
    asked: list[bytes] = []
    heard_of: set[bytes] = set()
    for _ in range(100_000):
        action, value = lookup.poll(now)
        if action == "done":
            assert value is None
            assert lookup.is_done
            return Run(lookup, now, asked, heard_of)
        if action == "send":
            assert isinstance(value, tuple)
            peer_id, addrs = value
            assert addrs == [b"addr of " + peer_id]
            asked.append(peer_id)
            if peer_id not in network.dead:
                heapq.heappush(due, (now + network.latency_ms[peer_id], peer_id))
            continue
        assert action == "wait"
        assert isinstance(value, int)
        assert value > now
        if due and due[0][0] < value:
            now, peer_id = heapq.heappop(due)
            answer = network.answer(peer_id, target)
            heard_of.update(p for p, _ in answer)
            lookup.on_response(peer_id, answer)
        else:
            now = value
    raise AssertionError("the lookup did not finish")


def test_lookup_finds_the_k_closest_in_a_healthy_network() -> None:
    network = Network.build(300, seed=1)
    rng = random.Random(2)
    everyone = list(network.tables)
    for _ in range(10):
        origin = rng.choice(everyone)
        target = rng.randbytes(32)
        seeds = network.tables[origin].closest(target, 20)
        lookup = KadLookup(target, seeds, local_peer_id=origin)
        run = drive(network, lookup, target)
        want = by_distance(target, [p for p in everyone if p != origin])[:20]
        assert [p for p, _ in lookup.results()] == want
        assert all(addrs == [b"addr of " + p] for p, addrs in lookup.results())
        assert origin not in run.asked
        assert lookup.unresponsive() == []
        stats = lookup.stats()
        assert stats["requests"] == len(run.asked) == len(set(run.asked))
        assert stats["responses"] == stats["requests"]
        assert stats["timeouts"] == stats["failures"] == 0
        # Every request is answered in under 200 ms; three at a time, the lookup is quick.
        assert run.finished_at_ms < 200 * stats["requests"]


def test_lookup_times_out_dead_peers_and_still_finds_the_live_closest() -> None:
    network = Network.build(300, seed=3)
    rng = random.Random(4)
    everyone = list(network.tables)
    network.dead = set(rng.sample(everyone, 90))  # 30 %
    timeout = 1_000
    for _ in range(10):
        origin = rng.choice(network.live_ids())
        target = rng.randbytes(32)
        seeds = network.tables[origin].closest(target, 20)
        lookup = KadLookup(target, seeds, local_peer_id=origin, request_timeout_ms=timeout)
        run = drive(network, lookup, target)
        # Every answer carries the 20 closest its node knows, dead ones included, so live peers
        # ranked past 20 overall may never be mentioned: the lookup returns the 20 closest live
        # peers it heard of (the tables here are complete, so those are nearly the true ones).
        heard_of = (run.heard_of | {p for p, _ in seeds}) - network.dead - {origin}
        got = [p for p, _ in lookup.results()]
        assert got == by_distance(target, list(heard_of))[:20]
        true_closest = by_distance(target, [p for p in network.live_ids() if p != origin])[:20]
        assert len(set(got) & set(true_closest)) >= 15
        dead_asked = {p for p in run.asked if p in network.dead}
        # A request still in flight when the k closest have answered is abandoned, not counted.
        unresponsive = lookup.unresponsive()
        assert set(unresponsive) <= dead_asked
        assert lookup.stats()["timeouts"] == len(unresponsive) > 0


def test_slow_peer_does_not_stall_the_lookup_and_its_late_answer_counts() -> None:
    network = Network.build(60, seed=5)
    target = kad_key(b"record")
    everyone = list(network.tables)
    closest = by_distance(target, everyone)
    slow = closest[0]
    network.latency_ms[slow] = 1_500
    lookup = KadLookup(target, [(slow, [b"addr of " + slow])], k=20, request_timeout_ms=1_000)
    action, value = lookup.poll(0)
    assert (action, value) == ("send", (slow, [b"addr of " + slow]))
    assert lookup.poll(0) == ("wait", 1_000)
    assert lookup.poll(999) == ("wait", 1_000)
    # Timed out: with no other candidate, the lookup is over.
    assert lookup.poll(1_000) == ("done", None)
    assert lookup.unresponsive() == [slow]
    assert lookup.stats()["timeouts"] == 1
    # After the end, answers are ignored.
    assert not lookup.on_response(slow, network.answer(slow, target))

    # With another seed, the lookup carries on while the slow one is out, and the slow one's
    # late answer is still used.
    other = closest[30]
    lookup = KadLookup(
        target,
        [(slow, [b"addr of " + slow]), (other, [b"addr of " + other])],
        alpha=1,
        request_timeout_ms=1_000,
    )
    assert lookup.poll(0) == ("send", (slow, [b"addr of " + slow]))
    assert lookup.poll(0) == ("wait", 1_000)
    assert lookup.poll(1_000) == ("send", (other, [b"addr of " + other]))
    assert lookup.poll(1_000) == ("wait", 2_000)
    assert lookup.on_response(slow, network.answer(slow, target))
    assert lookup.stats()["late_responses"] == 1
    assert lookup.on_response(other, network.answer(other, target))
    run = drive(network, lookup, target, start_ms=1_600)
    assert [p for p, _ in lookup.results()] == closest[:20]
    assert lookup.unresponsive() == []
    assert lookup.stats()["timeouts"] == 1
    assert run.finished_at_ms < 1_600 + 10 * 200


def test_lookup_failures_unsolicited_and_duplicate_answers() -> None:
    target = kad_key(b"t")
    seeds: list[RawPeer] = [(b"p1", [b"a1"]), (b"p2", [b"a2"])]
    lookup = KadLookup(target, seeds, alpha=1, local_peer_id=b"me")
    action, value = lookup.poll(0)
    assert action == "send"
    assert isinstance(value, tuple)
    first = value[0]
    second = b"p2" if first == b"p1" else b"p1"
    assert not lookup.on_response(second, [(b"p9", [])])  # not asked yet
    assert not lookup.on_response(b"stranger", [(b"p9", [])])
    assert not lookup.on_failure(b"stranger")
    # The answer names the local peer: never asked, never a result.
    assert lookup.on_response(first, [(b"me", [b"mine"])])
    assert not lookup.on_response(first, [])  # duplicate
    assert lookup.poll(1) == ("send", (second, [b"a2" if second == b"p2" else b"a1"]))
    assert lookup.on_failure(second)
    assert not lookup.on_failure(second)
    assert lookup.poll(2) == ("done", None)
    assert lookup.results() == [(first, [b"a1" if first == b"p1" else b"a2"])]
    assert lookup.unresponsive() == [second]
    assert lookup.stats() == {
        "requests": 2,
        "responses": 1,
        "late_responses": 0,
        "failures": 1,
        "timeouts": 0,
        "ignored_responses": 3,
    }
    assert "done=true" in repr(lookup)


def test_lookup_request_budget_and_empty_seeds() -> None:
    assert KadLookup(kad_key(b"t"), []).poll(0) == ("done", None)
    lookup = KadLookup(kad_key(b"t"), [(b"p0", [])], max_requests=5)
    counter = iter(range(1, 10_000))
    now = 0
    while (step := lookup.poll(now))[0] != "done":
        action, value = step
        if action == "send":
            assert isinstance(value, tuple)
            # Every peer answers with 20 new peers, forever.
            fresh: list[RawPeer] = [(b"p%d" % next(counter), []) for _ in range(20)]
            lookup.on_response(value[0], fresh)
        else:
            assert isinstance(value, int)
            now = value
    assert lookup.stats()["requests"] == 5


# --- garbage inputs ----------------------------------------------------------------------------

BAD_IPS = [
    "",
    "1.2.3",
    "256.1.1.1",
    "1.2.3.4:80",
    "[::1]",
    "[::1]:80",
    "example.com",
    "1.2.3.4/24",
    " 1.2.3.4",
    "::g",
    "1.2.3.4\x00",
]


@pytest.mark.parametrize("ip", BAD_IPS)
def test_bad_ip_text_is_a_value_error(ip: str) -> None:
    table = KadRoutingTable(LOCAL)
    with pytest.raises(ValueError, match="ip must be an IPv4 or IPv6 address"):
        table.insert(b"peer", [], 0, ip)
    assert len(table) == 0


def wrong_length_keys() -> Iterator[bytes]:
    yield b""
    yield bytes(31)
    yield bytes(33)
    yield b"x" * 64


@pytest.mark.parametrize("key", list(wrong_length_keys()))
def test_wrong_key_lengths_are_value_errors(key: bytes) -> None:
    good = bytes(32)
    table = KadRoutingTable(LOCAL)
    with pytest.raises(ValueError, match="32-byte Kademlia key"):
        kad_distance(key, good)
    with pytest.raises(ValueError, match="32-byte Kademlia key"):
        kad_distance(good, key)
    with pytest.raises(ValueError, match="target_key"):
        table.closest(key, 3)
    with pytest.raises(ValueError, match="target_key"):
        table.mark_refreshed(key, 0)
    with pytest.raises(ValueError, match="target_key"):
        KadLookup(key, [])


def test_negative_numbers_are_value_errors() -> None:
    table = KadRoutingTable(LOCAL)
    table.insert(b"a", [], 0)
    lookup = KadLookup(bytes(32), [(b"a", [])])
    calls: list[Callable[[], object]] = [
        lambda: table.insert(b"b", [], -1),
        lambda: table.ping_ok(b"a", -5),
        lambda: table.closest(bytes(32), -1),
        lambda: table.refresh_targets(-1, 10),
        lambda: table.refresh_targets(10, -1),
        lambda: table.mark_refreshed(bytes(32), -1),
        lambda: lookup.poll(-1),
        lambda: KadRoutingTable(LOCAL, k=-1),
        lambda: KadRoutingTable(LOCAL, bucket_prefix_limit=-1),
        lambda: KadRoutingTable(LOCAL, table_prefix_limit=-2),
        lambda: KadRoutingTable(LOCAL, max_addrs=-3),
        lambda: KadLookup(bytes(32), [], k=-1),
        lambda: KadLookup(bytes(32), [], alpha=-1),
        lambda: KadLookup(bytes(32), [], request_timeout_ms=-1),
        lambda: KadLookup(bytes(32), [], max_requests=-1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="non-negative"):
            call()
    assert len(table) == 1
    assert not lookup.is_done


def test_wrong_types_are_type_errors() -> None:
    table = KadRoutingTable(LOCAL)
    with pytest.raises(TypeError, match="list of bytes"):
        table.insert(b"a", b"an address", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of bytes"):
        table.insert(b"a", ["text"], 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        table.insert("a", [], 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuples"):
        KadLookup(bytes(32), [b"a"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="tuples"):
        KadLookup(bytes(32), [(b"a", [], 1)])  # type: ignore[list-item]
    lookup = KadLookup(bytes(32), [(b"a", [])])
    lookup.poll(0)
    with pytest.raises(TypeError, match="peer ID must be bytes"):
        lookup.on_response(b"a", [("b", [])])  # type: ignore[list-item]
    # A refused answer is not consumed: the real one is still accepted.
    assert lookup.on_response(b"a", [])
    assert len(table) == 0


@given(ip=st.text(max_size=45))
def test_any_ip_text_is_accepted_or_a_value_error(ip: str) -> None:
    table = KadRoutingTable(LOCAL)
    try:
        outcome, _ = table.insert(b"peer", [], 0, ip)
    except ValueError:
        assert len(table) == 0
    else:
        assert outcome == "inserted"


@given(
    peer_id=st.binary(max_size=100),
    addrs=st.lists(st.binary(max_size=100), max_size=40),
    now=st.integers(min_value=0, max_value=2**62),
    closer=st.lists(
        st.tuples(st.binary(max_size=40), st.lists(st.binary(max_size=20), max_size=30)),
        max_size=50,
    ),
)
def test_arbitrary_bytes_never_break_the_core(
    peer_id: bytes, addrs: list[bytes], now: int, closer: list[RawPeer]
) -> None:
    table = KadRoutingTable(LOCAL, k=2)
    assert table.insert(peer_id, addrs, now)[0] in ("inserted", "refused:local-key")
    entry = table.get(peer_id)
    if entry is not None:
        assert entry == (addrs[:16], now)
    lookup = KadLookup(kad_key(peer_id), [(peer_id, addrs)], request_timeout_ms=10)
    action, _ = lookup.poll(now)
    assert action == "send"
    assert lookup.on_response(peer_id, closer)
    while (step := lookup.poll(now))[0] != "done":
        if step[0] == "wait":
            assert isinstance(step[1], int)
            now = step[1]
    results = lookup.results()
    assert len(results) == 1
    assert all(len(a) <= 16 for _, a in results)
    assert lookup.stats()["timeouts"] == len(lookup.unresponsive())
