"""Store benchmarks (issue 6): deposits and fetch+ack on one node, latency under a steady load,
and replicated deposits with R = 3 — all on 127.0.0.1, 256-byte payloads.

- **in-process** figures go through the node's storage path exactly as a request does after
  parsing: `StoreNode.deposit` (one envelope per call, many concurrent callers) queues for the
  batching writer, which commits up to 1,024 envelopes per SQLite transaction and answers each
  caller after its batch committed. fetch+ack is `StoreNode.handle` with signed requests (a page of
  100, then an ack of those 100), signature checks included.
- **network** figures add the client host, QUIC (aioquic, pure Python) and the protocol codec,
  one client process serving both ends in one trio loop: deposits of one envelope per call from
  64 concurrent callers — as `StoreClient` sends them (coalesced: at most 4 requests in flight,
  the callers waiting meanwhile leave together) and one request per call (64 in flight, the
  old behaviour) — and of 100 and 256 envelopes per call. Besides deposits/s of wall time, each
  figure has deposits per CPU-second of the process (both ends, threads included), which the
  other sessions on a shared machine disturb much less.
- **node process**: `teia store` itself in its own process (as deployed: its own interpreter),
  the client in this one; batched deposits of 100 and 256 per call from 8 callers, deposits/s
  and deposits per CPU-second of the node process alone (``/proc/PID/stat``).
- **steady load**: one-envelope deposits paced at a fixed rate, well under capacity; p50/p99 of
  the request latency as the client sees it.
- **replicated**: 5 nodes, `ReplicatedStoreClient` with R = 3, W = 2, batches of 100 envelopes
  for 100 inboxes; each envelope costs three node writes.

Each figure is measured inside the trio loop and kept in ``extra_info``; nothing asserts a timing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from teia.host.host import Host
from teia.identity import Identity
from teia.store import (
    Envelope,
    InboxStore,
    ReplicatedStoreClient,
    StaticMembership,
    StoreClient,
    StoreLimits,
    StoreNode,
    StoreNodeInfo,
    StoreSettings,
    inbox_for,
    sign_request,
)
from teia.store.messages import AckRequest, FetchRequest

LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"
PAYLOAD = os.urandom(256)
SETTINGS = StoreSettings(
    deposit_rate=1e9,
    deposit_burst=1e9,
    request_rate=1e9,
    request_burst=1e9,
    purge_interval=0,
    anti_entropy_interval=0,
)
LIMITS = StoreLimits(max_inbox_envelopes=10**7, max_inbox_bytes=1 << 40)
RESULTS: dict[str, float] = {}


def new_envelope(inbox: bytes) -> Envelope:
    return Envelope(inbox, os.urandom(16), PAYLOAD, int(time.time() * 1000))


def run_trio(body: Callable[[Path], Awaitable[dict[str, float]]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(body, Path(tmp), backend="trio")


async def concurrently(count: int, workers: int, call: Callable[[int], Awaitable[None]]) -> None:
    """``call(i)`` for i in range(count), from ``workers`` tasks."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await call(index)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)


def report(benchmark: Any, figures: dict[str, float]) -> None:
    benchmark.extra_info.update(figures)
    RESULTS.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.1f}")


# --- one node, in process -----------------------------------------------------------------------


async def in_process(tmp: Path, count: int = 40_000) -> dict[str, float]:
    owners = [Identity.generate() for _ in range(100)]
    inboxes = [inbox_for(o.public_key) for o in owners]
    envelopes = [new_envelope(inboxes[i % 100]) for i in range(count)]
    with InboxStore(tmp / "store.db", limits=LIMITS) as store:
        async with (
            Host(Identity.generate(), listen=[LOOPBACK]) as host,
            StoreNode(host, store, settings=SETTINGS) as node,
        ):

            async def deposit(index: int) -> None:
                await node.deposit([envelopes[index]])

            started = time.perf_counter()
            await concurrently(count, 1024, deposit)
            deposit_s = time.perf_counter() - started

            batched = [envelopes[i : i + 100] for i in range(0, count, 100)]
            fresh = [[new_envelope(inboxes[i % 100]) for i in range(100)] for _ in batched]

            async def deposit_many(index: int) -> None:
                await node.deposit(fresh[index])

            started = time.perf_counter()
            await concurrently(len(fresh), 16, deposit_many)
            batched_s = time.perf_counter() - started
            count += len(fresh) * 100

            started = time.perf_counter()
            handled = 0
            for owner_identity, inbox in zip(owners, inboxes, strict=True):
                while True:
                    fetch = sign_request(
                        owner_identity, FetchRequest(inbox, limit=100), node.clock()
                    )
                    page = await node.handle(fetch, None)
                    if not page.envelopes:
                        break
                    ack = AckRequest(inbox, tuple(e.message_id for e in page.envelopes))
                    await node.handle(sign_request(owner_identity, ack, node.clock()), None)
                    handled += len(page.envelopes)
            fetch_s = time.perf_counter() - started
    assert handled == count
    return {
        "in-process deposits/s (1 per call, 1024 callers)": (count - len(fresh) * 100) / deposit_s,
        "in-process deposits/s (100 per call, 16 callers)": len(fresh) * 100 / batched_s,
        "in-process fetch+ack envelopes/s": count / fetch_s,
    }


