"""Lookups of a point: the peers closest to a 32-byte position used as it is (an inbox key),
not to its hash. The request key ground to hash near the point, and lookups in a simulated
network far larger than k that find exactly the k closest live peers by brute force."""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teia._native import kad_key
from teia.dht.core import MAX_POINT_PREFIX_BITS, DhtCore, point_request_key

sys.path.insert(0, str(Path(__file__).parent))

from simulation import Network


def _prefix(value: bytes, bits: int) -> int:
    return int.from_bytes(value, "big") >> (256 - bits)


@settings(max_examples=50, deadline=None)
@given(point=st.binary(min_size=32, max_size=32), bits=st.integers(0, 10))
def test_the_request_key_hashes_to_the_points_prefix(point: bytes, bits: int) -> None:
    key = point_request_key(point, bits)
    assert len(key) == 32
    assert _prefix(hashlib.sha256(key).digest(), bits) == _prefix(point, bits)


@given(point=st.binary(max_size=64).filter(lambda b: len(b) != 32))
def test_a_point_is_32_bytes(point: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        point_request_key(point)


@pytest.mark.parametrize("bits", [-1, MAX_POINT_PREFIX_BITS + 1])
def test_prefix_bits_are_bounded(bits: int) -> None:
    with pytest.raises(ValueError, match="prefix_bits"):
        point_request_key(b"\x00" * 32, bits)


def test_the_request_key_does_not_carry_the_point() -> None:
    point = bytes(range(32))
    keys = {point_request_key(point, 8) for _ in range(4)}
    assert len(keys) == 4  # a random stem each time
    assert all(point[:8] not in key for key in keys)


def _closest_by_brute_force(net: Network, point: bytes, count: int, origin: int) -> list[int]:
    live = [i for i in range(len(net.cores)) if i not in net.dead and i != origin]
    target = int.from_bytes(point, "big")
    return sorted(
        live, key=lambda i: int.from_bytes(kad_key(net.cores[i].local_bytes), "big") ^ target
    )[:count]


def test_point_lookups_find_exactly_the_k_closest_in_a_network_larger_than_k() -> None:
    net = Network(400, seed=11)
    net.churn(0.1)
    rng = random.Random(5)
    live = [i for i in range(len(net.cores)) if i not in net.dead]
    hashed_lookup_agrees = 0
    for _ in range(12):
        point = rng.randbytes(32)
        origin = rng.choice(live)
        core: DhtCore = net.cores[origin]
        lookup = core.lookup_point(point, point_request_key(point, 12), net.now)
        assert lookup.target == point
        net.run(lookup)
        result = lookup.finish(net.now)
        found = [net.index[p] for p, _ in result.peers]
        k = core.config.k
        assert found == _closest_by_brute_force(net, point, k, origin)

        # The lookup of the same bytes as a key converges on their hash: another place.
        hashed = core.lookup(point, net.now)
        net.run(hashed)
        hashed_found = [net.index[p] for p, _ in hashed.finish(net.now).peers]
        hashed_lookup_agrees += set(hashed_found) == set(found)
    assert hashed_lookup_agrees == 0


def test_closest_to_point_orders_the_table_by_the_point_itself() -> None:
    net = Network(60, seed=3)
    core = net.cores[0]
    point = bytes(32)
    mine = [p for p, _ in core.closest_to_point(point, 5)]
    table = [p for p, _, _ in core.table.entries()]
    expected = sorted(table, key=lambda p: kad_key(p))[:5]  # XOR to zero is the key itself
    assert mine == expected
    with pytest.raises(ValueError, match="32 bytes"):
        core.closest_to_point(b"short")
