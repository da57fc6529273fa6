"""``teia store`` for real: a process on loopback that takes deposits, serves metrics, stops on
SIGTERM and keeps its envelopes and identity across a restart; store nodes that find each other
through the DHT (a ``teia discovery`` process) and replicate by anti-entropy; configuration
errors."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from teia.dht.core import Mode
from teia.dht.node import DhtNode
from teia.host.host import Host
from teia.identity import Identity, Multiaddr, PeerId
from teia.store import ReplicatedStoreClient, Status, StoreClient, responsible_nodes
from teia.store.membership import DhtMembership

from .helpers import LOOPBACK, client_host, envelope, owner

TIMEOUT = 60
PEER = Identity.from_seed(bytes(32)).peer_id
FULL = "/ip4/127.0.0.1/udp/1/quic-v1"


async def _wait_for(stream: TextReceiveStream, needle: str, seen: list[str]) -> str:
    buffered = ""
    async for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        seen.extend(lines)
        for line in lines:
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} never logged; saw {seen}")


def command(data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "teia", "store", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
            "--data-dir", str(data_dir), "--metrics", "127.0.0.1:0", "--log-format", "json",
            *extra]  # fmt: skip


async def scrape(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as http:
        await http.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        body = b""
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                body += await http.receive()
    return body


@pytest.mark.anyio
async def test_service_stores_serves_metrics_stops_and_restarts(tmp_path: Path) -> None:
    alice, inbox = owner()
    items = [envelope(inbox, b"sealed-bytes") for _ in range(20)]
    seen: list[str] = []
    peer_ids = []
    with anyio.fail_after(TIMEOUT):
        for run in range(2):
            async with await anyio.open_process(
                command(tmp_path / "data"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ) as process:
                assert process.stderr is not None
                logs = TextReceiveStream(process.stderr)
                ready = json.loads(await _wait_for(logs, '"event": "ready"', seen))
                peer_ids.append(ready["peer_id"])
                addr = Multiaddr(ready["listen"].split(",")[0])
                async with client_host() as (host, client):
                    await host.connect(addr)
                    assert addr.peer_id is not None
                    if run == 0:
                        assert await client.deposit(addr.peer_id, items) == [Status.OK] * 20
                        body = await scrape(ready["metrics_port"])
                        assert b"teia_store_envelopes_stored_total 20.0" in body
                        assert b"teia_store_inboxes 1.0" in body
                    else:
                        got = await client.fetch_all(addr.peer_id, alice)
                        assert [e.message_id for e in got] == [e.message_id for e in items]
                        assert ready["envelopes"] == 20
                process.send_signal(signal.SIGTERM)
                await _wait_for(logs, '"event": "stopped"', seen)
                assert await process.wait() == 0
    assert peer_ids[0] == peer_ids[1]  # the identity is kept in the data dir
    assert (tmp_path / "data" / "store-identity.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "data" / "store.db").stat().st_mode & 0o077 == 0
    assert "sealed-bytes" not in "\n".join(seen)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-ttl-days", "30"], "between 7 and 14"),
        (["--peer", "/ip4/127.0.0.1/udp/1/quic-v1"], "does not name the store node"),
        (["--bootstrap", "/ip4/127.0.0.1/udp/1/quic-v1"], "of a DHT node"),
        (["--announce", f"{FULL}/p2p/{PEER}"], "must not carry /p2p"),
        (["--bootstrap", f"{FULL}/p2p/{PEER}", "--peer", f"{FULL}/p2p/{PEER}"], "either"),
        (["--listen", "/ip4/127.0.0.1/tcp/1"], "quic-v1"),
        (["--min-ttl-days", "10", "--default-ttl-days", "8"], "min-ttl-days <= default"),
    ],
)
def test_configuration_errors_are_named(tmp_path: Path, flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teia", "store", "--data-dir", str(tmp_path), *flags],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr.decode()


class Logs:
    """The JSON log lines of one service process, read as they come; tests wait on them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.ended = False
        self._changed = anyio.Event()

    async def pump(self, stream: anyio.abc.ByteReceiveStream) -> None:
        buffered = ""
        async for chunk in TextReceiveStream(stream):
            buffered += chunk
            *lines, buffered = buffered.split("\n")
            for line in lines:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"event": "not json", "text": line})
            self._changed.set()
            self._changed = anyio.Event()
        self.ended = True
        self._changed.set()

    async def wait(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        checked = 0
        while True:
            for line in self.lines[checked:]:
                if predicate(line):
                    return line
            checked = len(self.lines)
            if self.ended:
                raise AssertionError(f"{self.name} ended without logging what was awaited")
            await self._changed.wait()


@contextlib.asynccontextmanager
async def service(
    tg: anyio.abc.TaskGroup, name: str, argv: list[str]
) -> AsyncIterator[tuple[Logs, dict[str, Any]]]:
    """A service process (``argv``) with its logs pumped; yields the logs and the ready line.
    Stopped with SIGTERM at the end (it must exit cleanly)."""
    process = await anyio.open_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    logs = Logs(name)
    try:
        assert process.stderr is not None
        tg.start_soon(logs.pump, process.stderr)
        ready = await logs.wait(lambda line: line.get("event") == "ready")
        yield logs, ready
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    except BaseException:
        for line in logs.lines:  # what the process said, for the failure report
            print(name, json.dumps(line))
        raise
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


def _store_nodes(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("event") == "store nodes" and line.get("count") == count


@pytest.mark.anyio
async def test_store_nodes_find_each_other_through_the_dht_and_replicate(tmp_path: Path) -> None:
    alice, inbox = owner()
    with anyio.fail_after(TIMEOUT * 2):
        async with anyio.create_task_group() as tg, contextlib.AsyncExitStack() as stack:
            teia = [sys.executable, "-m", "teia"]
            _, discovery = await stack.enter_async_context(
                service(tg, "discovery", [*teia, "discovery", "--listen", LOOPBACK,
                        "--data-dir", str(tmp_path / "discovery"), "--log-format", "json"])
            )  # fmt: skip
            bootstrap = discovery["listen"].split(",")[0]
            stores: dict[PeerId, Logs] = {}
            for index in range(3):
                logs, ready = await stack.enter_async_context(
                    service(tg, f"store{index}", [*command(tmp_path / f"store{index}"),
                            "--bootstrap", bootstrap, "--membership-interval", "0.5",
                            "--anti-entropy-interval", "1", "--replication", "2"])
                )  # fmt: skip
                assert ready["membership"] == "dht"
                stores[PeerId.from_string(ready["peer_id"])] = logs
            # Each node finds all three store nodes (itself included) in the DHT, and only them.
            for logs in stores.values():
                line = await logs.wait(_store_nodes(3))
                assert set(line["peers"]) == {str(p) for p in stores}

            async with (
                Host(Identity.generate(), listen=[LOOPBACK], dial_timeout=2.0) as host,
                DhtNode(host, mode=Mode.CLIENT) as dht,
            ):
                assert await dht.bootstrap([Multiaddr(bootstrap)]) == 1
                membership = DhtMembership(dht)
                holders = await membership.nodes_for(inbox, 2)
                assert {n.peer_id for n in membership.store_nodes()} == set(stores)
                assert holders == responsible_nodes(inbox, membership.store_nodes(), 2)
                client = StoreClient(host, timeout=5.0)
                try:
                    # Replicated through the DHT-found holders: W = 2 of R = 2.
                    replicated = ReplicatedStoreClient(
                        client, membership, replication=2, write_quorum=2
                    )
                    first = envelope(inbox, b"through the dht")
                    assert (await replicated.deposit([first]))[first.message_id] == 2

                    # Deposited on one holder only: its anti-entropy (with the peers its DHT
                    # membership names) brings it to the other holder.
                    one, other = holders
                    second = envelope(inbox, b"one node only")
                    assert await client.deposit(one.peer_id, [second]) == [Status.OK]
                    await stores[one.peer_id].wait(
                        lambda line: (
                            line.get("event") == "anti-entropy round" and line.get("pushed", 0) >= 1
                        )
                    )
                    got = await client.fetch_all(other.peer_id, alice)
                    assert {e.message_id for e in got} == {first.message_id, second.message_id}
                finally:
                    await client.aclose()
            tg.cancel_scope.cancel()
