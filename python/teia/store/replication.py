"""The replicated view of the store: `ReplicatedStoreClient`.

Each inbox lives on the R store nodes closest to it (`responsible_nodes`). A deposit goes to
all R and succeeds when W of them committed it (default R = 3, W = 2); a fetch reads every
reachable responsible node and merges by message ID; acks and deletes go to every reachable
responsible node, and the nodes spread them further as tombstones during anti-entropy.

A node that fails (connection refused, timed out, stream broken) is skipped for
``retry_after`` seconds, so a dead node costs one timeout, not one per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

from teia.errors import (
    InvalidStoreMessage,
    StoreAuthError,
    StoreError,
    StoreQuotaExceeded,
    StoreRequestRefused,
    StoreUnavailable,
    TransportError,
)
from teia.host.peerstore import CONNECTED_TTL
from teia.identity import Identity, PeerId
from teia.store.auth import inbox_for
from teia.store.client import BundleAnswer, StoreClient
from teia.store.membership import StoreMembership, StoreNodeInfo, responsible_nodes
from teia.store.messages import MAX_DEPOSIT_ENVELOPES, Envelope, Status

__all__ = ["ReplicatedStoreClient"]

T = TypeVar("T")

_NODE_FAILURES = (
    InvalidStoreMessage,
    TransportError,
    OSError,
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.IncompleteRead,
)
_BATCH_BYTES = 1024 * 1024


class ReplicatedStoreClient:
    """Deposit, fetch, ack and bundles across the R nodes responsible for each inbox."""

    def __init__(
        self,
        client: StoreClient,
        membership: StoreMembership,
        *,
        replication: int = 3,
        write_quorum: int = 2,
        retry_after: float = 30.0,
    ) -> None:
        if not 1 <= write_quorum <= replication:
            raise ValueError("write_quorum must be between 1 and the replication factor")
        self.client = client
        self.membership = membership
        self.replication = replication
        self.write_quorum = write_quorum
        self.retry_after = retry_after
        self._down_until: dict[PeerId, float] = {}
        self._version = membership.version

    def nodes_for(self, inbox: bytes) -> list[StoreNodeInfo]:
        """The nodes responsible for ``inbox``, closest first."""
        return responsible_nodes(inbox, self.membership.store_nodes(), self.replication)

    def _usable(self, node: StoreNodeInfo) -> bool:
        if self.membership.version != self._version:
            # The membership changed (a node joined, left or came back): try everyone again.
            self._version = self.membership.version
            self._down_until.clear()
        return self._down_until.get(node.peer_id, 0.0) <= anyio.current_time()

    async def _on_node(
        self, node: StoreNodeInfo, call: Callable[[PeerId], Awaitable[T]]
    ) -> T | None:
        """``call`` on one node; None (and the node set aside a while) if it failed."""
        if not self._usable(node):
            return None
        host = self.client.host
        try:
            if not host.is_connected(node.peer_id):
                if node.addrs:
                    host.peerstore.add(
                        node.peer_id, node.addrs, ttl=CONNECTED_TTL, now=anyio.current_time()
                    )
                with anyio.fail_after(self.client.timeout):
                    await host.connect(node.peer_id)
            return await call(node.peer_id)
        except _NODE_FAILURES:
            self._down_until[node.peer_id] = anyio.current_time() + self.retry_after
            self.client.forget(node.peer_id)
            return None

    # --- deposits ---------------------------------------------------------------------------

    async def deposit(self, envelopes: Sequence[Envelope]) -> dict[bytes, int]:
        """Deposit on every responsible node; returns the acknowledgements per message ID.

        Raises `StoreQuotaExceeded` or `StoreUnavailable` if an envelope reached fewer than W
        nodes (the others may still have stored it; depositing again is harmless: duplicates
        are recognised by message ID).
        """
        per_node: dict[PeerId, tuple[StoreNodeInfo, list[Envelope]]] = {}
        for env in envelopes:
            for node in self.nodes_for(env.inbox):
                per_node.setdefault(node.peer_id, (node, []))[1].append(env)
        acks = {env.message_id: 0 for env in envelopes}
        refusals: dict[bytes, Status] = {}

        async def to_node(node: StoreNodeInfo, items: list[Envelope]) -> None:
            for batch in _batches(items):

                async def send(peer: PeerId, batch: list[Envelope] = batch) -> list[Status]:
                    return await self.client.deposit(peer, batch)

                try:
                    results = await self._on_node(node, send)
                except StoreRequestRefused as exc:
                    for env in batch:
                        refusals[env.message_id] = Status(exc.status)
                    continue
                if results is None:
                    return
                for env, result in zip(batch, results, strict=True):
                    if result.stored:
                        acks[env.message_id] += 1
                    else:
                        refusals[env.message_id] = result

        async with anyio.create_task_group() as tg:
            for node, items in per_node.values():
                tg.start_soon(to_node, node, items)
        short = [m for m, count in acks.items() if count < self.write_quorum]
        if short:
            reasons = {refusals[m] for m in short if m in refusals}
            text = (
                f"{len(short)} of {len(acks)} envelopes reached fewer than "
                f"{self.write_quorum} store nodes"
            )
            if reasons & {Status.INBOX_FULL, Status.STORE_FULL}:
                raise StoreQuotaExceeded(text + " (quota exceeded)", int(Status.INBOX_FULL))
            raise StoreUnavailable(
                text
                + (f" (refused: {', '.join(sorted(r.name for r in reasons))})" if reasons else "")
            )
        return acks

    # --- the owner's side -------------------------------------------------------------------

    async def fetch_all(self, owner: Identity) -> list[Envelope]:
        """Every envelope for the owner on the reachable responsible nodes, each message ID
        once, ordered by the senders' timestamps. `StoreUnavailable` if no node answered."""
        inbox = inbox_for(owner.public_key)
        merged: dict[bytes, Envelope] = {}
        answered = 0

        async def from_node(node: StoreNodeInfo) -> None:
            nonlocal answered

            async def fetch(peer: PeerId) -> list[Envelope]:
                return await self.client.fetch_all(peer, owner)

            found = await self._on_node(node, fetch)
            if found is None:
                return
            answered += 1
            for env in found:
                merged.setdefault(env.message_id, env)

        async with anyio.create_task_group() as tg:
            for node in self.nodes_for(inbox):
                tg.start_soon(from_node, node)
        if not answered:
            raise StoreUnavailable("no store node responsible for this inbox answered")
        return sorted(merged.values(), key=lambda e: (e.timestamp_ms, e.message_id))

    async def ack(self, owner: Identity, message_ids: Sequence[bytes]) -> int:
        """Acknowledge on every reachable responsible node; returns how many took it.
        `StoreUnavailable` if none did."""
        return await self._remove(owner, message_ids, delete=False)

    async def delete(self, owner: Identity, message_ids: Sequence[bytes]) -> int:
        """Delete unread on every reachable responsible node (see `ack`)."""
        return await self._remove(owner, message_ids, delete=True)

    async def _remove(self, owner: Identity, message_ids: Sequence[bytes], *, delete: bool) -> int:
        inbox = inbox_for(owner.public_key)
        done = 0
        errors: list[StoreError] = []

        async def on_node(node: StoreNodeInfo) -> None:
            nonlocal done

            async def remove(peer: PeerId) -> bool:
                if delete:
                    await self.client.delete(peer, owner, message_ids)
                else:
                    await self.client.ack(peer, owner, message_ids)
                return True

            try:
                if await self._on_node(node, remove):
                    done += 1
            except StoreRequestRefused as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for node in self.nodes_for(inbox):
                tg.start_soon(on_node, node)
        if not done:
            if errors and all(isinstance(e, StoreAuthError) for e in errors):
                raise errors[0]
            raise StoreUnavailable("no store node responsible for this inbox took the ack")
        return done

    # --- prekey bundles ---------------------------------------------------------------------

    async def put_bundle(
        self, owner: Identity, bundle: bytes, one_time_prekeys: Sequence[bytes] = ()
    ) -> int:
        """Upload the bundle to every responsible node, each one-time prekey to exactly one of
        them (so none is handed out twice). Returns the nodes that took it."""
        inbox = inbox_for(owner.public_key)
        nodes = [node for node in self.nodes_for(inbox) if self._usable(node)] or self.nodes_for(
            inbox
        )
        shares: list[list[bytes]] = [[] for _ in nodes]
        for index, key in enumerate(one_time_prekeys):
            shares[index % len(nodes)].append(key)
        done = 0

        async def on_node(node: StoreNodeInfo, keys: list[bytes]) -> None:
            nonlocal done

            async def put(peer: PeerId) -> int:
                held = 0
                for start in range(0, max(1, len(keys)), 100):
                    held = await self.client.put_bundle(
                        peer, owner, bundle, keys[start : start + 100], replace=start == 0
                    )
                return held

            if await self._on_node(node, put) is not None:
                done += 1

        async with anyio.create_task_group() as tg:
            for node, keys in zip(nodes, shares, strict=True):
                tg.start_soon(on_node, node, keys)
        if not done:
            raise StoreUnavailable("no store node responsible for this inbox took the bundle")
        return done

    async def get_bundle(self, inbox: bytes) -> BundleAnswer | None:
        """A bundle with a one-time prekey if any responsible node still has one; else the
        bundle alone; None if no node holds a bundle."""
        fallback: BundleAnswer | None = None
        for node in self.nodes_for(inbox):

            async def get(peer: PeerId) -> BundleAnswer | None:
                return await self.client.get_bundle(peer, inbox)

            answer = await self._on_node(node, get)
            if answer is None:
                continue
            if answer.one_time_prekey:
                return answer
            fallback = fallback or answer
        return fallback


def _batches(items: list[Envelope]) -> list[list[Envelope]]:
    out: list[list[Envelope]] = []
    batch: list[Envelope] = []
    size = 0
    for env in items:
        if batch and (
            len(batch) >= MAX_DEPOSIT_ENVELOPES or size + len(env.payload) > _BATCH_BYTES
        ):
            out.append(batch)
            batch, size = [], 0
        batch.append(env)
        size += len(env.payload)
    if batch:
        out.append(batch)
    return out
