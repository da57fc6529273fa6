"""Hole punching in the NAT lab (tests/nat): success rate and time to a direct connection.

Each round starts two fresh hosts (tests/nat/agent.py) in their own sites, so every round gets
new sockets and new NAT mappings; the lab's relay and discovery node stay up across rounds.
One host dials the other's relayed address; the accepting side punches (`teia.host.holepunch`).

- *punch*: the accepting host's own measure, from its first signalling message to a direct
  connection (what `PunchResult.seconds` says);
- *relayed → direct*: the harness's clock, from sending the relayed dial command to the moment
  the dialing host reports a direct connection (the relayed dial, the exchange, the punch and
  the JSON round trips of the harness).

Cone ↔ cone rounds count successes; symmetric rounds measure how fast the attempt gives up
(``punch_timeout`` 2 s). Figures go to ``extra_info`` and stdout; nothing asserts a timing.
Needs root (network namespaces), as the lab tests do.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.nat.lab import NatKind, NatLab
from tests.nat.services import agent, lab_services

CONE_ROUNDS = 10
SYMMETRIC_ROUNDS = 3
ROUND_TIMEOUT = 30.0


async def _rounds(kind: NatKind, rounds: int) -> dict[str, float]:
    punch: list[float] = []
    to_direct: list[float] = []
    failed_after: list[float] = []
    successes = 0
    with NatLab(f"bench{kind.value}") as lab, tempfile.TemporaryDirectory() as tmp:
        site_a, site_b = lab.add_site(NatKind.CONE), lab.add_site(kind)
        options = {"punch_timeout": 2.0, "retry_interval": 30.0, "max_attempts": 1}
        async with lab_services(lab, Path(tmp)) as services:
            for _ in range(rounds):
                with anyio.fail_after(ROUND_TIMEOUT):
                    async with (
                        agent(lab, site_a, services, **options) as a,
                        agent(lab, site_b, services, **options) as b,
                    ):
                        started = time.perf_counter()
                        await a.request("connect", addr=b.relayed[0])
                        answer = await b.request("attempts", count=1, timeout=10)
                        result = answer["results"][0]
                        if result["success"]:
                            path = await a.request("wait_direct", peer=b.peer_id, timeout=10)
                            if path["ok"]:
                                to_direct.append(time.perf_counter() - started)
                            successes += 1
                            punch.append(result["seconds"])
                        else:
                            failed_after.append(result["seconds"])
    figures: dict[str, float] = {f"{kind.value} rounds": rounds, f"{kind.value} direct": successes}
    if punch:
        figures[f"{kind.value} punch median ms"] = statistics.median(punch) * 1000
        figures[f"{kind.value} punch max ms"] = max(punch) * 1000
    if to_direct:
        figures[f"{kind.value} relayed->direct median ms"] = statistics.median(to_direct) * 1000
        figures[f"{kind.value} relayed->direct max ms"] = max(to_direct) * 1000
    if failed_after:
        figures[f"{kind.value} gave up after median ms"] = statistics.median(failed_after) * 1000
    return figures


def _report(benchmark: Any, figures: dict[str, float]) -> None:
    benchmark.extra_info.update(figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.1f}")


def test_cone_to_cone(benchmark: Any) -> None:
    figures = benchmark.pedantic(
        lambda: anyio.run(_rounds, NatKind.CONE, CONE_ROUNDS, backend="trio"), rounds=1
    )
    _report(benchmark, figures)


def test_cone_to_symmetric(benchmark: Any) -> None:
    figures = benchmark.pedantic(
        lambda: anyio.run(_rounds, NatKind.SYMMETRIC, SYMMETRIC_ROUNDS, backend="trio"), rounds=1
    )
    _report(benchmark, figures)
