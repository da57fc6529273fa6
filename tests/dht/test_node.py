"""DHT nodes on real hosts over loopback QUIC: 3 discovery nodes and 50 peers find each other,
survive a stopped bootstrap node, refuse bad requests while serving others, and come back from
a restart with their table and records."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from teia.dht.core import DhtConfig, Mode
from teia.dht.messages import KAD_PROTOCOL, Message, MessageType, Record, receive_message
from teia.dht.node import DhtNode, DhtTiming
from teia.dht.records import PeerRecord, record_key
from teia.dht.storage import DhtStore
from teia.host.host import Host
from teia.identity import Identity, Multiaddr

pytestmark = pytest.mark.anyio

# Shorter than production so a stopped node costs little, long enough for a loaded CI machine
# running 53 QUIC hosts in one process.
CONFIG = DhtConfig(request_timeout_ms=8_000)
TIMING = DhtTiming(request_timeout_s=8.0, lookup_timeout_s=60.0, max_refreshes=3)
SERVERS = 3
PEERS = 50
CLIENTS = 10  # of the peers, in client mode (reachable only through their records)


# A dead node is found out by request timeouts; with a dozen nodes a short one suffices.
SMALL_CONFIG = DhtConfig(request_timeout_ms=2_000)
SMALL_TIMING = DhtTiming(request_timeout_s=2.0, lookup_timeout_s=30.0)


@contextlib.asynccontextmanager
async def running_node(
    identity: Identity | None = None,
    *,
    mode: Mode = Mode.SERVER,
    store: DhtStore | None = None,
    small: bool = False,
) -> AsyncIterator[DhtNode]:
    config, timing = (SMALL_CONFIG, SMALL_TIMING) if small else (CONFIG, TIMING)
    async with (
        Host(identity or Identity.generate(), idle_timeout=120.0) as host,
        DhtNode(host, mode=mode, config=config, timing=timing, store=store) as node,
    ):
        yield node


def dial_addr(node: DhtNode) -> Multiaddr:
    return node.host.addrs[0]


async def start_servers(
    stack: contextlib.AsyncExitStack, count: int, *, small: bool = False
) -> list[DhtNode]:
    servers = [await stack.enter_async_context(running_node(small=small)) for _ in range(count)]
    for server in servers:
        others = [dial_addr(s) for s in servers if s is not server]
        await server.bootstrap(others)
    return servers


async def join(node: DhtNode, bootstrap: list[Multiaddr]) -> None:
    assert await node.bootstrap(bootstrap) >= 1
    assert await node.publish_record() >= 1


async def test_three_discovery_nodes_and_fifty_peers_find_each_other() -> None:
    with anyio.fail_after(240):
        async with contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, SERVERS)
            bootstrap = [dial_addr(s) for s in servers]
            peers = [
                await stack.enter_async_context(
                    running_node(mode=Mode.CLIENT if i >= PEERS - CLIENTS else Mode.SERVER)
                )
                for i in range(PEERS)
            ]
            # Ten at a time: handshakes of all 50 at once would only measure the CPU.
            for batch in range(0, PEERS, 10):
                async with anyio.create_task_group() as tg:
                    for peer in peers[batch : batch + 10]:
                        tg.start_soon(join, peer, bootstrap)
            # The servers' tables hold every server-mode peer, never a client.
            for server in servers:
                known = {p for p, _ in server.routing_table()}
                assert all(p.host.peer_id not in known for p in peers[PEERS - CLIENTS :])

            missing: list[tuple[int, int]] = []
            limiter = anyio.Semaphore(25)

            async def find(i: int, j: int) -> None:
                async with limiter:
                    addrs = await peers[i].find_peer(peers[j].host.peer_id)
                if peers[j].host.listen_addrs[0] not in addrs:
                    missing.append((i, j))

            async with anyio.create_task_group() as tg:
                for i in range(PEERS):
                    for j in range(PEERS):
                        if i != j:
                            tg.start_soon(find, i, j)
            assert missing == [], (len(missing), missing[:10])
            lookups = sum(p.metrics.lookups for p in peers)
            assert lookups > 0


async def run_until(
    stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[DhtNode] = anyio.TASK_STATUS_IGNORED
) -> None:
    """A node in its own task, so that it can stop while nodes started later run on."""
    async with running_node(small=True) as node:
        task_status.started(node)
        await stop.wait()


async def test_joining_and_lookups_work_with_one_bootstrap_node_stopped() -> None:
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg, contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, 2, small=True)
            stop = anyio.Event()
            doomed: DhtNode = await tg.start(run_until, stop)
            await doomed.bootstrap([dial_addr(s) for s in servers])
            bootstrap = [dial_addr(doomed)] + [dial_addr(s) for s in servers]
            early = [await stack.enter_async_context(running_node(small=True)) for _ in range(8)]
            async with anyio.create_task_group() as joins:
                for peer in early:
                    joins.start_soon(join, peer, bootstrap)
            stop.set()
            # The first bootstrap node is gone; newcomers still list it first.
            late = [
                await stack.enter_async_context(running_node(mode=mode, small=True))
                for mode in (Mode.SERVER, Mode.CLIENT, Mode.SERVER, Mode.CLIENT)
            ]

            async def join_late(peer: DhtNode) -> None:
                assert await peer.bootstrap(bootstrap) == 2
                assert await peer.publish_record() >= 1

            async with anyio.create_task_group() as joins:
                for peer in late:
                    joins.start_soon(join_late, peer)
            everyone = early + late
            missing: list[tuple[int, int]] = []

            async def find(i: int, j: int) -> None:
                addrs = await everyone[i].find_peer(everyone[j].host.peer_id)
                if everyone[j].host.listen_addrs[0] not in addrs:
                    missing.append((i, j))

            async with anyio.create_task_group() as finds:
                for i in range(len(everyone)):
                    for j in range(len(everyone)):
                        if i != j:
                            finds.start_soon(find, i, j)
            assert missing == []
            assert await late[0].find_peer(doomed.host.peer_id) in (
                [],
                [doomed.host.listen_addrs[0]],
            )


async def test_bad_requests_are_refused_and_the_node_keeps_serving() -> None:
    with anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, 2)
            target = servers[0]
            attacker = await stack.enter_async_context(running_node(mode=Mode.CLIENT))
            honest = await stack.enter_async_context(running_node(mode=Mode.CLIENT))
            for node in (attacker, honest):
                await node.bootstrap([dial_addr(target)])
            peer = target.host.peer_id

            async def raw(data: bytes) -> bytes | None:
                stream = await attacker.host.open_stream(peer, KAD_PROTOCOL)
                try:
                    await stream.send(data)
                    return await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, Exception):
                    return None
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()

            # Malformed protobuf, an oversize length prefix, and a forged record.
            assert await raw(b"\x05\xff\xff\xff\xff\xff") is None
            assert await raw(b"\xff\xff\xff\xff\x0f") is None
            victim = Identity.generate()
            record = PeerRecord.create(victim.peer_id, [dial_addr(honest)]).sign(victim)
            forged = bytearray(record.envelope)
            forged[-1] ^= 1
            key = record_key(victim.peer_id)
            with pytest.raises(Exception):  # noqa: B017, PT011 - the stream is reset
                await attacker.request(
                    peer,
                    Message(MessageType.PUT_VALUE, key=key, record=Record(key, bytes(forged))),
                )
            assert target.stored_records == 0
            assert target.metrics.refused["malformed"] >= 2
            assert target.metrics.refused["bad-signature"] == 1
            # Everyone else is still served, on the same node.
            answer = await honest.request(peer, Message(MessageType.FIND_NODE, key=b"x" * 34))
            assert answer.closer_peers
            assert await honest.find_peer(servers[1].host.peer_id)
            # A real record is accepted.
            stored = await honest.request(
                peer,
                Message(MessageType.PUT_VALUE, key=key, record=Record(key, record.envelope)),
            )
            assert stored.type is MessageType.PUT_VALUE
            assert target.stored_records == 1
            # Several requests on one stream are answered in turn.
            stream = await honest.host.open_stream(peer, KAD_PROTOCOL)
            try:
                for _ in range(3):
                    await stream.send_message(Message(MessageType.PING).encode())
                    assert (await receive_message(stream)).type is MessageType.PING
            finally:
                await stream.aclose()


async def test_a_restarted_node_comes_back_with_its_table_and_records(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, 3)
            identity = Identity.generate()
            with DhtStore(tmp_path / "dht.sqlite") as store:
                async with running_node(identity, store=store) as node:
                    await join(node, [dial_addr(servers[0])])
                    table = {p for p, _ in node.routing_table()}
                    assert table >= {s.host.peer_id for s in servers}
                    assert node.stored_records >= 1
            with DhtStore(tmp_path / "dht.sqlite") as store:
                async with running_node(identity, store=store) as node:
                    assert {p for p, _ in node.routing_table()} == table
                    assert node.stored_records >= 1
                    # It can look peers up at once, without bootstrapping again.
                    assert await node.find_peer(servers[2].host.peer_id)
