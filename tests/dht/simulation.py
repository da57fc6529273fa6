"""An in-memory Kademlia network of `DhtCore` nodes: no sockets, explicit time, the same core and
Rust lookup that real nodes run (shared by tests/dht/test_simulation.py and the benchmark).

Nodes join one by one (a few random contacts among the earlier nodes, then a self-lookup in
which every node asked learns the newcomer and the newcomer learns every node that answers).
Churn kills a fraction of the nodes: half of the dead refuse at once (connection refused),
half never answer (the request times out). Survivors then do one self-lookup each, as their
periodic upkeep would, which evicts the dead entries they meet.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import statistics
from dataclasses import dataclass

from teia.dht.core import DhtConfig, DhtCore, LookupDriver, SendRequest, Wait
from teia.identity import PeerId

TIMEOUT_MS = 1_000
CONFIG = DhtConfig(request_timeout_ms=TIMEOUT_MS)


@dataclass
class Figures:
    nodes: int
    churn: float
    lookups: int
    success: int
    rounds: list[int]
    requests: list[int]
    duration_ms: list[int]

    @property
    def success_rate(self) -> float:
        return self.success / self.lookups

    def line(self) -> str:
        return (
            f"{self.nodes} nodes, churn {self.churn:.0%}: {self.lookups} lookups, "
            f"success {100 * self.success_rate:.1f} %, rounds mean "
            f"{statistics.mean(self.rounds):.2f} max {max(self.rounds)}, requests mean "
            f"{statistics.mean(self.requests):.1f}, simulated time mean "
            f"{statistics.mean(self.duration_ms):.0f} ms"
        )


class Network:
    def __init__(self, size: int, *, seed: int = 1, contacts: int = 3) -> None:
        self.rng = random.Random(seed)
        self.now = 1
        self.cores: list[DhtCore] = []
        self.index: dict[PeerId, int] = {}
        self.dead: set[int] = set()
        for i in range(size):
            digest = hashlib.sha256(seed.to_bytes(8, "big") + i.to_bytes(8, "big")).digest()
            peer = PeerId.from_public_key(digest)
            self.index[peer] = i
            self.cores.append(DhtCore(peer, config=CONFIG))
        for i in range(1, size):
            core = self.cores[i]
            for _ in range(min(contacts, i)):
                other = self.cores[self.rng.randrange(i)]
                self._learn(core, other.local)
            self.run(core.lookup(core.local_bytes, self.now))

    def _learn(self, core: DhtCore, peer: PeerId) -> None:
        ping = core.add_contact(peer, (), self.now)
        if ping is not None:
            core.ping_result(ping.peer_id, self.index[ping.peer_id] not in self.dead, self.now)

    def run(self, lookup: LookupDriver) -> None:
        """Drive ``lookup`` to its end; asked nodes learn the origin, as servers do."""
        origin = lookup.core
        events: list[tuple[int, int, int]] = []
        sequence = 0
        pending: dict[int, SendRequest] = {}
        for _ in range(10_000):
            action = lookup.next_action(self.now)
            if action is None:
                break
            if isinstance(action, SendRequest):
                node = self.index[action.peer_id]
                sequence += 1
                pending[sequence] = action
                if node not in self.dead:
                    heapq.heappush(events, (self.now + self.rng.randint(5, 80), sequence, node))
                elif self.rng.random() < 0.5:
                    heapq.heappush(events, (self.now + 1, sequence, -1))
                continue
            assert isinstance(action, Wait)
            if events and events[0][0] <= action.until_ms:
                at, seq, node = heapq.heappop(events)
                self.now = max(self.now, at)
                request = pending.pop(seq)
                if node < 0:
                    lookup.on_failure(request.peer_id)
                    continue
                remote = self.cores[node]
                answer = remote.handle_request(origin.local, request.request, self.now)
                self._learn(remote, origin.local)
                lookup.on_response(request.peer_id, answer, self.now)
            else:
                self.now = max(self.now, action.until_ms)
        else:
            raise AssertionError("lookup did not end")
        for ping in lookup.pings:
            origin.ping_result(ping.peer_id, self.index[ping.peer_id] not in self.dead, self.now)
        lookup.finish(self.now)
        self.now += 1

    def churn(self, fraction: float) -> None:
        """Kill ``fraction`` of the nodes; survivors run one self-lookup each (upkeep)."""
        alive = [i for i in range(len(self.cores)) if i not in self.dead]
        self.dead.update(self.rng.sample(alive, int(fraction * len(self.cores))))
        for i in range(len(self.cores)):
            if i not in self.dead:
                core = self.cores[i]
                self.run(core.lookup(core.local_bytes, self.now))

    def measure(self, lookups: int, churn: float) -> Figures:
        """Lookups of live nodes' peer IDs from live nodes: success = the target was found."""
        live = [i for i in range(len(self.cores)) if i not in self.dead]
        figures = Figures(len(self.cores), churn, 0, 0, [], [], [])
        for _ in range(lookups):
            origin, target = self.rng.sample(live, 2)
            core = self.cores[origin]
            lookup = core.lookup(self.cores[target].local_bytes, self.now)
            self.run(lookup)
            result = lookup.finish(self.now)
            figures.lookups += 1
            found = {self.index[p] for p, _ in result.peers}
            figures.success += target in found
            figures.rounds.append(result.rounds)
            figures.requests.append(result.requests)
            figures.duration_ms.append(result.duration_ms)
        return figures
