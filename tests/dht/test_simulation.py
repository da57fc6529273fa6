"""The DHT in simulation: 2,000 `DhtCore` nodes in memory (the same core and Rust lookup as real
nodes), lookups of live peers at 0 %, 10 % and 30 % churn. The 10,000-node run is in
benchmarks/test_dht_simulation.py; figures in benchmarks/README.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from simulation import Network


def test_lookups_find_live_peers_under_churn() -> None:
    net = Network(2_000, seed=7)
    results = {}
    for churn in (0.0, 0.1, 0.3):
        net.churn(churn - len(net.dead) / len(net.cores))
        results[churn] = figures = net.measure(300, churn)
        print(figures.line())
    assert results[0.0].success_rate == 1.0
    assert results[0.1].success_rate >= 0.99
    assert results[0.3].success_rate >= 0.99
    assert max(results[0.0].rounds) <= 10
    # Dead peers were evicted by upkeep: lookups under churn cost only a little more.
    assert sum(results[0.3].requests) / 300 < 2 * sum(results[0.0].requests) / 300
