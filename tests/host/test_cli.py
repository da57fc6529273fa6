"""``teia ping`` and ``teia identify`` as operators run them: a subprocess against a live host."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from teia.host.host import Host
from teia.identity import Identity

TEIA = str(Path(sys.executable).with_name("teia"))
TIMEOUT = 30


async def teia(*args: str) -> anyio.abc.Process:
    return await anyio.run_process([TEIA, *args], check=False)


@pytest.mark.anyio
async def test_ping_prints_round_trips() -> None:
    with anyio.fail_after(TIMEOUT):
        async with Host(Identity.generate()) as host:
            done = await teia("ping", "--count", "2", str(host.addrs[0]))
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert f"PING {host.peer_id}" in out
    assert "seq=2" in out
    assert "2 pings: min" in out


@pytest.mark.anyio
async def test_identify_prints_what_the_host_says() -> None:
    with anyio.fail_after(TIMEOUT):
        async with Host(Identity.generate()) as host:
            listen = [str(a) for a in host.listen_addrs]
            # Without /p2p the peer ID is learned, not checked.
            done = await teia("identify", "--json", listen[0])
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["peer_id"] == str(host.peer_id)
    assert "/ipfs/ping/1.0.0" in report["protocols"]
    assert report["listen_addrs"] == listen
    assert report["observed_addr"].startswith("/ip4/127.0.0.1/udp/")
    assert report["agent_version"].startswith("teia/")


@pytest.mark.anyio
async def test_wrong_peer_and_bad_address_are_clear_errors() -> None:
    with anyio.fail_after(TIMEOUT):
        async with Host(Identity.generate()) as host:
            someone_else = host.listen_addrs[0].with_peer_id(Identity.generate().peer_id)
            wrong = await teia("ping", str(someone_else))
    assert wrong.returncode == 1
    assert b"Traceback" not in wrong.stderr
    assert b"error" in wrong.stderr
    bad = await teia("ping", "/ip4/127.0.0.1/tcp/1")
    assert bad.returncode == 1
    assert b"not a QUIC-v1 address" in bad.stderr
    usage = await teia("ping", "--count", "0", "/ip4/127.0.0.1/udp/1/quic-v1")
    assert usage.returncode == 2
