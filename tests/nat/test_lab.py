"""The lab itself: the NATs behave as their names say, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .lab import DISCOVERY_IP, RELAY_IP, NatKind, NatLab

PROBE = str(Path(__file__).with_name("udpprobe.py"))
REFLECTORS = [f"{RELAY_IP}:7000", f"{DISCOVERY_IP}:7001"]


def _observed(lab: NatLab, ns: str) -> tuple[int, list[str | None]]:
    """From one socket in ``ns``: the local port, and the address each reflector saw."""
    result = subprocess.run(
        lab.command(ns, sys.executable, PROBE, "probe", *REFLECTORS),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    report = json.loads(result.stdout)
    return report["local_port"], [report["seen"][target] for target in REFLECTORS]


def test_cone_keeps_one_mapping_and_symmetric_does_not(lab: NatLab) -> None:
    cone = lab.add_site(NatKind.CONE)
    symmetric = lab.add_site(NatKind.SYMMETRIC)
    reflector = subprocess.Popen(
        lab.command(lab.public, sys.executable, PROBE, "reflect", *REFLECTORS),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reflector.stdout is not None
        assert reflector.stdout.readline().strip() == "ready"
        port, seen = _observed(lab, cone.host)
        # The private address never shows; both servers see the same public port.
        assert seen == [f"{cone.public_ip}:{port}"] * 2
        _, seen = _observed(lab, symmetric.host)
        assert all(s is not None and s.startswith(f"{symmetric.public_ip}:") for s in seen)
        assert seen[0] != seen[1], "a symmetric NAT maps each destination to its own port"
    finally:
        assert reflector.stdin is not None
        reflector.stdin.close()
        reflector.wait(timeout=10)


def test_unsolicited_packets_do_not_cross_a_nat(lab: NatLab) -> None:
    site = lab.add_site(NatKind.CONE)
    reflector = subprocess.Popen(
        lab.command(site.host, sys.executable, PROBE, "reflect", f"{site.private_ip}:7000"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reflector.stdout is not None
        assert reflector.stdout.readline().strip() == "ready"
        # From the public segment: the router's public address and the private one both fail.
        for target in (f"{site.public_ip}:7000", f"{site.private_ip}:7000"):
            result = subprocess.run(
                lab.command(lab.public, sys.executable, PROBE, "probe", target),
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            assert json.loads(result.stdout)["seen"][target] is None
    finally:
        assert reflector.stdin is not None
        reflector.stdin.close()
        reflector.wait(timeout=10)


def test_destroy_removes_every_namespace_even_with_processes_inside() -> None:
    lab = NatLab("cleanup")
    with lab:
        site = lab.add_site(NatKind.SYMMETRIC)
        sleeper = subprocess.Popen(lab.command(site.host, "sleep", "300"))
        assert len(lab.namespaces()) == 3
    assert sleeper.wait(timeout=10) != 0  # killed by the clean-up
    assert lab.namespaces() == []
