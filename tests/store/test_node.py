"""A store node on loopback: the protocol through StoreClient, access rules, limits, expiry,
restarts, bundles, and hostile frames that leave other clients unaffected."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import anyio
import pytest

from teia.errors import StoreAuthError, StoreRateLimited, StoreRequestRefused
from teia.host.protobuf import encode_uvarint
from teia.identity import Identity
from teia.store import StoreClient, StoreLimits
from teia.store.auth import sign_request
from teia.store.messages import (
    MAX_PAYLOAD,
    MAX_REQUEST_SIZE,
    PROTOCOL,
    AckRequest,
    DeleteRequest,
    FetchRequest,
    PutBundleRequest,
    Status,
    SyncDigestsRequest,
    decode_response,
)

from .helpers import (
    DAY_MS,
    TEST_SETTINGS,
    FakeClock,
    client_host,
    envelope,
    node_group,
    owner,
    start_node,
)

TIMEOUT = 30


def metric(node: object, name: str, labels: dict[str, str] | None = None) -> float:
    value = node.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]
    return float(value or 0.0)


@pytest.mark.anyio
async def test_deposit_fetch_ack_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            running = await start_node(tg, tmp_path, clock=clock)
            node = running.node
            assert node is not None
            await host.connect(node.host.addrs[0])
            owners = [owner() for _ in range(3)]
            sent: dict[bytes, set[bytes]] = {}
            for _, inbox in owners:
                items = [envelope(inbox, os.urandom(100)) for _ in range(120)]
                sent[inbox] = {e.message_id for e in items}
                for start in range(0, 120, 50):
                    results = await client.deposit(node.peer_id, items[start : start + 50])
                    assert results == [Status.OK] * len(items[start : start + 50])
            for identity, inbox in owners:
                got: list[bytes] = []
                cursor = b""
                for _ in range(10):
                    page = await client.fetch(node.peer_id, identity, cursor, limit=50)
                    got += [e.message_id for e in page.envelopes]
                    cursor = page.cursor
                    if not page.more:
                        break
                assert len(got) == len(set(got)) == 120
                assert set(got) == sent[inbox]
                await client.ack(node.peer_id, identity, got)
                assert (await client.fetch(node.peer_id, identity)).envelopes == ()
            # Depositing an acknowledged ID again stores nothing (its tombstone stands).
            identity, inbox = owners[0]
            again = dataclasses.replace(envelope(inbox), message_id=next(iter(sent[inbox])))
            assert await client.deposit(node.peer_id, [again]) == [Status.GONE]
            assert metric(node, "teia_store_envelopes_stored_total") == 360
            assert metric(node, "teia_store_envelopes_delivered_total") == 360
            assert metric(node, "teia_store_envelopes") == 0
            assert metric(node, "teia_store_bytes_stored_total") == 36_000


@pytest.mark.anyio
async def test_forged_replayed_and_expired_signatures(tmp_path: Path) -> None:
    clock = FakeClock()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            node = (await start_node(tg, tmp_path, clock=clock)).node
            assert node is not None
            await host.connect(node.host.addrs[0])
            alice, inbox = owner()
            mallory = Identity.generate()
            items = [envelope(inbox) for _ in range(5)]
            await client.deposit(node.peer_id, items)
            ids = tuple(e.message_id for e in items)
            for request in (FetchRequest(inbox), AckRequest(inbox, ids), DeleteRequest(inbox, ids)):
                # Mallory signs with her key for Alice's inbox.
                forged = sign_request(mallory, request, clock())  # type: ignore[arg-type]
                response = await client.exchange(node.peer_id, forged)
                assert response.status == Status.UNAUTHORIZED
                assert "does not hash" in response.error
                # Alice's key and Mallory's signature.
                good = sign_request(alice, request, clock())  # type: ignore[arg-type]
                assert good.auth is not None
                assert forged.auth is not None
                bad = dataclasses.replace(
                    good, auth=dataclasses.replace(good.auth, signature=forged.auth.signature)
                )
                response = await client.exchange(node.peer_id, bad)
                assert response.status == Status.UNAUTHORIZED
                # Too old, too new.
                for skew in (-61, 61):
                    stale = sign_request(alice, request, clock() + skew * 1000)  # type: ignore[arg-type]
                    response = await client.exchange(node.peer_id, stale)
                    assert response.status == Status.AUTH_EXPIRED
                    assert "clock" in response.error
            # A replay of a good fetch is refused; the typed error says so.
            fetch = sign_request(alice, FetchRequest(inbox), clock())
            assert len((await client.exchange(node.peer_id, fetch)).envelopes) == 5
            response = await client.exchange(node.peer_id, fetch)
            assert response.status == Status.REPLAYED
            # Through the client, a refusal is a typed error.
            stale_client = StoreClient(host, clock=lambda: clock() - 120_000)
            with pytest.raises(StoreAuthError, match="AUTH_EXPIRED"):
                await stale_client.fetch(node.peer_id, alice)
            await stale_client.aclose()
            # Nothing was lost to any of that.
            page = await client.fetch(node.peer_id, alice)
            assert {e.message_id for e in page.envelopes} == set(ids)
            labels = {"kind": "ack", "status": "UNAUTHORIZED"}
            assert metric(node, "teia_store_requests_total", labels) == 2


@pytest.mark.anyio
async def test_malformed_and_oversize_frames_leave_others_unaffected(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            node_group() as tg,
            client_host() as (bad_host, bad),
            client_host() as (good_host, good),
        ):
            node = (await start_node(tg, tmp_path)).node
            assert node is not None
            await bad_host.connect(node.host.addrs[0])
            await good_host.connect(node.host.addrs[0])
            alice, inbox = owner()
            first = [envelope(inbox) for _ in range(10)]
            assert await good.deposit(node.peer_id, first) == [Status.OK] * 10
            for garbage in (b"", b"\xff" * 20, b"\x0a\x05abc", os.urandom(300)):
                response = await bad.exchange_raw(node.peer_id, garbage)
                assert response.status == Status.BAD_REQUEST
                assert response.error  # says what was wrong
            # An oversize frame: the node answers TOO_LARGE and closes that stream only.
            stream = await bad_host.open_stream(node.peer_id, PROTOCOL)
            await stream.send(encode_uvarint(MAX_REQUEST_SIZE + 1) + b"\x00" * 1000)
            answer = decode_response(await stream.receive_message())
            assert answer.status == Status.TOO_LARGE
            assert "over" in answer.error
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive_message()
            await stream.aclose()
            # A stream that sends half a frame and stops ties up only itself.
            stuck = await bad_host.open_stream(node.peer_id, PROTOCOL)
            await stuck.send(encode_uvarint(500) + b"\x01" * 10)

            second = [envelope(inbox) for _ in range(10)]
            assert await good.deposit(node.peer_id, second) == [Status.OK] * 10
            page = await good.fetch(node.peer_id, alice)
            assert {e.message_id for e in page.envelopes} == {e.message_id for e in first + second}
            # The misbehaving client can still talk properly afterwards.
            assert await bad.deposit(node.peer_id, [envelope(inbox)]) == [Status.OK]
            await stuck.aclose()


@pytest.mark.anyio
async def test_rate_limit_per_source_and_quota(tmp_path: Path) -> None:
    settings = dataclasses.replace(TEST_SETTINGS, deposit_rate=0.001, deposit_burst=20)
    limits = StoreLimits(max_inbox_envelopes=5)
    with anyio.fail_after(TIMEOUT):
        async with (
            node_group() as tg,
            client_host() as (host_a, a),
            client_host() as (host_b, b),
        ):
            node = (await start_node(tg, tmp_path, settings=settings, limits=limits)).node
            assert node is not None
            await host_a.connect(node.host.addrs[0])
            await host_b.connect(node.host.addrs[0])
            _, inbox = owner()
            results = await a.deposit(node.peer_id, [envelope(inbox) for _ in range(8)])
            assert results == [Status.OK] * 5 + [Status.INBOX_FULL] * 3
            _, other = owner()
            await a.deposit(node.peer_id, [envelope(other) for _ in range(5)])
            with pytest.raises(StoreRateLimited, match="too many deposits"):
                await a.deposit(node.peer_id, [envelope(other) for _ in range(10)])
            # Another source peer has its own bucket.
            _, third = owner()
            assert await b.deposit(node.peer_id, [envelope(third)]) == [Status.OK]
            assert metric(node, "teia_store_deposits_refused_total", {"reason": "inbox_full"}) == 3


@pytest.mark.anyio
async def test_concurrent_deposits_are_coalesced_and_each_caller_gets_its_results(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (host, _):
            node = (await start_node(tg, tmp_path)).node
            assert node is not None
            await host.connect(node.host.addrs[0])
            client = StoreClient(host, timeout=5.0, max_deposits_in_flight=1)
            _, inbox = owner()
            items = [envelope(inbox, os.urandom(40)) for _ in range(300)]
            bad = dataclasses.replace(envelope(inbox), payload=b"x" * (MAX_PAYLOAD + 1))
            got: dict[int, list[Status]] = {}
            refused: list[Exception] = []

            async def one(index: int) -> None:
                got[index] = await client.deposit(node.peer_id, [items[index]])

            async def malformed() -> None:
                try:
                    await client.deposit(node.peer_id, [bad])
                except StoreRequestRefused as exc:
                    refused.append(exc)

            try:
                async with anyio.create_task_group() as callers:
                    for index in range(len(items)):
                        callers.start_soon(one, index)
                    callers.start_soon(malformed)
                # A duplicate in a coalesced request is that caller's own result.
                assert await client.deposit(node.peer_id, [items[0]]) == [Status.DUPLICATE]
            finally:
                await client.aclose()
            assert got == {index: [Status.OK] for index in range(len(items))}
            # The malformed deposit went alone: refused, nobody else's with it.
            assert len(refused) == 1
            assert refused[0].status == Status.BAD_REQUEST
            assert node.store.usage(inbox)[0] == len(items)
            requests = metric(
                node, "teia_store_requests_total", {"kind": "deposit", "status": "OK"}
            )
            # One request in flight at a time: the callers waiting meanwhile left together
            # (at most 256 envelopes a request).
            assert 2 <= requests <= 10


@pytest.mark.anyio
async def test_ttl_expiry_with_a_controllable_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            node = (await start_node(tg, tmp_path, clock=clock)).node
            assert node is not None
            await host.connect(node.host.addrs[0])
            alice, inbox = owner()
            short = envelope(inbox, ttl_s=1)  # clamped up to the 7-day minimum
            default = envelope(inbox)  # 14 days
            too_long = envelope(inbox, ttl_s=90 * 86_400)  # clamped down to 14 days
            await client.deposit(node.peer_id, [short, default, too_long])
            clock.advance(7 * 86_400 - 1)
            page = await client.fetch(node.peer_id, alice)
            assert len(page.envelopes) == 3
            clock.advance(2)
            page = await client.fetch(node.peer_id, alice)
            left = {e.message_id for e in page.envelopes}
            assert left == {default.message_id, too_long.message_id}
            assert await node.purge_expired() == (1, 0)
            clock.advance(7 * 86_400)
            assert (await client.fetch(node.peer_id, alice)).envelopes == ()
            assert await node.purge_expired() == (2, 0)
            assert metric(node, "teia_store_envelopes_expired_total") == 3
            assert clock() > 1_800_000_000_000 + 14 * DAY_MS


@pytest.mark.anyio
async def test_restart_keeps_envelopes_and_tombstones(tmp_path: Path) -> None:
    clock = FakeClock()
    identity = Identity.generate()
    alice, inbox = owner()
    items = [envelope(inbox, os.urandom(50)) for _ in range(30)]
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            running = await start_node(tg, tmp_path, identity=identity, clock=clock)
            assert running.node is not None
            addr = running.node.host.addrs[0]
            await host.connect(addr)
            await client.deposit(identity.peer_id, items)
            await client.ack(identity.peer_id, alice, [items[0].message_id])
            await running.stop()
        clock.advance(1)
        async with node_group() as tg, client_host(clock) as (host, client):
            running = await start_node(tg, tmp_path, identity=identity, clock=clock)
            assert running.node is not None
            await host.connect(running.node.host.addrs[0])
            got = await client.fetch_all(identity.peer_id, alice)
            assert [e.message_id for e in got] == [e.message_id for e in items[1:]]
            assert [e.payload for e in got] == [e.payload for e in items[1:]]
            assert await client.deposit(identity.peer_id, [items[0]]) == [Status.GONE]


@pytest.mark.anyio
async def test_replays_are_refused_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    identity = Identity.generate()
    alice, inbox = owner()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            running = await start_node(tg, tmp_path, identity=identity, clock=clock)
            assert running.node is not None
            await host.connect(running.node.host.addrs[0])
            await client.deposit(identity.peer_id, [envelope(inbox)])
            used = sign_request(alice, FetchRequest(inbox), clock())
            assert len((await client.exchange(identity.peer_id, used)).envelopes) == 1
            # Signed just before the restart, sent after it.
            clock.advance(3)
            unsent = sign_request(alice, FetchRequest(inbox), clock())
            await running.stop()
        clock.advance(2)
        async with node_group() as tg, client_host(clock) as (host, client):
            running = await start_node(tg, tmp_path, identity=identity, clock=clock)
            node = running.node
            assert node is not None
            await host.connect(node.host.addrs[0])
            response = await client.exchange(identity.peer_id, used)
            assert response.status == Status.REPLAYED
            assert response.envelopes == ()
            assert len((await client.exchange(identity.peer_id, unsent)).envelopes) == 1
            assert (await client.exchange(identity.peer_id, unsent)).status == Status.REPLAYED
            assert len((await client.fetch(identity.peer_id, alice)).envelopes) == 1
            assert node.store.nonce_count == 3
            # Once out of the window, the nonces are purged with the expired envelopes.
            clock.advance(61)
            await node.purge_expired()
            assert node.store.nonce_count == 0


@pytest.mark.anyio
async def test_bundles_one_time_prekeys_once_and_owner_only(tmp_path: Path) -> None:
    clock = FakeClock()
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host(clock) as (host, client):
            node = (await start_node(tg, tmp_path, clock=clock)).node
            assert node is not None
            await host.connect(node.host.addrs[0])
            bob, inbox = owner()
            assert await client.get_bundle(node.peer_id, inbox) is None
            keys = [os.urandom(36) for _ in range(3)]
            assert await client.put_bundle(node.peer_id, bob, b"bundle", keys) == 3
            answers = [await client.get_bundle(node.peer_id, inbox) for _ in range(4)]
            handed = [a.one_time_prekey for a in answers if a is not None]
            assert sorted(handed[:3]) == sorted(keys)
            assert handed[3] == b""
            assert all(a is not None and a.bundle == b"bundle" for a in answers)
            # Someone else cannot replace Bob's bundle.
            mallory = Identity.generate()
            request = sign_request(mallory, PutBundleRequest(inbox, b"evil"), clock())
            response = await client.exchange(node.peer_id, request)
            assert response.status == Status.UNAUTHORIZED


@pytest.mark.anyio
async def test_sync_requests_only_from_store_nodes(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with node_group() as tg, client_host() as (host, client):
            node = (await start_node(tg, tmp_path)).node
            assert node is not None
            await host.connect(node.host.addrs[0])
            response = await client.exchange(node.peer_id, SyncDigestsRequest(()))
            assert response.status == Status.FORBIDDEN
            assert "store nodes only" in response.error
