"""Peer benchmarks (issue 7): end-to-end latency and messages/s between two peers, persistence
on (SQLite WAL, ``synchronous=NORMAL``, texts and sessions sealed), all on 127.0.0.1.

- **latency** is what the sender sees: from calling ``Peer.send`` to the `Delivered` event —
  the recipient acknowledges only once the message is decrypted and committed to its history;
  the sender's own ``delivered`` commit is queued before the event, not awaited. One message
  at a time, 50 warm-up messages, then 500 measured.
  *direct*: recipient in **another process** (``teia peer run``), so sender and recipient do
  not share an interpreter; *relayed*: both peers force the relay (``direct = false``), relay and
  both peers in this process; *stored*: the recipient is offline, latency until the envelope is
  committed on W = 2 of R = 3 store nodes (in this process).
- **messages/s**: 5,000 messages, until the last one is acknowledged: ``send`` awaited one at
  a time, and from 64 concurrent tasks (their sends share transactions: group commit);
  recipient in another process, and again with both peers in one process (one trio loop).

Figures go to ``extra_info`` and stdout; nothing asserts a timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from teia.identity.keystore import KdfParams
from teia.peer import Delivered, Peer, PeerConfig, Profile

PASSPHRASE = "benchmark passphrase"
FAST_KDF = KdfParams(memory_kib=8, iterations=1)
WARMUP, MEASURED, BULK = 50, 500, 5000
RESULTS: dict[str, float] = {}


def run_trio(body: Callable[[Path], Awaitable[dict[str, float]]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(body, Path(tmp), backend="trio")


def report(benchmark: Any, figures: dict[str, float]) -> None:
    benchmark.extra_info.update(figures)
    RESULTS.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.2f}")


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def profile(directory: Path, **settings: Any) -> Path:
    Profile.create(directory, PASSPHRASE, kdf=FAST_KDF, config=PeerConfig(**settings)).close()
    return directory


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def recipient_process(directory: Path) -> AsyncIterator[tuple[str, str]]:
    """``teia peer run`` on ``directory``; yields (peer ID, address)."""
    port = free_port()
    env = {**os.environ, "TEIA_PASSPHRASE": PASSPHRASE}
    listen = f"/ip4/127.0.0.1/udp/{port}/quic-v1"
    command = [sys.executable, "-m", "teia", "peer", "run", "--profile", str(directory),
               "--listen", listen, "--log-format", "json"]  # fmt: skip
    process = await anyio.open_process(command, env=env, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        logs = TextReceiveStream(process.stderr)
        buffer = ""
        with anyio.fail_after(30):
            while '"event": "ready"' not in buffer:
                buffer += await logs.receive()
        line = next(x for x in buffer.splitlines() if '"event": "ready"' in x)
        ready = json.loads(line)
        yield ready["peer_id"], ready["listen"].split(",")[0]
    finally:
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await process.wait()


async def latencies(sender: Peer, to: str, *, expect: str = "delivered") -> list[float]:
    """One message at a time: from ``send`` to the sender learning it is delivered (the
    `Delivered` event, emitted on the acknowledgement, the sender's commit of it queued)."""
    out = []
    async with sender.events() as events:
        for index in range(WARMUP + MEASURED):
            started = time.perf_counter()
            message_id = await sender.send(to, f"latency probe {index}")
            while True:
                event = await events.receive()
                if isinstance(event, Delivered) and event.message_id == message_id:
                    break
            elapsed = (time.perf_counter() - started) * 1000
            assert event.path == expect or expect == "delivered", event.path
            if index >= WARMUP:
                out.append(elapsed)
    return out


async def bulk(sender: Peer, to: str, concurrency: int) -> float:
    """``BULK`` messages from ``concurrency`` tasks; messages/s until the last is delivered."""

    async def worker(offset: int) -> None:
        for index in range(offset, BULK, concurrency):
            await sender.send(to, f"bulk message number {index}")

    async with sender.events(buffer=BULK * 2) as events:
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for offset in range(concurrency):
                tg.start_soon(worker, offset)
        delivered = 0
        while delivered < BULK:
            if isinstance(await events.receive(), Delivered):
                delivered += 1
        return BULK / (time.perf_counter() - started)


# --- direct, recipient in another process -----------------------------------------------------


async def direct_processes(tmp: Path) -> dict[str, float]:
    recipient = profile(tmp / "recipient")
    sender_dir = profile(tmp / "sender")
    async with (
        recipient_process(recipient) as (peer_id, addr),
        Peer.open(sender_dir, passphrase=PASSPHRASE) as sender,
    ):
        await sender.add_contact(peer_id, "r", [addr])
        samples = await latencies(sender, "r")
        row = (await sender.history("r", limit=1))[0]
        sequential = await bulk(sender, "r", 1)
        concurrent = await bulk(sender, "r", 64)
    p50, p99 = percentiles(samples)
    return {
        "direct latency p50 ms (2 processes)": p50,
        "direct latency p99 ms (2 processes)": p99,
        "messages/s, one send at a time (2 processes)": sequential,
        "messages/s, 64 concurrent senders (2 processes)": concurrent,
        "last path is direct": float(row.path == "direct"),
    }


@pytest.mark.benchmark(group="peer")
def test_direct_two_processes(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(direct_processes,), rounds=1))


