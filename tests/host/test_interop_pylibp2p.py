"""Wire compatibility with py-libp2p over QUIC-v1: libp2p TLS both ways, multistream, ping.

py-libp2p pins its own dependency versions, so it lives in its own virtualenv, which ``make test``
creates (``.venv-libp2p``). ``TEIA_PYLIBP2P_PYTHON`` may point at another interpreter with
``libp2p`` installed. Without one these tests fail (they never skip quietly).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("TEIA_PYLIBP2P_PYTHON") or str(REPO / ".venv-libp2p" / "bin" / "python")
PEER_SCRIPT = Path(__file__).parent / "interop" / "pylibp2p_peer.py"
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _pylibp2p_present() -> None:
    if not Path(PYTHON).exists():
        pytest.fail(f"py-libp2p interpreter {PYTHON} missing: run `make test` (it installs it)")


class Lines:
    """Complete lines from a child's stdout, kept across calls."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        self._text = TextReceiveStream(process.stdout)
        self._buffered = ""
        self._lines: list[str] = []

    async def first(self, prefix: str) -> str:
        while True:
            while self._lines:
                line = self._lines.pop(0)
                if line.startswith(prefix):
                    return line
            try:
                self._buffered += await self._text.receive()
            except anyio.EndOfStream:
                raise AssertionError(f"py-libp2p peer exited without printing {prefix!r}") from None
            # Only complete lines: a chunk may end in the middle of the line we wait for.
            *complete, self._buffered = self._buffered.split("\n")
            self._lines += [line.rstrip("\r") for line in complete]


@pytest.mark.anyio
async def test_teia_dials_pylibp2p_and_pings() -> None:
    assert PYTHON is not None
    with anyio.fail_after(TIMEOUT):
        async with (
            await anyio.open_process(
                [PYTHON, str(PEER_SCRIPT), "listen"], stderr=subprocess.DEVNULL
            ) as process,
            Host(Identity.generate()) as host,
        ):
            try:
                _, text, port = (await Lines(process).first("PEER ")).split()
                peer = PeerId.from_string(text)
                target = Multiaddr.from_udp("127.0.0.1", int(port), peer_id=peer)
                connection = await host.connect(target)
                assert connection.remote_peer.peer_id == peer
                assert len(await host.ping(peer, count=3)) == 3
                info = await host.identify(peer)
                assert "/ipfs/ping/1.0.0" in info.protocols
                assert info.listen_addrs
            finally:
                process.terminate()


@pytest.mark.anyio
async def test_pylibp2p_dials_teia_and_pings() -> None:
    assert PYTHON is not None
    with anyio.fail_after(TIMEOUT):
        async with Host(Identity.generate()) as host:
            target = str(host.addrs[0])
            async with await anyio.open_process(
                [PYTHON, str(PEER_SCRIPT), "dial", target], stderr=subprocess.DEVNULL
            ) as process:
                lines = Lines(process)
                assert await lines.first("PINGED") == "PINGED"
                line = await lines.first("IDENTIFIED ")
                assert await process.wait() == 0
            identified = json.loads(line.removeprefix("IDENTIFIED "))
            assert "/ipfs/ping/1.0.0" in identified["protocols"]
            assert identified["agent_version"].startswith("teia/")
            assert identified["listen_addrs"] == [str(a) for a in host.listen_addrs]
            assert identified["observed_addr"].startswith("/ip4/127.0.0.1/udp/")
            assert identified["public_key"] == host.identity.public_key_protobuf.hex()
            assert len(host.connections.peers()) <= 1
