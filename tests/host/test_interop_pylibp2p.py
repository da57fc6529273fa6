"""Wire compatibility with py-libp2p over QUIC-v1: libp2p TLS both ways, multistream, ping.

py-libp2p pins its own dependency versions, so it lives in its own virtualenv, which ``make test``
creates (``.venv-libp2p``). ``TEIA_PYLIBP2P_PYTHON`` may point at another interpreter with
``libp2p`` installed. Without one these tests fail (they never skip quietly).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.host.host import Host

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("TEIA_PYLIBP2P_PYTHON") or str(REPO / ".venv-libp2p" / "bin" / "python")
PEER_SCRIPT = Path(__file__).parent / "interop" / "pylibp2p_peer.py"
TIMEOUT = 60


@pytest.fixture(autouse=True)
def _pylibp2p_present() -> None:
    if not Path(PYTHON).exists():
        pytest.fail(f"py-libp2p interpreter {PYTHON} missing: run `make test` (it installs it)")


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


# Test-only base58btc until teia.identity's PeerId takes over.
def b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        number = number * 58 + _B58.index(char)
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\x00" * (len(text) - len(text.lstrip("1"))) + body


def b58encode(data: bytes) -> str:
    number, text = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = _B58[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\x00"))) + text


async def first_line(process: anyio.abc.Process, prefix: str) -> str:
    assert process.stdout is not None
    buffered = ""
    async for chunk in TextReceiveStream(process.stdout):
        buffered += chunk
        # Only complete lines: a chunk may end in the middle of the line we wait for.
        *complete, buffered = buffered.split("\n")
        for line in complete:
            if line.startswith(prefix):
                return line.rstrip("\r")
    raise AssertionError(f"py-libp2p peer exited without printing {prefix!r}")


@pytest.mark.anyio
async def test_teia_dials_pylibp2p_and_pings() -> None:
    assert PYTHON is not None
    with anyio.fail_after(TIMEOUT):
        async with (
            await anyio.open_process(
                [PYTHON, str(PEER_SCRIPT), "listen"], stderr=subprocess.DEVNULL
            ) as process,
            Host(ed25519.Ed25519PrivateKey.generate()) as host,
        ):
            try:
                _, peer, port = (await first_line(process, "PEER ")).split()
                connection = await host.connect(("127.0.0.1", int(port)), peer_id=b58decode(peer))
                assert b58encode(connection.remote_peer.peer_id) == peer
                assert len(await host.ping(b58decode(peer), count=3)) == 3
                info = await host.identify(b58decode(peer))
                assert "/ipfs/ping/1.0.0" in info.protocols
                assert info.listen_addrs
            finally:
                process.terminate()


@pytest.mark.anyio
async def test_pylibp2p_dials_teia_and_pings() -> None:
    assert PYTHON is not None
    with anyio.fail_after(TIMEOUT):
        async with Host(ed25519.Ed25519PrivateKey.generate()) as host:
            _, port = host.listen_addresses[0]
            target = f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{b58encode(host.peer_id)}"
            async with await anyio.open_process(
                [PYTHON, str(PEER_SCRIPT), "dial", target], stderr=subprocess.DEVNULL
            ) as process:
                assert await first_line(process, "PINGED") == "PINGED"
                assert await process.wait() == 0
            assert len(host.connections.peers()) <= 1
