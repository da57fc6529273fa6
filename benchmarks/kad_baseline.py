"""A straightforward pure-Python Kademlia routing table: the baseline of ``test_kad.py``.

The same rules as teia's Rust table without the prefix limits: 256 k-buckets of least recently
seen first; a known peer moves to the tail; a full bucket parks one candidate and names its
oldest entry to ping. ``closest`` takes the n smallest XOR distances over every entry
(``heapq.nsmallest``, which beats a full sort for small n), as a plain Python table would.
"""

from __future__ import annotations

import hashlib
import heapq

Entry = list  # [peer_id: bytes, key: int, addrs: list[bytes], last_seen_ms: int]


class PyRoutingTable:
    def __init__(self, local_peer_id: bytes, k: int = 20, max_addrs: int = 16) -> None:
        self.local = int.from_bytes(hashlib.sha256(local_peer_id).digest(), "big")
        self.k = k
        self.max_addrs = max_addrs
        self.buckets: list[list[Entry]] = [[] for _ in range(256)]
        self.pending: dict[int, Entry] = {}
        self.known: set[int] = set()  # so a new peer costs no bucket scan

    def __len__(self) -> int:
        return len(self.known)

    def insert(self, peer_id: bytes, addrs: list[bytes], now_ms: int) -> tuple[str, bytes | None]:
        key = int.from_bytes(hashlib.sha256(peer_id).digest(), "big")
        distance = key ^ self.local
        if distance == 0:
            return "refused:local-key", None
        index = distance.bit_length() - 1
        bucket = self.buckets[index]
        if key in self.known:
            for position, entry in enumerate(bucket):
                if entry[1] == key:
                    del bucket[position]
                    bucket.append([peer_id, key, addrs[: self.max_addrs], now_ms])
                    return "updated", None
        entry = [peer_id, key, addrs[: self.max_addrs], now_ms]
        if len(bucket) < self.k:
            bucket.append(entry)
            self.known.add(key)
            return "inserted", None
        waiting = self.pending.get(index)
        if waiting is not None and waiting[1] != key:
            return "refused:bucket-full", None
        self.pending[index] = entry
        return "pending", bucket[0][0]

    def closest(self, target_key: bytes, n: int) -> list[tuple[bytes, list[bytes]]]:
        target = int.from_bytes(target_key, "big")
        everyone = (entry for bucket in self.buckets for entry in bucket)
        nearest = heapq.nsmallest(n, everyone, key=lambda entry: entry[1] ^ target)
        return [(entry[0], entry[2]) for entry in nearest]
