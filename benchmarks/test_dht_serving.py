"""Lookups served per second by one discovery node (issue 4), all on 127.0.0.1.

- **sans-IO ceiling**: `DhtCore.handle_request` alone (FIND_NODE and GET_VALUE on the filled
  table and store), and `handle_request_data` (the same with protobuf decode and encode).
- **served over QUIC**: one `DhtNode` in server mode, in this (pytest's) process, its table fed
  with 1,000 synthetic contacts (it keeps what its k-buckets hold) and 1,000 signed peer records;
  a load generator in another process (this file run as a script, so the node's CPU is its own)
  runs H client hosts with T requester tasks each, sending requests as fast as answers come
  back for a fixed window after a warm-up: FIND_NODE for random keys and GET_VALUE for stored
  records, one request per stream (as libp2p clients do), then FIND_NODE with up to 32 requests
  on one stream; and one requester alone, for the latency of an idle node. Reported: answers/s
  in the window, p50/p99 latency as the client sees it, and the node's CPU per request.

Figures are printed and kept in ``extra_info``; nothing asserts a timing.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from itertools import cycle
from typing import Any

import anyio
import pytest

from teia.dht.core import DhtCore
from teia.dht.messages import KAD_PROTOCOL, Message, MessageType, receive_message, send_message
from teia.dht.node import DhtNode, DhtTiming
from teia.dht.records import PeerRecord, record_key, unix_ms
from teia.errors import TeiaError
from teia.host.host import Host
from teia.identity import Identity, Multiaddr

LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"
CONTACTS = 1_000
RECORDS = 1_000
HOSTS = 4
TASKS_PER_HOST = 16
WARMUP_S = 1.0
WINDOW_S = 5.0
SERVER_TIMING = DhtTiming(
    max_inbound_per_peer=4096,
    max_inbound=1 << 16,
    max_requests_per_stream=32,
    maintenance_interval_s=3600.0,
)


# --- the node's contents ------------------------------------------------------------------------


def fill(core: DhtCore, contacts: int = CONTACTS, records: int = RECORDS) -> list[bytes]:
    """Synthetic contacts in the table and signed records in the store; the records' keys."""
    now = unix_ms()
    identities = [Identity.generate() for _ in range(max(contacts, records))]
    for i, identity in enumerate(identities[:contacts]):
        addr = Multiaddr(f"/ip4/10.{i // 250}.{i % 250}.1/udp/4001/quic-v1")
        core.add_contact(identity.peer_id, [addr], now)
    keys = []
    for i, identity in enumerate(identities[:records]):
        addr = Multiaddr(f"/ip4/10.{i // 250}.{i % 250}.1/udp/4001/quic-v1")
        record = PeerRecord.create(identity.peer_id, [addr], issued_at_ms=now).sign(identity)
        core.store_record(record, now)
        keys.append(record_key(identity.peer_id))
    return keys


# --- the sans-IO ceiling ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled_core() -> tuple[DhtCore, list[bytes]]:
    core = DhtCore(Identity.generate().peer_id)
    return core, fill(core)


KINDS = pytest.mark.parametrize(
    "kind", [MessageType.FIND_NODE, MessageType.GET_VALUE], ids=lambda kind: kind.name
)


def requests_of(kind: MessageType, keys: list[bytes]) -> Iterator[Message]:
    if kind is MessageType.FIND_NODE:
        keys = [os.urandom(32) for _ in range(1024)]
    return cycle([Message(kind, key=key) for key in keys])


@KINDS
def test_handle_request_alone(
    benchmark: Any, filled_core: tuple[DhtCore, list[bytes]], kind: MessageType
) -> None:
    core, keys = filled_core
    benchmark.group = "DhtCore.handle_request"
    sender = Identity.generate().peer_id
    requests = requests_of(kind, keys)
    now = unix_ms()
    benchmark(lambda: core.handle_request(sender, next(requests), now))
    benchmark.extra_info["table entries"] = len(core.table)


@KINDS
def test_handle_request_data_alone(
    benchmark: Any, filled_core: tuple[DhtCore, list[bytes]], kind: MessageType
) -> None:
    core, keys = filled_core
    benchmark.group = "DhtCore.handle_request_data (decode + encode)"
    sender = Identity.generate().peer_id
    messages = requests_of(kind, keys)
    encoded = cycle([next(messages).encode() for _ in range(1024)])
    now = unix_ms()
    benchmark(lambda: core.handle_request_data(sender, next(encoded), now))


# --- served over QUIC ---------------------------------------------------------------------------

SCENARIOS = {
    # name: (kind, load processes, hosts per process, tasks per host, requests per stream)
    "FIND_NODE, 1 per stream": ("FIND_NODE", 2, 2, 16, 1),
    "GET_VALUE, 1 per stream": ("GET_VALUE", 2, 2, 16, 1),
    "FIND_NODE, 32 per stream": ("FIND_NODE", 2, 2, 16, 32),
    "FIND_NODE, 1 requester": ("FIND_NODE", 1, 1, 1, 1),
}