def test_one_node_in_process(benchmark: Any) -> None:
    figures = benchmark.pedantic(run_trio, args=(in_process,), rounds=1, iterations=1)
    report(benchmark, figures)


# --- one node, over QUIC ------------------------------------------------------------------------


async def over_network(tmp: Path, count: int = 5_000) -> dict[str, float]:
    owner_identity = Identity.generate()
    inbox = inbox_for(owner_identity.public_key)
    with InboxStore(tmp / "store.db", limits=LIMITS) as store:
        async with (
            Host(Identity.generate(), listen=[LOOPBACK]) as server,
            StoreNode(server, store, settings=SETTINGS),
            Host(Identity.generate(), listen=[LOOPBACK]) as client_host,
        ):
            await client_host.connect(server.addrs[0])
            client = StoreClient(client_host)
            uncoalesced = StoreClient(client_host, max_deposits_in_flight=64)
            peer = server.peer_id
            figures: dict[str, float] = {}

            async def measure(
                name: str, envelopes: int, calls: int, callers: int, call: Callable[[], Any]
            ) -> None:
                async def one(_: int) -> None:
                    await call()

                started, cpu = time.perf_counter(), time.process_time()
                await concurrently(calls, callers, one)
                wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
                figures[f"network deposits/s ({name})"] = envelopes / wall_s
                figures[f"network deposits per CPU-s ({name})"] = envelopes / cpu_s

            await measure(
                "1 per call, 64 callers, coalesced", count, count, 64,
                lambda: client.deposit(peer, [new_envelope(inbox)]),
            )  # fmt: skip
            await measure(
                "1 per call, 64 callers, 1 request each", count, count, 64,
                lambda: uncoalesced.deposit(peer, [new_envelope(inbox)]),
            )  # fmt: skip
            await uncoalesced.aclose()
            batches = 100
            await measure(
                "100 per call, 8 callers", batches * 100, batches, 8,
                lambda: client.deposit(peer, [new_envelope(inbox) for _ in range(100)]),
            )  # fmt: skip
            await measure(
                "256 per call, 8 callers", 40 * 256, 40, 8,
                lambda: client.deposit(peer, [new_envelope(inbox) for _ in range(256)]),
            )  # fmt: skip

            # Steady load: one deposit every 1/rate s, each in its own task; latency per call.
            rate, seconds = 500, 4
            latencies: list[float] = []

            async def timed() -> None:
                t0 = time.perf_counter()
                await client.deposit(peer, [new_envelope(inbox)])
                latencies.append(time.perf_counter() - t0)

            async with anyio.create_task_group() as tg:
                start = anyio.current_time()
                for i in range(rate * seconds):
                    await anyio.sleep_until(start + i / rate)
                    tg.start_soon(timed)
            quantiles = statistics.quantiles(latencies, n=100)

            # fetch+ack of everything deposited, pages of 100.
            total = 2 * count + batches * 100 + 40 * 256 + rate * seconds
            started = time.perf_counter()
            handled = 0
            for _ in range(total // 100 + 2):
                page = await client.fetch(peer, owner_identity, limit=100)
                if not page.envelopes:
                    break
                await client.ack(peer, owner_identity, [e.message_id for e in page.envelopes])
                handled += len(page.envelopes)
            fetch_s = time.perf_counter() - started
            await client.aclose()
    assert handled == total, (handled, total)
    return {
        **figures,
        "network fetch+ack envelopes/s (pages of 100)": handled / fetch_s,
        f"steady {rate}/s deposit latency p50 ms": quantiles[49] * 1000,
        f"steady {rate}/s deposit latency p99 ms": quantiles[98] * 1000,
    }


def test_one_node_over_quic(benchmark: Any) -> None:
    figures = benchmark.pedantic(run_trio, args=(over_network,), rounds=1, iterations=1)
    report(benchmark, figures)


# --- one node in its own process ---------------------------------------------------------------


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def separate_node(tmp: Path) -> dict[str, float]:
    """`teia store` as a deployment runs it, in its own process (its own interpreter, so the
    client's QUIC stack does not share its GIL); rate limits and quotas raised for the load."""
    import json
    import subprocess
    import sys

    from teia.identity import Multiaddr

    argv = [sys.executable, "-m", "teia", "store", "--listen", LOOPBACK,
            "--data-dir", str(tmp / "node"), "--metrics", "", "--log-format", "json",
            "--deposit-rate", "1e9", "--deposit-burst", "1e9", "--request-rate", "1e9",
            "--request-burst", "1e9", "--max-inbox-envelopes", "100000000",
            "--max-inbox-bytes", str(1 << 40)]  # fmt: skip
    owner_identity = Identity.generate()
    inbox = inbox_for(owner_identity.public_key)
    figures: dict[str, float] = {}
    async with await anyio.open_process(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        assert process.stderr is not None
        buffered = b""
        with anyio.fail_after(60):
            while b'"event": "ready"' not in buffered:
                buffered += await process.stderr.receive()
        line = next(x for x in buffered.split(b"\n") if b'"event": "ready"' in x)
        addr = Multiaddr(json.loads(line)["listen"].split(",")[0])
        node = addr.peer_id
        assert node is not None
        async with Host(Identity.generate(), listen=[LOOPBACK]) as client_host:
            await client_host.connect(addr)
            client = StoreClient(client_host)
            for per_call, calls in ((100, 100), (256, 40), (256, 80)):
                envelopes = per_call * calls

                async def one(_: int, per_call: int = per_call) -> None:
                    await client.deposit(node, [new_envelope(inbox) for _ in range(per_call)])

                node_cpu = _process_cpu_s(process.pid)
                started = time.perf_counter()
                await concurrently(calls, 8, one)
                wall_s = time.perf_counter() - started
                node_cpu_s = _process_cpu_s(process.pid) - node_cpu
                name = f"{per_call} per call, 8 callers, {envelopes:,} envelopes"
                figures[f"node process: deposits/s ({name})"] = envelopes / wall_s
                figures[f"node process: deposits per node CPU-s ({name})"] = envelopes / node_cpu_s
            await client.aclose()
        process.terminate()
        with anyio.fail_after(30):
            await process.wait()
    return figures


def test_one_node_in_its_own_process(benchmark: Any) -> None:
    figures = benchmark.pedantic(run_trio, args=(separate_node,), rounds=1, iterations=1)
    report(benchmark, figures)


# --- five nodes, R = 3 --------------------------------------------------------------------------


async def replicated(tmp: Path, count: int = 10_000) -> dict[str, float]:
    membership = StaticMembership()
    inboxes = [os.urandom(32) for _ in range(100)]
    async with anyio.create_task_group() as tg:
        ready: list[StoreNode] = []

        async def run_node(index: int, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            with InboxStore(tmp / f"n{index}" / "store.db", limits=LIMITS) as store:
                async with (
                    Host(Identity.generate(), listen=[LOOPBACK]) as host,
                    StoreNode(host, store, membership=membership, settings=SETTINGS) as node,
                ):
                    ready.append(node)
                    task_status.started()
                    await anyio.sleep_forever()

        for index in range(5):
            await tg.start(run_node, index)
        membership.set_nodes(StoreNodeInfo(n.peer_id, tuple(n.host.listen_addrs)) for n in ready)
        async with Host(Identity.generate(), listen=[LOOPBACK]) as client_host:
            client = ReplicatedStoreClient(StoreClient(client_host), membership)
            envelopes = [new_envelope(inboxes[i % 100]) for i in range(count)]
            batches = [envelopes[i : i + 100] for i in range(0, count, 100)]

            async def deposit(index: int) -> None:
                await client.deposit(batches[index])

            await client.deposit(batches[0][:1])  # connections up
            started = time.perf_counter()
            await concurrently(len(batches), 8, deposit)
            elapsed = time.perf_counter() - started
            await client.client.aclose()
        tg.cancel_scope.cancel()
    return {"replicated deposits/s (R=3, W=2, batches of 100)": count / elapsed}


def test_replicated_r3(benchmark: Any) -> None:
    figures = benchmark.pedantic(run_trio, args=(replicated,), rounds=1, iterations=1)
    report(benchmark, figures)


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Any:
    yield
    if RESULTS:
        print("\nstore figures:")
        for key, value in RESULTS.items():
            print(f"  {key:<52} {value:12,.1f}")
