"""A pure-Python stand-in for ``teia._native``'s Kademlia classes, used only until the PyO3
bindings are built (conftest installs it when the extension lacks ``KadRoutingTable``).

Same API and rules as rust/src/kad (simplified: no prefix limits, no pending timeout).
"""
# mypy: ignore-errors

from __future__ import annotations

import hashlib
import os


def kad_key(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def kad_distance(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _dist(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class KadRoutingTable:
    def __init__(
        self, local_peer_id, *, k=20, bucket_prefix_limit=2, table_prefix_limit=10, max_addrs=16
    ):
        self._local = kad_key(local_peer_id)
        self._k = k
        self._max_addrs = max_addrs
        self._buckets: dict[int, list[list]] = {}
        self._pending: dict[int, list] = {}
        self._refreshed: dict[int, int] = {}

    def _index(self, key):
        d = _dist(self._local, key)
        return None if d == 0 else d.bit_length() - 1

    def _find(self, peer_id):
        key = kad_key(peer_id)
        i = self._index(key)
        if i is None:
            return None, None, None
        bucket = self._buckets.get(i, [])
        for pos, e in enumerate(bucket):
            if e[0] == peer_id:
                return i, bucket, pos
        return i, bucket, None

    def insert(self, peer_id, addrs, now_ms, ip=None):
        i, bucket, pos = self._find(bytes(peer_id))
        if i is None:
            return ("refused:local", None)
        addrs = list(addrs)[: self._max_addrs]
        if pos is not None:
            e = bucket.pop(pos)
            e[1] = addrs or e[1]
            e[2] = now_ms
            bucket.append(e)
            return ("updated", None)
        bucket = self._buckets.setdefault(i, [])
        self._refreshed[i] = max(self._refreshed.get(i, 0), now_ms)
        if len(bucket) < self._k:
            bucket.append([bytes(peer_id), addrs, now_ms])
            return ("inserted", None)
        self._pending[i] = [bytes(peer_id), addrs, now_ms]
        return ("pending", bucket[0][0])

    def ping_ok(self, peer_id, now_ms):
        i, bucket, pos = self._find(bytes(peer_id))
        if pos is None:
            return False
        e = bucket.pop(pos)
        e[2] = now_ms
        bucket.append(e)
        self._pending.pop(i, None)
        return True

    def ping_failed(self, peer_id):
        i, bucket, pos = self._find(bytes(peer_id))
        if pos is None:
            return None
        bucket.pop(pos)
        pending = self._pending.pop(i, None)
        if pending is not None:
            bucket.append(pending)
            return pending[0]
        return None

    def remove(self, peer_id):
        _i, _bucket, pos = self._find(bytes(peer_id))
        if pos is None:
            return False
        self.ping_failed(peer_id)
        return True

    def contains(self, peer_id):
        return self._find(bytes(peer_id))[2] is not None

    def get(self, peer_id):
        _, bucket, pos = self._find(bytes(peer_id))
        if pos is None:
            return None
        return (list(bucket[pos][1]), bucket[pos][2])

    def closest(self, target_key, n):
        entries = [e for b in self._buckets.values() for e in b]
        entries.sort(key=lambda e: _dist(kad_key(e[0]), target_key))
        return [(e[0], list(e[1])) for e in entries[:n]]

    def entries(self):
        return [(e[0], list(e[1]), e[2]) for b in self._buckets.values() for e in b]

    def refresh_targets(self, now_ms, max_age_ms):
        out = []
        nonempty = [i for i, b in self._buckets.items() if b]
        if not nonempty:
            return out
        for i in range(min(nonempty), 256):
            if now_ms - self._refreshed.get(i, -(10**18)) >= max_age_ms:
                rnd = int.from_bytes(os.urandom(32), "big") & ((1 << i) - 1) | (1 << i)
                out.append((int.from_bytes(self._local, "big") ^ rnd).to_bytes(32, "big"))
        return out

    def mark_refreshed(self, target_key, now_ms):
        i = self._index(target_key)
        if i is not None:
            self._refreshed[i] = max(self._refreshed.get(i, 0), now_ms)

    def __len__(self):
        return sum(len(b) for b in self._buckets.values())


class KadLookup:
    def __init__(
        self,
        target_key,
        seeds,
        *,
        local_peer_id=None,
        k=20,
        alpha=3,
        request_timeout_ms=10_000,
        max_requests=200,
    ):
        self._target = target_key
        self._local = kad_key(local_peer_id) if local_peer_id is not None else None
        self._k, self._alpha, self._timeout, self._max = k, alpha, request_timeout_ms, max_requests
        self._c: dict[int, list] = {}  # distance -> [peer_id, addrs, state, deadline]
        self._seen = set()
        self._requests = self._responses = self._failures = self._timeouts = 0
        self.is_done = False
        for p, a in seeds:
            self._add(p, a)

    def _add(self, peer_id, addrs):
        key = kad_key(peer_id)
        if key == self._local or key in self._seen:
            return
        self._seen.add(key)
        self._c[_dist(key, self._target)] = [bytes(peer_id), list(addrs), "new", 0]

    def poll(self, now_ms):
        if self.is_done:
            return ("done", None)
        waiting = 0
        for c in self._c.values():
            if c[2] == "wait":
                if c[3] <= now_ms:
                    c[2] = "timeout"
                    self._timeouts += 1
                else:
                    waiting += 1
        live = 0
        nxt = None
        waiting_top = False
        for d in sorted(self._c):
            if live >= self._k:
                break
            c = self._c[d]
            if c[2] in ("failed", "timeout"):
                continue
            if c[2] == "wait":
                waiting_top = True
            elif c[2] == "new" and nxt is None:
                nxt = c
            live += 1
        if nxt is None and not waiting_top:
            self.is_done = True
            return ("done", None)
        if nxt is not None and waiting < self._alpha and self._requests < self._max:
            nxt[2] = "wait"
            nxt[3] = now_ms + self._timeout
            self._requests += 1
            return ("send", (nxt[0], list(nxt[1])))
        deadlines = [c[3] for c in self._c.values() if c[2] == "wait"]
        if deadlines:
            return ("wait", min(deadlines))
        self.is_done = True
        return ("done", None)

    def _get(self, peer_id):
        return self._c.get(_dist(kad_key(peer_id), self._target))

    def on_response(self, peer_id, closer_peers):
        c = self._get(peer_id)
        if self.is_done or c is None or c[2] not in ("wait", "timeout"):
            return False
        c[2] = "ok"
        self._responses += 1
        for p, a in list(closer_peers)[:20]:
            self._add(p, a)
        return True

    def on_failure(self, peer_id):
        c = self._get(peer_id)
        if self.is_done or c is None or c[2] not in ("wait", "timeout"):
            return False
        c[2] = "failed"
        self._failures += 1
        return True

    def results(self):
        return [(c[0], list(c[1])) for d, c in sorted(self._c.items()) if c[2] == "ok"][: self._k]

    def unresponsive(self):
        return [c[0] for c in self._c.values() if c[2] in ("failed", "timeout")]

    def stats(self):
        return {
            "requests": self._requests,
            "responses": self._responses,
            "failures": self._failures,
            "timeouts": self._timeouts,
        }
