"""``teia store`` for real: a process on loopback that takes deposits, serves metrics, stops on
SIGTERM and keeps its envelopes and identity across a restart; configuration errors."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from teia.identity import Multiaddr
from teia.store import Status

from .helpers import client_host, envelope, owner

TIMEOUT = 60


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
        (["--bootstrap", "/ip4/127.0.0.1/udp/1/quic-v1"], "does not name the store node"),
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