async def serve_and_load(scenario: str) -> dict[str, float]:
    kind, processes, hosts, tasks, per_stream = SCENARIOS[scenario]
    async with (
        Host(Identity.generate(), listen=[LOOPBACK]) as host,
        DhtNode(host, timing=SERVER_TIMING) as node,
    ):
        keys = fill(node.core)
        plan = json.dumps(
            {
                "addr": str(host.addrs[0]),
                "kind": kind,
                "hosts": hosts,
                "tasks": tasks,
                "per_stream": per_stream,
                "keys": [k.hex() for k in keys],
            }
        ).encode()
        loads: list[dict[str, Any]] = []

        async def run_load() -> None:
            result = await anyio.run_process(
                [sys.executable, __file__, "load"], input=plan, check=False
            )
            assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
            loads.append(json.loads(result.stdout))

        served_before = node.metrics.requests.total()
        cpu_before = time.process_time()
        async with anyio.create_task_group() as tg:
            for _ in range(processes):
                tg.start_soon(run_load)
        cpu = time.process_time() - cpu_before
        served = node.metrics.requests.total() - served_before
    latencies = sorted(x for one in loads for x in one["latencies"])
    quantiles = statistics.quantiles(latencies, n=100)
    answers = len(latencies)
    node_cpu = cpu / max(served, 1)
    return {
        "table entries": len(node.core.table),
        "records": len(node.core.store),
        "answers/s": answers / WINDOW_S,
        "latency p50 ms": quantiles[49] * 1000,
        "latency p99 ms": quantiles[98] * 1000,
        "errors": sum(one["errors"] for one in loads),
        "node CPU us per request": node_cpu * 1e6,
        "node CPU busy share": node_cpu * answers / WINDOW_S,
        "client CPU us per answer": sum(one["cpu_s"] for one in loads) / max(answers, 1) * 1e6,
        "load average (1 min)": os.getloadavg()[0],
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_served_over_quic(benchmark: Any, scenario: str) -> None:
    benchmark.group = "DHT requests served over QUIC"
    figures = benchmark.pedantic(
        lambda: anyio.run(serve_and_load, scenario, backend="trio"), rounds=1, iterations=1
    )
    benchmark.extra_info.update(figures)
    print(f"\n{scenario}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()))


# --- the load generator (this file run as a script) ---------------------------------------------


async def load(plan: dict[str, Any]) -> dict[str, Any]:
    server = Multiaddr(plan["addr"])
    peer = server.peer_id
    assert peer is not None
    kind = MessageType[plan["kind"]]
    keys = [bytes.fromhex(k) for k in plan["keys"]]
    per_stream: int = plan["per_stream"]
    latencies: list[float] = []
    answers = errors = 0
    started = anyio.current_time()
    cpu_started = time.process_time()
    window = (started + WARMUP_S, started + WARMUP_S + WINDOW_S)

    async def requester(client: Host, rng: random.Random) -> None:
        nonlocal answers, errors
        while anyio.current_time() < window[1]:
            t0 = time.perf_counter()
            try:
                stream = await client.open_stream(peer, KAD_PROTOCOL)
                try:
                    for _ in range(per_stream):
                        key = (
                            rng.choice(keys) if kind is MessageType.GET_VALUE else rng.randbytes(32)
                        )
                        await send_message(stream, Message(kind, key=key))
                        answer = await receive_message(stream)
                        t1 = time.perf_counter()
                        now = anyio.current_time()
                        if window[0] <= now < window[1]:
                            answers += 1
                            latencies.append(t1 - t0)
                        assert answer.type is kind
                        t0 = t1
                finally:
                    await stream.aclose()
            except (TeiaError, OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                errors += 1
                print(f"request failed: {exc!r}", file=sys.stderr)

    async with anyio.create_task_group() as hosts:
        clients = []
        for _ in range(plan["hosts"]):
            client = Host(Identity.generate(), listen=[LOOPBACK])
            await hosts.start(_run_host, client)
            await client.connect(server)
            clients.append(client)
        async with anyio.create_task_group() as requesters:
            for h, client in enumerate(clients):
                for t in range(plan["tasks"]):
                    requesters.start_soon(requester, client, random.Random(h * 1000 + t))
        hosts.cancel_scope.cancel()
    return {
        "latencies": latencies,
        "answers": answers,
        "errors": errors,
        "cpu_s": time.process_time() - cpu_started,
    }


async def _run_host(host: Host, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Keeps ``host`` open until the load is over (its task group is cancelled then)."""
    async with host:
        task_status.started()
        await anyio.sleep_forever()


if __name__ == "__main__" and sys.argv[1:] == ["load"]:
    figures = anyio.run(load, json.loads(sys.stdin.read()), backend="trio")
    print(json.dumps(figures))
