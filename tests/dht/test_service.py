"""``teia discovery`` and ``teia lookup`` as operators run them: processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from teia.dht.core import Mode
from teia.dht.node import DhtNode
from teia.host.host import Host
from teia.identity import Identity

pytestmark = pytest.mark.anyio

TEIA = str(Path(sys.executable).with_name("teia"))
TIMEOUT = 90


class Logs:
    """JSON log lines from a service's stderr, kept across calls."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stderr is not None
        self._text = TextReceiveStream(process.stderr)
        self._buffered = ""
        self.seen: list[dict[str, object]] = []

    async def wait(self, event: str) -> dict[str, object]:
        for line in self.seen:
            if line.get("event") == event:
                return line
        while True:
            try:
                self._buffered += await self._text.receive()
            except anyio.EndOfStream:
                raise AssertionError(f"service ended before logging {event!r}") from None
            *lines, self._buffered = self._buffered.split("\n")
            for text in lines:
                if not text.startswith("{"):
                    continue
                line = json.loads(text)
                self.seen.append(line)
                if line.get("event") == event:
                    return line


@asynccontextmanager
async def discovery(data_dir: Path, *args: str) -> AsyncIterator[tuple[anyio.abc.Process, Logs]]:
    command = [
        TEIA, "discovery", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
        "--log-format", "json", "--metrics", "127.0.0.1:0", "--request-timeout", "3", *args,
    ]  # fmt: skip
    process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process, Logs(process)
    finally:
        if process.returncode is None:
            process.terminate()
        with anyio.CancelScope(shield=True), anyio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def scrape(port: int) -> str:
    async with await anyio.connect_tcp("127.0.0.1", port) as http:
        await http.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        body = b""
        while True:
            try:
                body += await http.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return body.decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_two_discovery_nodes_a_lookup_and_a_restart(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with discovery(tmp_path / "a") as (a_proc, a_logs):
            a_ready = await a_logs.wait("ready")
            a_addr = str(a_ready["listen"]).split(",")[0]
            async with discovery(tmp_path / "b", "--bootstrap", a_addr) as (_, b_logs):
                b_ready = await b_logs.wait("ready")
                await b_logs.wait("joined")
                b_id = str(b_ready["peer_id"])
                # A peer publishes its record through the pair; `teia lookup` finds it.
                async with (
                    Host(Identity.generate()) as host,
                    DhtNode(host, mode=Mode.CLIENT) as peer,
                ):
                    assert await peer.bootstrap([a_addr]) == 1
                    assert await peer.publish_record() >= 1
                    done = await anyio.run_process(
                        [TEIA, "lookup", str(host.peer_id), "--bootstrap", a_addr, "--json"],
                        check=False,
                    )
                    assert done.returncode == 0, done.stderr.decode()
                    report = json.loads(done.stdout)
                    assert report["addrs"] == [str(host.listen_addrs[0])]
                    assert report["record"]["seq"] > 0
                # The discovery node B is found too, and the metrics say what A holds.
                found = await anyio.run_process(
                    [TEIA, "lookup", b_id, "--bootstrap", a_addr], check=False
                )
                assert found.returncode == 0, found.stderr.decode()
                assert found.stdout.decode().startswith("/ip4/127.0.0.1/udp/")
                text = await scrape(int(str(a_ready["metrics_port"])))
                assert metric(text, "teia_dht_routing_table_peers") >= 1
                assert metric(text, "teia_dht_records") >= 2
                assert 'teia_dht_requests_total{type="FIND_NODE"}' in text
                unknown = await anyio.run_process(
                    [TEIA, "lookup", str(Identity.generate().peer_id), "--bootstrap", a_addr],
                    check=False,
                )
                assert unknown.returncode == 1
            a_proc.send_signal(signal.SIGTERM)
            await a_logs.wait("stopped")
            assert await a_proc.wait() == 0
        # A restarted node keeps its peer ID and comes back with its table and records.
        async with discovery(tmp_path / "a") as (_, again):
            ready = await again.wait("ready")
            assert ready["peer_id"] == a_ready["peer_id"]
            assert int(str(ready["routing_table"])) >= 1
            assert int(str(ready["records"])) >= 2


async def test_help_and_bad_settings(tmp_path: Path) -> None:
    helped = await anyio.run_process([TEIA, "discovery", "--help"])
    assert b"--bootstrap" in helped.stdout
    assert b"--data-dir" in helped.stdout
    bad = await anyio.run_process(
        [TEIA, "discovery", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/1.2.3.4/udp/1"],
        check=False,
    )
    assert bad.returncode == 1
    assert b"bootstrap" in bad.stderr
    assert b"Traceback" not in bad.stderr