# --- both peers in one process ----------------------------------------------------------------


async def one_process(tmp: Path) -> dict[str, float]:
    a_dir, b_dir = profile(tmp / "a"), profile(tmp / "b")
    async with (
        Peer.open(a_dir, passphrase=PASSPHRASE) as alice,
        Peer.open(b_dir, passphrase=PASSPHRASE) as bob,
    ):
        await alice.add_contact(bob.peer_id, "bob", [str(a) for a in bob.addrs])
        samples = await latencies(alice, "bob")
        sequential = await bulk(alice, "bob", 1)
        concurrent = await bulk(alice, "bob", 64)
    p50, p99 = percentiles(samples)
    return {
        "direct latency p50 ms (1 process)": p50,
        "direct latency p99 ms (1 process)": p99,
        "messages/s, one send at a time (1 process)": sequential,
        "messages/s, 64 concurrent senders (1 process)": concurrent,
    }


@pytest.mark.benchmark(group="peer")
def test_direct_one_process(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(one_process,), rounds=1))


# --- relayed ------------------------------------------------------------------------------------


async def relayed(tmp: Path) -> dict[str, float]:
    from tests.peer.infra import relay

    async with relay(tmp) as table:
        a_dir = profile(tmp / "a", relays=[table], direct=False)
        b_dir = profile(tmp / "b", relays=[table], direct=False)
        async with (
            Peer.open(a_dir, passphrase=PASSPHRASE) as alice,
            Peer.open(b_dir, passphrase=PASSPHRASE) as bob,
        ):
            with anyio.fail_after(10):
                (b_relayed,) = await bob.host.wait_relayed_addrs()
                await alice.host.wait_relayed_addrs()
            await alice.add_contact(bob.peer_id, "bob", [str(b_relayed)])
            samples = await latencies(alice, "bob")
            row = (await alice.history("bob", limit=1))[0]
    p50, p99 = percentiles(samples)
    return {
        "relayed latency p50 ms (1 process)": p50,
        "relayed latency p99 ms (1 process)": p99,
        "last path is relayed": float(row.path == "relayed"),
    }


@pytest.mark.benchmark(group="peer")
def test_relayed(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(relayed,), rounds=1))


# --- stored -------------------------------------------------------------------------------------


async def stored(tmp: Path) -> dict[str, float]:
    from tests.peer.infra import store_nodes

    async with store_nodes(tmp) as stores:
        a_dir = profile(tmp / "a", store_nodes=stores)
        b_dir = profile(tmp / "b", store_nodes=stores)
        async with Peer.open(b_dir, passphrase=PASSPHRASE) as bob:
            bob_id = str(bob.peer_id)
        async with Peer.open(a_dir, passphrase=PASSPHRASE) as alice:
            samples = await latencies(alice, bob_id, expect="stored")
            alice_id = str(alice.peer_id)
        started = time.perf_counter()
        async with Peer.open(b_dir, passphrase=PASSPHRASE) as bob:
            fetched = len(await bob.history(alice_id, limit=10_000))
        fetch_s = time.perf_counter() - started
    p50, p99 = percentiles(samples)
    return {
        "stored latency p50 ms (deposit on W=2 of R=3)": p50,
        "stored latency p99 ms (deposit on W=2 of R=3)": p99,
        "stored: messages fetched, decrypted, acked on coming online": float(fetched),
        "stored: seconds to open the recipient and take them all": fetch_s,
    }


@pytest.mark.benchmark(group="peer")
def test_stored(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(stored,), rounds=1))
