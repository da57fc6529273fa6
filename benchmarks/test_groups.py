"""Group benchmark (issue 8): fan-out time of one group text to a 50-member group.

The sender (this process) is the group's admin; the 50 other members are peers in **one other
process** (one trio loop), all on 127.0.0.1, persistence on (SQLite WAL, ``synchronous=NORMAL``,
everything sealed at rest). Before measuring, the group is created (state and the sender's
key delivered to every member) and every member's key has reached the sender.

- **send**: the ``Groups.send`` call — encrypt once with the sender key, commit it to history
  with the advanced chain, then queue it pairwise for 50 members (a Double Ratchet encryption
  and an outbox commit each).
- **fan-out**: from calling ``Groups.send`` until all 50 members have acknowledged their copy
  (each recipient acknowledges once the payload is decrypted and committed with its session).

One text at a time, 5 warm-up texts, then 30 measured. Figures go to ``extra_info`` and
stdout; nothing asserts a timing. Run as a script (``python benchmarks/test_groups.py members
DIR``) it is the members' process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from teia.identity.keystore import KdfParams
from teia.peer import Peer, PeerConfig, Profile

PASSPHRASE = "benchmark passphrase"
FAST_KDF = KdfParams(memory_kib=8, iterations=1)
MEMBERS, WARMUP, MEASURED = 50, 5, 30


def profile(directory: Path, **settings: Any) -> Path:
    Profile.create(directory, PASSPHRASE, kdf=FAST_KDF, config=PeerConfig(**settings)).close()
    return directory


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def members_process(directory: Path) -> None:
    """Bring every profile under ``directory`` online; print where they are, then ``ready``;
    stop when stdin closes."""
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        found = []
        for sub in sorted(directory.iterdir()):  # noqa: ASYNC240 (before anything runs)
            peer = await stack.enter_async_context(
                Peer.open(sub, passphrase=PASSPHRASE, listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
            )
            found.append({"peer_id": str(peer.peer_id), "addr": str(peer.addrs[0])})
        print(json.dumps(found), flush=True)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


async def fan_out(tmp: Path) -> dict[str, float]:
    # Members do not know each other's addresses: their keys for one another stay queued
    # (retried rarely), so only the sender's traffic is measured.
    for index in range(MEMBERS):
        profile(tmp / "members" / f"m{index:02}", one_time_prekeys=8, retry_interval=600.0)
    sender_dir = profile(tmp / "sender", one_time_prekeys=8)
    command = [sys.executable, __file__, "members", str(tmp / "members")]
    async with await anyio.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        lines = TextReceiveStream(process.stdout)
        buffer = ""
        with anyio.fail_after(300):
            while "ready\n" not in buffer:
                buffer += await lines.receive()
        members = json.loads(buffer.splitlines()[0])
        async with Peer.open(
            sender_dir, passphrase=PASSPHRASE, listen=["/ip4/127.0.0.1/udp/0/quic-v1"]
        ) as sender:
            for member in members:
                await sender.add_contact(member["peer_id"], None, [member["addr"]])
            started = time.perf_counter()
            group = await sender.groups.create("bench", [m["peer_id"] for m in members])
            with anyio.fail_after(300):
                await sender.groups.wait_delivered()
                setup = time.perf_counter() - started
                await sender.groups.wait_keys(group, MEMBERS)
            sends: list[float] = []
            fanouts: list[float] = []
            for index in range(WARMUP + MEASURED):
                started = time.perf_counter()
                sent = await sender.groups.send(group, f"fan-out probe {index}")
                queued = time.perf_counter()
                with anyio.fail_after(120):
                    for message_id in sent.deliveries.values():
                        await sender.wait_delivered(message_id)
                done = time.perf_counter()
                assert len(sent.deliveries) == MEMBERS
                if index >= WARMUP:
                    sends.append((queued - started) * 1000)
                    fanouts.append((done - started) * 1000)
        await process.stdin.aclose()
        with anyio.fail_after(60):
            await process.wait()
    return {
        "group_setup_s": setup,
        "send_ms_p50": statistics.median(sends),
        "send_ms_p90": percentile(sends, 0.9),
        "fanout_ms_p50": statistics.median(fanouts),
        "fanout_ms_p90": percentile(fanouts, 0.9),
        "fanout_ms_per_member_p50": statistics.median(fanouts) / MEMBERS,
    }


@pytest.mark.benchmark(group="groups")
def test_group_fan_out_50_members(benchmark: Any) -> None:
    def run() -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            return anyio.run(fan_out, Path(tmp), backend="trio")

    figures = benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.2f}")


if __name__ == "__main__" and sys.argv[1:2] == ["members"]:
    anyio.run(members_process, Path(sys.argv[2]), backend="trio")
