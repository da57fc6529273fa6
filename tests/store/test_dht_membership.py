"""`DhtMembership` on real hosts over loopback QUIC: four DHT servers, three of them store nodes
advertising the store protocol in their records; a client finds the R closest store nodes to an
inbox through the DHT, deposits there and fetches back, and the plain DHT node (made the
XOR-closest to the inbox) is never chosen. Placement by the inbox key itself: in a DHT with
more servers than k, a client that knows no store node finds, for each of several inboxes, the
R store nodes XOR-closest to the inbox key (checked by brute force)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import anyio
import pytest

from teia._native import kad_distance
from teia.dht.core import DhtConfig, Mode
from teia.dht.messages import KAD_PROTOCOL
from teia.dht.node import DhtNode, DhtTiming
from teia.dht.records import PeerRecord, SignedPeerRecord
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId
from teia.store import (
    PROTOCOL,
    InboxStore,
    ReplicatedStoreClient,
    StoreClient,
    StoreNode,
    responsible_nodes,
)
from teia.store.membership import DhtMembership, node_key

from .helpers import LOOPBACK, TEST_SETTINGS, FakeClock, envelope, owner

pytestmark = pytest.mark.anyio

CONFIG = DhtConfig(request_timeout_ms=3_000)
TIMING = DhtTiming(request_timeout_s=3.0, lookup_timeout_s=10.0)
REPLICATION = 2
TIMEOUT = 40


@contextlib.asynccontextmanager
async def dht_host(
    identity: Identity, mode: Mode = Mode.SERVER, config: DhtConfig = CONFIG
) -> AsyncIterator[DhtNode]:
    async with (
        Host(identity, listen=[LOOPBACK], dial_timeout=2.0) as host,
        DhtNode(host, mode=mode, config=config, timing=TIMING) as dht,
    ):
        yield dht


async def test_client_finds_the_closest_store_nodes_through_the_dht(tmp_path: Path) -> None:
    owner_identity, inbox = owner()
    identities = [Identity.generate() for _ in range(4)]
    # The plain DHT node is the one closest to the inbox: choosing it would be the mistake.
    identities.sort(key=lambda i: kad_distance(node_key(i.peer_id), inbox))
    plain_identity, store_identities = identities[0], identities[1:]

    with anyio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            plain = await stack.enter_async_context(dht_host(plain_identity))
            store_dhts: list[DhtNode] = []
            stores: list[StoreNode] = []
            memberships: list[DhtMembership] = []
            for index, identity in enumerate(store_identities):
                dht = await stack.enter_async_context(dht_host(identity))
                membership = DhtMembership(dht)
                db = stack.enter_context(InboxStore(tmp_path / f"node{index}.db"))
                node = await stack.enter_async_context(
                    StoreNode(dht.host, db, membership=membership, settings=TEST_SETTINGS)
                )
                store_dhts.append(dht)
                stores.append(node)
                memberships.append(membership)
            servers = [plain, *store_dhts]
            for server in servers:
                await server.bootstrap([s.host.addrs[0] for s in servers if s is not server])
            assert await plain.publish_record() >= 1
            for dht in store_dhts:
                assert await dht.publish_record(protocols=[KAD_PROTOCOL, PROTOCOL]) >= 1

            store_ids = {i.peer_id for i in store_identities}
            # Each store node finds the other two (and lists itself).
            for membership in memberships:
                found = await membership.refresh()
                assert {n.peer_id for n in found} == store_ids

            client_dht = await stack.enter_async_context(
                dht_host(Identity.generate(), mode=Mode.CLIENT)
            )
            assert await client_dht.bootstrap([plain.host.addrs[0]]) >= 1
            client_membership = DhtMembership(client_dht)
            assert client_membership.store_nodes() == ()

            chosen = await client_membership.nodes_for(inbox, REPLICATION)
            known = client_membership.store_nodes()
            assert {n.peer_id for n in known} == store_ids
            assert plain_identity.peer_id not in {n.peer_id for n in known}
            expected = sorted(
                store_identities, key=lambda i: kad_distance(node_key(i.peer_id), inbox)
            )[:REPLICATION]
            assert [n.peer_id for n in chosen] == [i.peer_id for i in expected]
            # The nodes agree with the client on the holders.
            for membership in memberships:
                holders = responsible_nodes(inbox, membership.store_nodes(), REPLICATION)
                assert [n.peer_id for n in holders] == [n.peer_id for n in chosen]

            client = StoreClient(client_dht.host, timeout=3.0)
            stack.push_async_callback(client.aclose)
            replicated = ReplicatedStoreClient(
                client, client_membership, replication=REPLICATION, write_quorum=REPLICATION
            )
            sent = envelope(inbox, b"through the dht")
            acks = await replicated.deposit([sent])
            assert acks[sent.message_id] == REPLICATION
            fetched = await replicated.fetch_all(owner_identity)
            assert [e.message_id for e in fetched] == [sent.message_id]

            chosen_ids = {n.peer_id for n in chosen}
            for node in stores:
                live, _ = node.store.inbox_state(inbox, node.clock())
                held = sent.message_id in live
                assert held == (node.host.peer_id in chosen_ids)


def _distance(identity: Identity, point: bytes) -> bytes:
    return kad_distance(node_key(identity.peer_id), point)


async def test_placement_is_by_the_inbox_key_among_more_dht_servers_than_k(
    tmp_path: Path,
) -> None:
    k = 5
    config = DhtConfig(k=k, request_timeout_ms=3_000)
    # Kademlia finds the exact k closest only where no bucket on the way overflows: a node keeps
    # k peers of the half of the key space it is not in, so with 12 servers and k = 5 one half
    # holds 6 or more and some server (sometimes one of the k closest) is known only to its own
    # half, and a lookup converging from the other half misses it. Ten servers split 5 / 5 by
    # the first key bit keep every bucket within k (a half of 5 leaves at most 4 in any deeper
    # bucket), so the k closest are always reachable.
    halves: tuple[list[Identity], list[Identity]] = ([], [])
    while min(len(h) for h in halves) < k:
        identity = Identity.generate()
        half = halves[node_key(identity.peer_id)[0] >> 7]
        if len(half) < k:
            half.append(identity)
    store_identities = halves[0][:3] + halves[1][:2]
    plain_identities = halves[0][3:] + halves[1][2:]
    everyone = store_identities + plain_identities
    # Inboxes whose R closest store nodes are among the k closest DHT servers (the lookup's
    # answer): a client knowing no store node can then place them from one lookup. At least
    # one inbox has plain DHT servers closest to it, which must never be chosen.
    inboxes: list[bytes] = []
    while len(inboxes) < 5:
        inbox = owner()[1]
        servers = sorted(everyone, key=lambda i: _distance(i, inbox))[:k]
        holders = sorted(store_identities, key=lambda i: _distance(i, inbox))[:REPLICATION]
        plain_first = servers[0] in plain_identities
        if all(h in servers for h in holders) and (plain_first or len(inboxes) < 4):
            inboxes.append(inbox)

    with anyio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            servers_up: list[DhtNode] = []
            for index, identity in enumerate(everyone):
                dht = await stack.enter_async_context(dht_host(identity, config=config))
                if identity in store_identities:
                    db = stack.enter_context(InboxStore(tmp_path / f"node{index}.db"))
                    await stack.enter_async_context(
                        StoreNode(dht.host, db, membership=DhtMembership(dht))
                    )
                servers_up.append(dht)
            first = servers_up[0].host.addrs[0]
            async with anyio.create_task_group() as tg:
                for dht in servers_up[1:]:
                    tg.start_soon(dht.bootstrap, [first])
            await servers_up[0].refresh(force=True)
            async with anyio.create_task_group() as tg:
                for dht in servers_up:
                    tg.start_soon(dht.publish_record)

            client_dht = await stack.enter_async_context(
                dht_host(Identity.generate(), mode=Mode.CLIENT, config=config)
            )
            assert await client_dht.bootstrap([first]) >= 1
            for inbox in inboxes:
                # The lookup converges on the inbox key itself: the k closest servers to it.
                found = [peer for peer, _ in await client_dht.closest_peers(inbox)]
                by_point = sorted(everyone, key=lambda i: _distance(i, inbox))
                assert found == [i.peer_id for i in by_point[:k]]

                fresh = DhtMembership(client_dht)  # knows no store node yet
                chosen = await fresh.nodes_for(inbox, REPLICATION)
                expected = sorted(store_identities, key=lambda i: _distance(i, inbox))
                assert [n.peer_id for n in chosen] == [i.peer_id for i in expected[:REPLICATION]]
                assert not {n.peer_id for n in fresh.store_nodes()} & {
                    i.peer_id for i in plain_identities
                }


# --- the cache, against a stand-in DHT and a fake clock ---------------------------------------


@dataclass
class FakeHost:
    peer_id: PeerId
    protocols: list[str] = field(default_factory=list)
    listen_addrs: list[Multiaddr] = field(default_factory=list)


@dataclass
class FakeDht:
    """What `DhtMembership` uses of a `DhtNode`: records by peer and a fixed neighbourhood."""

    host: FakeHost
    records: dict[PeerId, SignedPeerRecord] = field(default_factory=dict)
    asked: list[PeerId] = field(default_factory=list)

    async def get_closest_peers(self, key: bytes) -> list[tuple[PeerId, list[Multiaddr]]]:
        return [(peer, []) for peer in self.records]

    async def closest_peers(self, point: bytes) -> list[tuple[PeerId, list[Multiaddr]]]:
        return [(peer, []) for peer in self.records]

    async def get_record(self, peer: PeerId) -> SignedPeerRecord | None:
        self.asked.append(peer)
        return self.records.get(peer)

    def routing_table(self) -> list[tuple[PeerId, list[Multiaddr]]]:
        return []


def signed(
    identity: Identity, protocols: list[str], issued_at_ms: int, ttl_s: int
) -> SignedPeerRecord:
    addr = Multiaddr("/ip4/127.0.0.1/udp/4001/quic-v1")
    record = PeerRecord.create(
        identity.peer_id, [addr], protocols, issued_at_ms=issued_at_ms, ttl_s=ttl_s
    )
    return record.sign(identity)


async def test_records_are_cached_for_their_ttl_and_expired_nodes_drop_out() -> None:
    clock = FakeClock()
    store_a, store_b, plain = (Identity.generate() for _ in range(3))
    fake = FakeDht(FakeHost(Identity.generate().peer_id))
    fake.records[store_a.peer_id] = signed(store_a, [PROTOCOL], clock.now_ms, 100)
    fake.records[store_b.peer_id] = signed(store_b, [PROTOCOL], clock.now_ms, 1000)
    fake.records[plain.peer_id] = signed(plain, [KAD_PROTOCOL], clock.now_ms, 1000)
    membership = DhtMembership(cast(DhtNode, fake), negative_ttl_s=60, clock=clock)

    await membership.nodes_for(b"\x00" * 32, REPLICATION)
    assert {n.peer_id for n in membership.store_nodes()} == {store_a.peer_id, store_b.peer_id}
    version = membership.version
    assert len(fake.asked) == 3

    # Within every TTL nobody is asked again.
    await membership.nodes_for(b"\x01" * 32, REPLICATION)
    assert len(fake.asked) == 3

    # Past half of A's record, A is asked again; A's node stopped re-publishing.
    del fake.records[store_a.peer_id]
    clock.advance(51)
    await membership.refresh()
    assert fake.asked[3:] == [store_a.peer_id]
    # Not found is not "gone": A's last record still holds for 49 s.
    assert {n.peer_id for n in membership.store_nodes()} == {store_a.peer_id, store_b.peer_id}
    clock.advance(50)
    await membership.refresh()
    assert [n.peer_id for n in membership.store_nodes()] == [store_b.peer_id]
    assert membership.version > version

    # The plain node's "no" is kept for negative_ttl_s, then asked again.
    asked = len(fake.asked)
    clock.advance(60)
    await membership.refresh()
    assert plain.peer_id in fake.asked[asked:]


async def test_the_number_of_peers_remembered_is_bounded() -> None:
    clock = FakeClock()
    fake = FakeDht(FakeHost(Identity.generate().peer_id, protocols=[PROTOCOL]))
    for _ in range(6):
        identity = Identity.generate()
        fake.records[identity.peer_id] = signed(identity, [PROTOCOL], clock.now_ms, 1000)
    membership = DhtMembership(cast(DhtNode, fake), max_peers=4, clock=clock)
    await membership.refresh()
    nodes = membership.store_nodes()
    # Four remembered, and this node itself (it serves the store protocol).
    assert len(nodes) == 5
    assert fake.host.peer_id in {n.peer_id for n in nodes}


async def test_a_peer_without_a_record_is_asked_again_sooner_than_a_plain_one() -> None:
    clock = FakeClock()
    late, plain = Identity.generate(), Identity.generate()
    fake = FakeDht(FakeHost(Identity.generate().peer_id))
    fake.records[plain.peer_id] = signed(plain, [KAD_PROTOCOL], clock.now_ms, 1000)
    membership = DhtMembership(
        cast(DhtNode, fake), negative_ttl_s=300, missing_ttl_s=5, clock=clock
    )
    # A node that joined the DHT and has yet to publish its record: no record at first.
    await membership.check([late.peer_id, plain.peer_id])
    assert membership.store_nodes() == ()
    fake.records[late.peer_id] = signed(late, [PROTOCOL], clock.now_ms, 1000)
    clock.advance(5)
    asked = len(fake.asked)
    await membership.check([late.peer_id, plain.peer_id])
    assert fake.asked[asked:] == [late.peer_id]  # the plain node's "no" still holds
    assert [n.peer_id for n in membership.store_nodes()] == [late.peer_id]
