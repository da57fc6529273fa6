"""Operator nodes for the peer tests, on loopback: store nodes, a discovery node, a relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from teia.dht.node import DhtNode
from teia.host.host import Host
from teia.identity import Identity, Multiaddr
from teia.relay.client import RelayClientConfig
from teia.relay.service import RelayConfig, build_server
from teia.store import InboxStore, StaticMembership, StoreNode, StoreNodeInfo, StoreSettings

from .conftest import free_udp_port

STORE_SETTINGS = StoreSettings(
    deposit_rate=1e6,
    deposit_burst=1e6,
    request_rate=1e6,
    request_burst=1e6,
    purge_interval=0,
    anti_entropy_interval=0,
    sync_timeout=3.0,
)
RELAY_SECRET = "peer-tests-relay-secret"


@asynccontextmanager
async def store_nodes(tmp_path: Path, count: int = 3) -> AsyncIterator[list[str]]:
    """``count`` store nodes that know each other; yields their ``…/p2p/<id>`` addresses."""
    identities = [Identity.generate() for _ in range(count)]
    ports = [free_udp_port() for _ in range(count)]
    infos = [
        StoreNodeInfo(i.peer_id, (Multiaddr(f"/ip4/127.0.0.1/udp/{p}/quic-v1"),))
        for i, p in zip(identities, ports, strict=True)
    ]
    membership = StaticMembership(infos)
    async with AsyncExitStack() as stack:
        for index, (identity, port) in enumerate(zip(identities, ports, strict=True)):
            store = stack.enter_context(InboxStore(tmp_path / f"store{index}.db"))
            host = await stack.enter_async_context(
                Host(identity, listen=[f"/ip4/127.0.0.1/udp/{port}/quic-v1"], dial_timeout=2.0)
            )
            await stack.enter_async_context(
                StoreNode(host, store, membership=membership, settings=STORE_SETTINGS)
            )
        yield [
            f"/ip4/127.0.0.1/udp/{p}/quic-v1/p2p/{i.peer_id}"
            for i, p in zip(identities, ports, strict=True)
        ]


@asynccontextmanager
async def discovery_node() -> AsyncIterator[str]:
    """A DHT server; yields its ``…/p2p/<id>`` address for ``bootstrap``."""
    async with (
        Host(Identity.generate(), idle_timeout=120.0) as host,
        DhtNode(host) as _node,
    ):
        yield str(host.addrs[0])


@asynccontextmanager
async def relay_server(tmp_path: Path) -> AsyncIterator[tuple[Any, dict[str, object]]]:
    """A TURN relay; yields the server (for its data-plane counters) and the relay table a
    profile's ``relays`` setting takes."""
    # On its own loopback address: a connection from the relay's IP then really is relayed
    # (with everything on 127.0.0.1 every connection would look relayed to the peers).
    config = RelayConfig(
        listen="127.0.0.2:0",
        realm="teia.test",
        auth_secret=RELAY_SECRET,
        allow_peer=["127.0.0.0/8"],
        data_dir=tmp_path / "relay",
        tcp=False,
    )
    async with build_server(config) as server:
        table: dict[str, object] = {
            "address": f"127.0.0.2:{server.port}",
            "rest_secret": RELAY_SECRET,
            "keepalive": 0.5,
            "rto": 0.2,
        }
        RelayClientConfig(**table)  # type: ignore[arg-type]
        yield server, table


@asynccontextmanager
async def relay(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """A TURN relay; yields the relay table a profile's ``relays`` setting takes."""
    async with relay_server(tmp_path) as (_, table):
        yield table
