"""Kademlia routing: teia's Rust table (``teia._native.KadRoutingTable``) against a pure-Python
k-bucket table (``kad_baseline.py``), driven from Python the same way.

Groups:

- closest-20 among 100,000 entries. Standard k-buckets (k = 20) cannot hold 100,000 entries
  (about 20 per bucket over the few hundred buckets a network fills), so both tables are built
  with k = 100,000: every peer is kept, half of them in the farthest bucket. This is the worst
  case for teia's bucket walk (it must select among ~50,000 entries of one bucket) and the
  scenario the issue's goal names.
- closest-20 in a standard table (k = 20) built from the same 100,000 peers: what a node holds.
- update of 1,000 known entries (re-insert: new addresses and time, moved to the bucket's tail)
  and fill of an empty standard table from 1,000 new peers; figures per call in README.md.

Timings are measured and reported; nothing is asserted about them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from benchmarks.kad_baseline import PyRoutingTable

from teia._native import KadRoutingTable

IMPLEMENTATIONS = ["teia", "python"]
POPULATION = 100_000
BATCH = 1_000
LOCAL = b"benchmark local peer"

rng = random.Random(4)
PEERS = [rng.randbytes(38) for _ in range(POPULATION)]  # the size of an Ed25519 peer ID
ADDRS = [b"\x04\xc0\x00\x02\x01\x91\x02\x0f\xa1\xcc\x03"]
TARGETS = [rng.randbytes(32) for _ in range(256)]


def new_table(implementation: str, k: int) -> Any:
    if implementation == "teia":
        return KadRoutingTable(LOCAL, k=k)
    return PyRoutingTable(LOCAL, k=k)


TABLES: dict[tuple[str, int], Any] = {}


def filled(implementation: str, k: int) -> Any:
    """A table of ``k``-buckets offered all 100,000 peers (built once per run)."""
    if (implementation, k) not in TABLES:
        table = new_table(implementation, k)
        for now, peer_id in enumerate(PEERS):
            table.insert(peer_id, ADDRS, now)
        TABLES[implementation, k] = table
    return TABLES[implementation, k]


def run_closest(benchmark: Any, table: Any) -> None:
    targets = itertools.cycle(TARGETS)
    found = benchmark(lambda: table.closest(next(targets), 20))
    assert len(found) == 20


@pytest.mark.usefixtures("record_median")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_closest_20_among_100k(benchmark: Any, implementation: str) -> None:
    benchmark.group = "kad: closest-20 among 100,000 entries (k = 100,000)"
    table = filled(implementation, POPULATION)
    assert len(table) == POPULATION
    benchmark.extra_info["entries"] = len(table)
    run_closest(benchmark, table)


@pytest.mark.usefixtures("record_median")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_closest_20_standard_table(benchmark: Any, implementation: str) -> None:
    benchmark.group = "kad: closest-20, standard table (k = 20) from 100,000 peers"
    table = filled(implementation, 20)
    benchmark.extra_info["entries"] = len(table)
    run_closest(benchmark, table)


def entries_of(table: Any) -> list[bytes]:
    if isinstance(table, KadRoutingTable):
        return [peer_id for peer_id, _, _ in table.entries()]
    return [entry[0] for bucket in table.buckets for entry in bucket]


@pytest.mark.usefixtures("record_median")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_update_known_entries(benchmark: Any, implementation: str) -> None:
    benchmark.group = f"kad: update {BATCH:,} known entries (k = 20)"
    table = filled(implementation, 20)
    known = entries_of(table)
    batch = [known[i % len(known)] for i in range(BATCH)]
    clock = itertools.count(POPULATION)
    insert: Callable[..., tuple[str, bytes | None]] = table.insert

    def update_all() -> None:
        now = next(clock)
        for peer_id in batch:
            insert(peer_id, ADDRS, now)

    benchmark.pedantic(update_all, rounds=50, iterations=1, warmup_rounds=2)
    assert table.insert(batch[0], ADDRS, 0)[0] == "updated"


@pytest.mark.usefixtures("record_median")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fill_empty_table(benchmark: Any, implementation: str) -> None:
    benchmark.group = f"kad: fill an empty table from {BATCH:,} new peers (k = 20)"
    batch = PEERS[:BATCH]

    def fill(table: Any) -> None:
        insert = table.insert
        for now, peer_id in enumerate(batch):
            insert(peer_id, ADDRS, now)

    benchmark.pedantic(
        fill, setup=lambda: ((new_table(implementation, 20),), {}), rounds=50, warmup_rounds=2
    )
