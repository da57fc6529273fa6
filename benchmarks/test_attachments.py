"""Attachment benchmarks (issue 8): throughput of one file, direct and through a relay, all on
loopback.

One file of ``TEIA_BENCH_FILE_MB`` MiB (default 100, at most 100: the limit) of random bytes.
``send_file`` encrypts it into the sender's profile and offers it; the recipient pulls the
chunks, writes them in place, checks the digest, links the file into its receive directory and
answers "done"; the clock stops when the sender has that answer (`wait_complete`).

- *encrypt*: ``send_file`` alone (read, encrypt, fsync, record, offer);
- *transfer*: from the offer to the sender knowing the recipient has the whole file, and the
  CPU time of this process meanwhile (steadier than wall clock on a shared machine);
- *direct (2 processes)*: the recipient is ``teia peer run`` in another process;
  *direct (1 process)*: both peers in this process; *relayed (1 process)*: both peers force the
  relay (``direct = false``), relay and both peers in this process.

Figures go to ``extra_info`` and stdout; nothing asserts a timing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from teia.peer import Peer
from test_peer import PASSPHRASE, profile, recipient_process, report, run_trio

MIB = 1024 * 1024
SIZE = min(100, int(os.environ.get("TEIA_BENCH_FILE_MB", "100"))) * MIB
LIMIT_S = 900


def make_file(tmp: Path) -> Path:
    path = tmp / "payload.bin"
    with path.open("wb") as file:
        for _ in range(SIZE // MIB):
            file.write(os.urandom(MIB))
    return path


async def transfer(sender: Peer, to: Any, source: Path, label: str) -> dict[str, float]:
    with anyio.fail_after(LIMIT_S):
        started = time.perf_counter()
        file_id = await sender.attachments.send_file(to, source)
        offered, cpu = time.perf_counter(), time.process_time()
        done = await sender.attachments.wait_complete(file_id)
        finished, cpu = time.perf_counter(), time.process_time() - cpu
    assert done.state == "complete"
    mb = SIZE / 1e6
    return {
        f"{label}: transfer CPU ms per MB (this process)": cpu * 1000 / mb,
        f"{label}: file MB": mb,
        f"{label}: encrypt s": offered - started,
        f"{label}: transfer s": finished - offered,
        f"{label}: transfer MB/s": mb / (finished - offered),
        f"{label}: end to end MB/s": mb / (finished - started),
    }


async def direct_processes(tmp: Path) -> dict[str, float]:
    source = make_file(tmp)
    async with (
        recipient_process(profile(tmp / "recipient")) as (peer_id, addr),
        Peer.open(profile(tmp / "sender"), passphrase=PASSPHRASE) as sender,
    ):
        await sender.add_contact(peer_id, "r", [addr])
        figures = await transfer(sender, "r", source, "direct (2 processes)")
    received = list((tmp / "recipient" / "files").iterdir())
    assert [p.stat().st_size for p in received] == [SIZE]
    return figures


async def direct_one_process(tmp: Path) -> dict[str, float]:
    source = make_file(tmp)
    async with (
        Peer.open(profile(tmp / "a"), passphrase=PASSPHRASE) as alice,
        Peer.open(profile(tmp / "b"), passphrase=PASSPHRASE) as bob,
    ):
        await alice.add_contact(bob.peer_id, "bob", [str(a) for a in bob.addrs])
        figures = await transfer(alice, "bob", source, "direct (1 process)")
        (got,) = await bob.attachments.transfers()
        assert got.path == "direct"
    return figures


async def relayed(tmp: Path) -> dict[str, float]:
    from tests.peer.infra import relay

    source = make_file(tmp)
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
            await bob.add_contact(alice.peer_id, "alice", [str(a) for a in alice.addrs])
            figures = await transfer(alice, "bob", source, "relayed (1 process)")
            (got,) = await bob.attachments.transfers()
            assert got.path == "relayed"
    return figures


@pytest.mark.benchmark(group="attachments")
def test_direct_two_processes(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(direct_processes,), rounds=1))


@pytest.mark.benchmark(group="attachments")
def test_direct_one_process(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(direct_one_process,), rounds=1))


@pytest.mark.benchmark(group="attachments")
def test_relayed(benchmark: Any) -> None:
    report(benchmark, benchmark.pedantic(run_trio, args=(relayed,), rounds=1))
