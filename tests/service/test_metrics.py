"""The metrics exporter: Prometheus text on GET /metrics, bounded against strangers."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import Counter

from teia.service.metrics import MetricsServer, new_registry

TIMEOUT = 10


async def request(port: int, raw: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(raw)
        data = bytearray()
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return bytes(data)


@pytest.mark.anyio
async def test_serves_metrics_and_refuses_the_rest() -> None:
    registry = new_registry()
    counter = Counter("teia_test_events", "events seen", registry=registry)
    counter.inc(3)
    with anyio.fail_after(TIMEOUT):
        async with MetricsServer(registry, "127.0.0.1", 0) as server:
            ok = await request(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK")
            assert b"teia_test_events_total 3.0" in ok
            head = await request(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert head.endswith(b"\r\n\r\n")
            missing = await request(server.port, b"GET /secrets HTTP/1.1\r\n\r\n")
            assert missing.startswith(b"HTTP/1.1 404")
            post = await request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405")
            garbage = await request(server.port, b"\x00\xff garbage\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400")
            oversize = await request(server.port, b"GET /" + b"a" * 20000)
            assert oversize.startswith(b"HTTP/1.1 400")
            # Still serving after all that.
            again = await request(server.port, b"GET / HTTP/1.0\r\n\r\n")
            assert b"teia_test_events_total" in again
