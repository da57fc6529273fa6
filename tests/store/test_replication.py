"""Replication on loopback: placement, W-of-R writes, merged reads, tombstones, anti-entropy,
and the issue's scenario — 5 nodes, 100 inboxes, envelopes deposited while one node dies, a
second dying after repair — with every envelope delivered and acknowledged exactly once.

The scenario runs at the issue's full size (10,000 envelopes; about 20 s on 2 cores);
``TEIA_STORE_ENVELOPES`` makes it smaller for quick local runs.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc
import pytest

from teia.errors import StoreUnavailable
from teia.identity import Identity
from teia.store import (
    Envelope,
    ReplicatedStoreClient,
    StaticMembership,
    responsible_nodes,
)
from teia.store.membership import StoreNodeInfo

from .helpers import RunningNode, client_host, envelope, node_group, owner, start_node

ENVELOPES = int(os.environ.get("TEIA_STORE_ENVELOPES", "10000"))
INBOXES = 100
TIMEOUT = 60 + ENVELOPES // 50


def test_placement_is_the_r_closest_by_xor() -> None:
    nodes = [StoreNodeInfo(Identity.generate().peer_id) for _ in range(10)]
    for _ in range(20):
        inbox = os.urandom(32)
        chosen = responsible_nodes(inbox, nodes, 3)
        assert len({n.peer_id for n in chosen}) == 3
        # Order of the input does not matter.
        assert responsible_nodes(inbox, list(reversed(nodes)), 3) == chosen
        # Nobody outside the chosen set is closer than the farthest chosen one.
        from teia._native import kad_distance, kad_key

        def distance(node: StoreNodeInfo, inbox: bytes = inbox) -> bytes:
            return kad_distance(kad_key(node.peer_id.to_bytes()), inbox)

        worst = max(distance(n) for n in chosen)
        assert all(distance(n) > worst for n in nodes if n not in chosen)


async def start_cluster(
    tg: anyio.abc.TaskGroup, tmp_path: Path, count: int
) -> tuple[list[RunningNode], StaticMembership]:
    membership = StaticMembership()
    nodes = [
        await start_node(tg, tmp_path / f"node{i}", membership=membership) for i in range(count)
    ]
    membership.set_nodes(n.info for n in nodes)
    return nodes, membership


def holders(nodes: list[RunningNode], inbox: bytes) -> Counter[bytes]:
    """How many of ``nodes`` hold each live message ID of ``inbox`` (read from their stores)."""
    count: Counter[bytes] = Counter()
    for running in nodes:
        assert running.node is not None
        live, _ = running.node.store.inbox_state(inbox, running.node.clock())
        count.update(live)
    return count


async def repair(nodes: list[RunningNode], rounds: int = 2) -> None:
    for _ in range(rounds):
        for running in nodes:
            assert running.node is not None
            await running.node.run_anti_entropy()


@pytest.mark.anyio
async def test_five_nodes_two_failures_every_envelope_once(tmp_path: Path) -> None:
    owners = [owner() for _ in range(INBOXES)]
    per_inbox = ENVELOPES // INBOXES
    deposits: list[Envelope] = [
        envelope(inbox, os.urandom(64)) for _ in range(per_inbox) for _, inbox in owners
    ]
    all_ids = {e.message_id for e in deposits}
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (_, client):
            nodes, membership = await start_cluster(tg, tmp_path, 5)
            store = ReplicatedStoreClient(client, membership, retry_after=3600)
            first_dead, second_dead = nodes[0], nodes[1]

            # Deposits in batches of 200; the first node dies a third of the way through.
            batches = [deposits[i : i + 200] for i in range(0, len(deposits), 200)]
            for index, batch in enumerate(batches):
                if index == len(batches) // 3:
                    await first_dead.stop()
                    # The node keeps its place in the membership for a while (nobody noticed
                    # yet): writes still reach W = 2 on the other two.
                if index == len(batches) // 2:
                    membership.set_nodes(n.info for n in nodes if n is not first_dead)
                acks = await store.deposit(batch)
                assert all(count >= 2 for count in acks.values())

            live = [n for n in nodes if n is not first_dead]
            await repair(live)
            for _, inbox in owners:
                copies = holders(live, inbox)
                assert set(copies) == {e.message_id for e in deposits if e.inbox == inbox}
                # Exactly R copies: repaired up to 3, and handed off where no longer responsible.
                assert set(copies.values()) == {3}

            await second_dead.stop()
            membership.set_nodes(n.info for n in live if n is not second_dead)
            survivors = [n for n in live if n is not second_dead]
            await repair(survivors)
            for _, inbox in owners:
                assert set(holders(survivors, inbox).values()) == {3}

            delivered: Counter[bytes] = Counter()
            for identity, _ in owners:
                got = await store.fetch_all(identity)
                delivered.update(e.message_id for e in got)
                assert await store.ack(identity, [e.message_id for e in got]) == 3
            assert set(delivered) == all_ids  # none lost
            assert set(delivered.values()) == {1}  # none twice
            for identity, _ in owners[:10]:
                assert await store.fetch_all(identity) == []


@pytest.mark.anyio
async def test_a_node_that_comes_back_learns_tombstones_and_resurrects_nothing(
    tmp_path: Path,
) -> None:
    alice, inbox = owner()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (_, client):
            nodes, membership = await start_cluster(tg, tmp_path, 4)
            store = ReplicatedStoreClient(client, membership)
            responsible = responsible_nodes(inbox, membership.store_nodes(), 3)
            away = next(n for n in nodes if n.info.peer_id == responsible[0].peer_id)
            items = [envelope(inbox) for _ in range(30)]
            await store.deposit(items)
            await away.stop()
            got = await store.fetch_all(alice)
            assert len(got) == 30
            assert await store.ack(alice, [e.message_id for e in got[:20]]) == 2
            # It comes back with its old database (same identity and data dir, same port).
            port = away.info.addrs[0].to_udp_address()[1]
            back = await start_node(
                tg, away.data_dir, identity=away.identity, membership=membership, port=port
            )
            nodes[nodes.index(away)] = back
            membership.set_nodes(n.info for n in nodes)
            assert back.node is not None
            before, _ = back.node.store.inbox_state(inbox, back.node.clock())
            assert len(before) == 30  # stale: it missed the acks
            await back.node.run_anti_entropy()
            after, tombs = back.node.store.inbox_state(inbox, back.node.clock())
            assert sorted(after) == sorted(e.message_id for e in got[20:])
            assert len(tombs) == 20
            remaining = await store.fetch_all(alice)
            assert {e.message_id for e in remaining} == {e.message_id for e in got[20:]}


@pytest.mark.anyio
async def test_writes_below_the_quorum_fail_clearly(tmp_path: Path) -> None:
    _, inbox = owner()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (_, client):
            nodes, membership = await start_cluster(tg, tmp_path, 3)
            store = ReplicatedStoreClient(client, membership)
            await nodes[0].stop()
            assert min((await store.deposit([envelope(inbox)])).values()) == 2
            await nodes[1].stop()
            with pytest.raises(StoreUnavailable, match="fewer than 2"):
                await store.deposit([envelope(inbox)])


@pytest.mark.anyio
async def test_bundles_spread_one_time_prekeys_over_the_replicas(tmp_path: Path) -> None:
    bob, inbox = owner()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (_, client):
            _, membership = await start_cluster(tg, tmp_path, 4)
            store = ReplicatedStoreClient(client, membership)
            keys = [os.urandom(36) for _ in range(9)]
            assert await store.put_bundle(bob, b"bundle", keys) == 3
            handed = []
            for _ in range(10):
                answer = await store.get_bundle(inbox)
                assert answer is not None
                assert answer.bundle == b"bundle"
                handed.append(answer.one_time_prekey)
            assert sorted(handed[:9]) == sorted(keys)  # each exactly once over all nodes
            assert handed[9] == b""
