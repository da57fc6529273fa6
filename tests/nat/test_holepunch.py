"""Hole punching across real NATs in the lab: which path each case ends up on.

Two hosts (tests/nat/agent.py, each in its own site's namespace) get allocations on the lab's
``teia relay`` and meet ``teia discovery``; one dials the other's relayed address, and the
side that accepted the relayed connection tries to upgrade it (`teia.host.holepunch`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .lab import NatKind, NatLab
from .services import agent, lab_services

pytestmark = pytest.mark.anyio


async def test_cone_to_cone_goes_direct_after_a_punch(lab: NatLab, tmp_path: Path) -> None:
    site_a, site_b = lab.add_site(NatKind.CONE), lab.add_site(NatKind.CONE)
    async with (
        lab_services(lab, tmp_path) as services,
        agent(lab, site_a, services) as a,
        agent(lab, site_b, services) as b,
    ):
        # Each learned its public address: the router's IP, and one port for every observer.
        assert [c.split("/")[2] for c in a.candidates] == [site_a.public_ip]
        assert [c.split("/")[2] for c in b.candidates] == [site_b.public_ip]
        answer = await a.request("connect", addr=b.relayed[0])
        assert answer == {"ok": True, "relayed": True}
        # b accepted a relayed connection, so b punches; both end up on a direct connection.
        attempts = await b.request("attempts", count=1, timeout=15)
        assert attempts["ok"], attempts
        assert attempts["results"][0]["success"], attempts
        for me, other, other_site in ((a, b, site_b), (b, a, site_a)):
            path = await me.request("wait_direct", peer=other.peer_id, timeout=10)
            assert path["path"] == "direct", path
            assert path["remote"].startswith(other_site.public_ip + ":")
            ping = await me.request("ping", peer=other.peer_id)
            assert ping["ok"], ping
            assert ping["path"] == "direct"


async def test_symmetric_nat_fails_fast_and_stays_relayed(lab: NatLab, tmp_path: Path) -> None:
    site_a, site_b = lab.add_site(NatKind.CONE), lab.add_site(NatKind.SYMMETRIC)
    options = {"punch_timeout": 2.0, "retry_interval": 0.5, "max_attempts": 2}
    async with (
        lab_services(lab, tmp_path) as services,
        agent(lab, site_a, services, **options) as a,
        agent(lab, site_b, services, **options) as b,
    ):
        # The relay and the discovery node saw b at two different ports: no address to offer.
        assert b.candidates == []
        assert await a.request("connect", addr=b.relayed[0]) == {"ok": True, "relayed": True}
        attempts = await b.request("attempts", count=2, timeout=15)
        assert attempts["ok"], attempts
        results = attempts["results"]
        assert [r["success"] for r in results] == [False, False]
        assert all(r["seconds"] < 2.0 + 0.5 for r in results), results  # within punch_timeout
        for me, other in ((a, b), (b, a)):
            ping = await me.request("ping", peer=other.peer_id)
            assert ping["ok"], ping
            assert ping["path"] == "relayed"


async def test_relayed_conversation_upgrades_when_a_direct_path_appears(
    lab: NatLab, tmp_path: Path
) -> None:
    site_a, site_b = lab.add_site(NatKind.CONE), lab.add_site(NatKind.CONE)
    # A firewall at b's router drops everything between the two sites, relay traffic aside.
    lab.block(site_b, site_a.public_ip)
    options = {"punch_timeout": 1.5, "retry_interval": 1.0, "max_attempts": 4}
    async with (
        lab_services(lab, tmp_path) as services,
        agent(lab, site_a, services, **options) as a,
        agent(lab, site_b, services, **options) as b,
    ):
        assert await a.request("connect", addr=b.relayed[0]) == {"ok": True, "relayed": True}
        first = await b.request("attempts", count=1, timeout=10)
        assert first["ok"], first
        assert not first["results"][0]["success"]
        assert (await a.request("ping", peer=b.peer_id))["path"] == "relayed"
        lab.unblock(site_b, site_a.public_ip)
        # The next retry finds the path: the same peers are now connected directly.
        for me, other, other_site in ((b, a, site_a), (a, b, site_b)):
            path = await me.request("wait_direct", peer=other.peer_id, timeout=15)
            assert path["path"] == "direct", path
            assert path["remote"].startswith(other_site.public_ip + ":")
            assert (await me.request("ping", peer=other.peer_id))["path"] == "direct"


async def test_a_chat_moves_from_the_relay_to_the_punched_connection(
    lab: NatLab, tmp_path: Path
) -> None:
    site_a, site_b = lab.add_site(NatKind.CONE), lab.add_site(NatKind.CONE)
    lab.block(site_b, site_a.public_ip)
    options = {"punch_timeout": 1.5, "retry_interval": 1.0}
    async with (
        lab_services(lab, tmp_path) as services,
        agent(lab, site_a, services, dir=str(tmp_path / "a"), **options) as a,
        agent(lab, site_b, services, dir=str(tmp_path / "b"), **options) as b,
    ):
        assert (await a.request("contact", peer=b.peer_id, addrs=b.addrs))["ok"]
        # No direct path yet: the first message goes through the relay.
        # Generous bound: X3DH, a relayed dial and the relayed round trips on a busy 2-core
        # machine (a fresh-clone run at load 8 once needed more than 30 s).
        sent = await a.request("send", peer=b.peer_id, text="through the relay", timeout=90)
        assert sent == {"ok": True, "path": "relayed"}, sent
        lab.unblock(site_b, site_a.public_ip)
        for me, other in ((b, a), (a, b)):
            path = await me.request("wait_direct", peer=other.peer_id, timeout=45)
            assert path["path"] == "direct", path
        # The kept chat stream follows the host to the direct connection, both ways.
        assert await a.request("send", peer=b.peer_id, text="direct now") == {
            "ok": True,
            "path": "direct",
        }
        await b.request("contact", peer=a.peer_id, addrs=a.addrs)
        assert await b.request("send", peer=a.peer_id, text="and back") == {
            "ok": True,
            "path": "direct",
        }
