"""Processes in the lab: the relay and discovery node on the public segment, agents in sites.

Every process is started with ``ip netns exec`` and killed on the way out (the lab's clean-up
kills anything left). Waits for output are bounded.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .lab import DISCOVERY_IP, LAB_NETWORK, RELAY_IP, NatLab, Site

AGENT = str(Path(__file__).with_name("agent.py"))
TEIA = str(Path(sys.executable).with_name("teia"))
RELAY_SECRET = "nat-lab-relay-secret"
RELAY_PORT = 3478
DISCOVERY_PORT = 4001
START_TIMEOUT = 30.0


class LineReader:
    """Lines from a process's output stream, one at a time."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> str:
        while b"\n" not in self._buffer:
            self._buffer += await self._stream.receive()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@dataclass
class LabServices:
    relay: str
    """``IP:PORT`` of the relay's STUN/TURN port."""
    discovery: str
    """The discovery node's ``…/quic-v1/p2p/<id>``."""


async def _stop(process: anyio.abc.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        await process.wait()


async def _wait_ready(process: anyio.abc.Process, name: str) -> None:
    """Until the service logs its ``ready`` event (JSON logs on stderr)."""
    assert process.stderr is not None
    reader = LineReader(process.stderr)
    seen: list[str] = []
    try:
        with anyio.fail_after(START_TIMEOUT):
            while True:
                line = await reader.line()
                seen.append(line)
                if '"ready"' in line:
                    return
    except (TimeoutError, anyio.EndOfStream):
        raise RuntimeError(f"{name} did not get ready:\n" + "\n".join(seen[-20:])) from None


@asynccontextmanager
async def lab_services(lab: NatLab, tmp_path: Path) -> AsyncIterator[LabServices]:
    """``teia relay`` and ``teia discovery`` on the public segment."""
    relay_dir, discovery_dir = tmp_path / "relay", tmp_path / "discovery"
    printed = await anyio.run_process(
        lab.command(
            lab.public, TEIA, "discovery", "--print-peer-id", "--data-dir", str(discovery_dir)
        )
    )
    peer_id = printed.stdout.decode().strip().splitlines()[-1]
    relay = await anyio.open_process(
        lab.command(
            lab.public,
            TEIA,
            "relay",
            "--log-format",
            "json",
            "--listen",
            f"{RELAY_IP}:{RELAY_PORT}",
            "--no-tcp",
            "--auth-secret",
            RELAY_SECRET,
            "--allow-peer",
            LAB_NETWORK,
            "--data-dir",
            str(relay_dir),
        )
    )
    try:
        discovery = await anyio.open_process(
            lab.command(
                lab.public,
                TEIA,
                "discovery",
                "--log-format",
                "json",
                "--listen",
                f"/ip4/{DISCOVERY_IP}/udp/{DISCOVERY_PORT}/quic-v1",
                "--data-dir",
                str(discovery_dir),
            )
        )
        try:
            await _wait_ready(relay, "teia relay")
            await _wait_ready(discovery, "teia discovery")
            yield LabServices(
                relay=f"{RELAY_IP}:{RELAY_PORT}",
                discovery=f"/ip4/{DISCOVERY_IP}/udp/{DISCOVERY_PORT}/quic-v1/p2p/{peer_id}",
            )
        finally:
            await _stop(discovery)
    finally:
        await _stop(relay)


class Agent:
    """A host in a site (tests/nat/agent.py), driven one JSON command at a time."""

    def __init__(self, process: anyio.abc.Process, ready: dict[str, Any]) -> None:
        self.addrs: list[str] = ready.get("addrs", [])
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self.peer_id: str = ready["peer_id"]
        self.relayed: list[str] = ready["relayed"]
        self.candidates: list[str] = ready["candidates"]
        self._stdin = process.stdin
        self._stdout = LineReader(process.stdout)

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        await self._stdin.send((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        timeout = float(args.get("timeout", 10)) + 10
        with anyio.fail_after(timeout):
            answer: dict[str, Any] = json.loads(await self._stdout.line())
        return answer


@asynccontextmanager
async def agent(
    lab: NatLab, site: Site, services: LabServices, **options: Any
) -> AsyncIterator[Agent]:
    """An agent on ``site``'s host, ready (allocated on the relay, identified by discovery);
    a chat peer with its profile in ``dir`` when that option is given."""
    config = {
        "ip": site.private_ip,
        "relay": services.relay,
        "secret": RELAY_SECRET,
        "discovery": services.discovery,
        "allow": [LAB_NETWORK],
        **options,
    }
    process = await anyio.open_process(
        lab.command(site.host, sys.executable, AGENT, json.dumps(config))
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        reader = LineReader(process.stdout)
        try:
            with anyio.fail_after(START_TIMEOUT):
                ready = json.loads(await reader.line())
        except (TimeoutError, anyio.EndOfStream):
            await _stop(process)
            errors = b""
            with (
                contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError),
                anyio.move_on_after(5),
            ):
                while True:
                    errors += await process.stderr.receive()
            raise RuntimeError(
                f"agent on site {site.index} did not start:\n{errors.decode()}"
            ) from None
        made = Agent(process, ready)
        made._stdout = reader
        yield made
    finally:
        if process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await process.stdin.aclose()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await process.wait()
        await _stop(process)
