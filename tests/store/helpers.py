"""Helpers for the store tests: store nodes on loopback, clients, and a controllable clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from teia.host.host import Host
from teia.identity import Identity
from teia.store import (
    Envelope,
    InboxStore,
    StaticMembership,
    StoreClient,
    StoreLimits,
    StoreNode,
    StoreNodeInfo,
    StoreSettings,
    inbox_for,
)
from teia.store.client import wall_clock_ms

LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"
DAY_MS = 86_400_000


class FakeClock:
    """Wall-clock milliseconds that move only when a test says so."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def envelope(inbox: bytes, payload: bytes = b"sealed", *, ttl_s: int = 0) -> Envelope:
    return Envelope(inbox, os.urandom(16), payload, 1_800_000_000_000, ttl_s)


def owner() -> tuple[Identity, bytes]:
    identity = Identity.generate()
    return identity, inbox_for(identity.public_key)


# Settings for tests: no background loops (tests run purges and anti-entropy explicitly) and
# rate limits far above what a test sends unless a test asks for them.
TEST_SETTINGS = StoreSettings(
    deposit_rate=1e6,
    deposit_burst=1e6,
    request_rate=1e6,
    request_burst=1e6,
    purge_interval=0,
    anti_entropy_interval=0,
    sync_timeout=3.0,
)


@dataclass
class RunningNode:
    """A store node running in its own cancel scope, so a test can kill it alone."""

    data_dir: Path
    identity: Identity
    node: StoreNode | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stopped: anyio.Event = field(default_factory=anyio.Event)

    @property
    def info(self) -> StoreNodeInfo:
        assert self.node is not None
        return StoreNodeInfo(self.identity.peer_id, tuple(self.node.host.listen_addrs))

    async def stop(self) -> None:
        self.scope.cancel()
        with anyio.fail_after(10):
            await self.stopped.wait()


async def _run_node(
    running: RunningNode,
    membership: StaticMembership | None,
    settings: StoreSettings,
    clock: Callable[[], int],
    limits: StoreLimits | None,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with running.scope:
            listen = f"/ip4/127.0.0.1/udp/{port}/quic-v1"
            with InboxStore(running.data_dir / "store.db", limits=limits) as store:
                async with (
                    Host(running.identity, listen=[listen], dial_timeout=2.0) as host,
                    StoreNode(
                        host, store, membership=membership, settings=settings, clock=clock
                    ) as node,
                ):
                    running.node = node
                    task_status.started()
                    await anyio.sleep_forever()
    finally:
        running.stopped.set()


@asynccontextmanager
async def node_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def start_node(
    tg: anyio.abc.TaskGroup,
    data_dir: Path,
    *,
    identity: Identity | None = None,
    membership: StaticMembership | None = None,
    settings: StoreSettings = TEST_SETTINGS,
    clock: Callable[[], int] | None = None,
    limits: StoreLimits | None = None,
    port: int = 0,
) -> RunningNode:
    running = RunningNode(data_dir, identity or Identity.generate())
    await tg.start(_run_node, running, membership, settings, clock or wall_clock_ms, limits, port)
    return running


@asynccontextmanager
async def client_host(
    clock: Callable[[], int] | None = None,
) -> AsyncIterator[tuple[Host, StoreClient]]:
    async with Host(Identity.generate(), listen=[LOOPBACK], dial_timeout=2.0) as host:
        client = StoreClient(host, timeout=3.0, clock=clock or wall_clock_ms)
        try:
            yield host, client
        finally:
            await client.aclose()
