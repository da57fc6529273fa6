"""Services stop cleanly on SIGTERM, log structured lines, and expose metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

SERVICE = Path(__file__).with_name("demo_service.py")
TIMEOUT = 30


async def wait_for(stream: TextReceiveStream, needle: str, seen: list[str]) -> str:
    buffered = ""
    async for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        seen.extend(lines)
        for line in lines:
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} never logged; saw {seen}")


async def start(*settings: str) -> anyio.abc.Process:
    return await anyio.open_process(
        [sys.executable, str(SERVICE), *settings],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.anyio
async def test_sigterm_stops_gracefully_with_json_logs_and_metrics() -> None:
    seen: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with await start('log_format="json"', 'metrics="127.0.0.1:0"') as process:
            assert process.stderr is not None
            assert process.stdout is not None
            logs = TextReceiveStream(process.stderr)
            ready = json.loads(await wait_for(logs, '"event": "ready"', seen))
            assert ready["answer"] == 42
            assert ready["level"] == "info"
            assert ready["ts"].endswith("Z")
            async with await anyio.connect_tcp("127.0.0.1", ready["metrics_port"]) as http:
                await http.send(b"GET /metrics HTTP/1.1\r\n\r\n")
                body = b""
                while b"teia_build_info" not in body:
                    body += await http.receive()
            process.send_signal(signal.SIGTERM)
            await wait_for(logs, '"event": "stopped"', seen)
            assert await process.wait() == 0
            out = await process.stdout.receive()
            assert b"CLEANED UP" in out
    events = [json.loads(line)["event"] for line in seen if line.startswith("{")]
    assert events[:2] == ["starting", "ready"]
    assert "stopping" in events


@pytest.mark.anyio
async def test_a_cleanup_that_hangs_is_cut_short() -> None:
    seen: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with await start("slow_cleanup=60", "shutdown_timeout=0.5") as process:
            assert process.stderr is not None
            logs = TextReceiveStream(process.stderr)
            await wait_for(logs, " ready", seen)
            process.send_signal(signal.SIGTERM)
            await wait_for(logs, "took too long", seen)
            assert await process.wait() == 1
