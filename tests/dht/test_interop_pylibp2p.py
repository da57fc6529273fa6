"""Wire compatibility of the DHT with py-libp2p's kad-dht over QUIC-v1 (loopback only).

- py-libp2p's FIND_NODE (its protobuf, its ``senderRecord``, its framing) against a teia
  discovery node: the answer is exactly the k closest peers by XOR distance among those the
  node knows, closest first, with the addresses the node holds for them.
- py-libp2p's own ``KadDHT.find_peer`` finds a peer through teia nodes.
- The other way round: a teia node's requests and lookups through a py-libp2p kad-dht server.

py-libp2p lives in its own virtualenv (``.venv-libp2p``, created by ``make test``);
``TEIA_PYLIBP2P_PYTHON`` may point at another interpreter with ``libp2p`` installed. Without one
these tests fail (they never skip quietly).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from teia.dht.core import DhtConfig, Mode
from teia.dht.messages import Message, MessageType
from teia.dht.node import DhtNode, DhtTiming
from teia.dht.records import unix_ms
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("TEIA_PYLIBP2P_PYTHON") or str(REPO / ".venv-libp2p" / "bin" / "python")
SCRIPT = Path(__file__).parent / "interop" / "pylibp2p_kad.py"
TIMEOUT = 90
OTHERS = 10
SYNTHETIC = 300
"""Table entries beyond the real nodes, so that k = 20 of them is a real choice."""

CONFIG = DhtConfig(request_timeout_ms=3_000)
TIMING = DhtTiming(request_timeout_s=3.0, lookup_timeout_s=20.0, max_refreshes=2)


@pytest.fixture(autouse=True)
def _pylibp2p_present() -> None:
    if not Path(PYTHON).exists():
        pytest.fail(f"py-libp2p interpreter {PYTHON} missing: run `make test` (it installs it)")


# --- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_node(mode: Mode = Mode.SERVER) -> AsyncIterator[DhtNode]:
    async with (
        Host(Identity.generate(), idle_timeout=120.0) as host,
        DhtNode(host, mode=mode, config=CONFIG, timing=TIMING) as node,
    ):
        yield node


def dial_addr(node: DhtNode) -> Multiaddr:
    return node.host.addrs[0]


async def network(stack: contextlib.AsyncExitStack, others: int) -> tuple[DhtNode, list[DhtNode]]:
    """A discovery node and ``others`` server nodes joined through it."""
    target = await stack.enter_async_context(running_node())
    nodes = [await stack.enter_async_context(running_node()) for _ in range(others)]
    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(node.bootstrap, [dial_addr(target)])
    # It learns requesters once identify has answered; dialing them makes its table complete
    # now rather than eventually.
    assert await target.bootstrap([dial_addr(n) for n in nodes]) == others
    assert {n.host.peer_id for n in nodes} <= {p for p, _ in target.routing_table()}
    return target, nodes


async def run_script(*args: str) -> list[str]:
    """Run the py-libp2p script to completion; its stdout lines (it must exit 0)."""
    result = await anyio.run_process([PYTHON, str(SCRIPT), *args], check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    return result.stdout.decode().splitlines()


def payload(lines: list[str], prefix: str) -> list[Any]:
    return [json.loads(line.removeprefix(prefix)) for line in lines if line.startswith(prefix)]


def xor_distance(key: bytes, peer_id: bytes) -> int:
    """libp2p kad-dht's distance: XOR of the SHA-256 of both (computed here independently of
    the Rust core)."""
    a = hashlib.sha256(key).digest()
    b = hashlib.sha256(peer_id).digest()
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def expected_answer(target: DhtNode, key: bytes, k: int = 20) -> list[tuple[str, list[str]]]:
    """The k peers of ``target``'s table closest to ``key`` (itself first when asked about
    itself), as (base58 ID, text multiaddrs)."""
    known = [
        (peer_id, [str(Multiaddr.from_bytes(a)) for a in addrs])
        for peer_id, addrs, _ in target.core.table.entries()
    ]
    known.sort(key=lambda entry: xor_distance(key, entry[0]))
    answer = [(PeerId.from_bytes(p).to_base58(), addrs) for p, addrs in known]
    if key == target.host.peer_id.to_bytes():
        own = [str(a.without_peer_id()) for a in target.host.addrs]
        answer.insert(0, (target.host.peer_id.to_base58(), own))
    return answer[:k]


def add_synthetic_entries(target: DhtNode, count: int) -> None:
    now = unix_ms()
    for i in range(count):
        peer = Identity.generate().peer_id
        addr = Multiaddr(f"/ip4/10.{i // 250}.{i % 250}.1/udp/4001/quic-v1")
        target.core.add_contact(peer, [addr], now)


# --- py-libp2p asks teia ----------------------------------------------------------------------


async def test_pylibp2p_find_node_gets_the_closest_peers_with_their_addresses() -> None:
    with anyio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            target, nodes = await network(stack, OTHERS)
            add_synthetic_entries(target, SYNTHETIC)
            assert len(target.core.table) > 40
            keys = {
                "random": os.urandom(32),
                "a node's peer ID": nodes[3].host.peer_id.to_bytes(),
                "the discovery node's own peer ID": target.host.peer_id.to_bytes(),
            }
            lines = await run_script(
                "find-node", str(dial_addr(target)), *(key.hex() for key in keys.values())
            )
            answers = payload(lines, "CLOSER ")
            assert len(answers) == len(keys)
            for (what, key), answer in zip(keys.items(), answers, strict=True):
                assert answer["type"] == 4, what  # FIND_NODE
                assert answer["key"] == key.hex(), what
                got = [(p["id"], p["addrs"]) for p in answer["closer"]]
                assert got == expected_answer(target, key), what
            # The real nodes among the answers are given with the address they listen on.
            listening = {n.host.peer_id.to_base58(): str(n.host.listen_addrs[0]) for n in nodes}
            real = [p for a in answers for p in a["closer"] if p["id"] in listening]
            assert real
            for peer in real:
                assert listening[peer["id"]] in peer["addrs"]
            assert target.metrics.requests["FIND_NODE"] >= len(keys)
            assert not target.metrics.refused


async def test_pylibp2p_find_peer_through_teia_nodes() -> None:
    with anyio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            target, nodes = await network(stack, 6)
            wanted = nodes[-1]
            lines = await run_script(
                "find-peer", str(dial_addr(target)), wanted.host.peer_id.to_base58()
            )
            (found,) = payload(lines, "FOUND ")
            assert found is not None
            assert str(wanted.host.listen_addrs[0]) in found
            assert not target.metrics.refused


# --- teia asks py-libp2p ----------------------------------------------------------------------


async def test_teia_requests_and_lookups_through_a_pylibp2p_server() -> None:
    with anyio.fail_after(TIMEOUT):
        async with contextlib.AsyncExitStack() as stack:
            target, nodes = await network(stack, 4)
            known = [target, *nodes]
            process = await stack.enter_async_context(
                await anyio.open_process(
                    [PYTHON, str(SCRIPT), "serve", *(str(dial_addr(n)) for n in known)],
                    stderr=subprocess.DEVNULL,
                )
            )
            stack.callback(process.terminate)
            assert process.stdout is not None
            reader = BufferedByteReceiveStream(process.stdout)
            line = (await reader.receive_until(b"\n", 4096)).decode()
            _, text, port = line.split()
            server = PeerId.from_string(text)
            server_addr = Multiaddr.from_udp("127.0.0.1", int(port), peer_id=server)

            client = await stack.enter_async_context(running_node(Mode.CLIENT))
            key = Identity.generate().peer_id.to_bytes()
            answer = await client.request(
                server, Message(MessageType.FIND_NODE, key=key), [server_addr]
            )
            assert answer.type is MessageType.FIND_NODE
            closer = {p.peer_id(): p.multiaddrs() for p in answer.closer_peers}
            assert set(closer) == {n.host.peer_id for n in known}
            for node in known:
                assert node.host.listen_addrs[0] in closer[node.host.peer_id]

            # A lookup that starts at the py-libp2p node alone finds the teia nodes behind it.
            joiner = await stack.enter_async_context(running_node(Mode.CLIENT))
            assert await joiner.bootstrap([server_addr]) == 1
            found = await joiner.get_closest_peers(key)
            assert {p for p, _ in found} >= {n.host.peer_id for n in known}
