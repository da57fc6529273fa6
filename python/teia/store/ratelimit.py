"""Token buckets per source peer, bounded in memory (the least recently used is forgotten)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """``take(key, cost, now)``: whether ``key`` may spend ``cost`` tokens at time ``now``.

    Each key's bucket holds up to ``burst`` tokens and refills at ``rate`` per second.
    A forgotten key starts again with a full bucket, so ``max_keys`` must exceed the number
    of peers a node serves at once (connection limits bound that).
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65_536) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def take(self, key: Hashable, cost: float, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed
