"""Prometheus metrics for services: a registry per service and a small HTTP exporter on anyio.

Metrics are metadata only: counts, sizes, durations, gauges of table sizes. Never a peer's
message content, keys or tokens, and no label whose values a stranger chooses freely (that
would let anyone grow our memory): labels take values from small fixed sets.

The exporter answers ``GET /metrics`` (and ``/``) with the text exposition format; anything
else gets 404/405. It bounds what a client can make it do: request head size, time to send
it, and concurrent clients.
"""

from __future__ import annotations

import contextlib

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["MetricsServer", "new_registry"]

_MAX_HEAD = 8 * 1024
_READ_TIMEOUT = 5.0
_MAX_CLIENTS = 16


def new_registry() -> CollectorRegistry:
    """A fresh registry (services never use the process-global default one)."""
    return CollectorRegistry(auto_describe=True)


class MetricsServer:
    """Serve ``registry`` over HTTP on ``host:port`` until cancelled.

    ``async with MetricsServer(registry, "127.0.0.1", 0) as server`` binds at once (so
    ``server.port`` is known) and serves in the background until the block ends.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._clients = anyio.Semaphore(_MAX_CLIENTS)

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("metrics server is not running")
        return int(self._listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610

    async def __aenter__(self) -> MetricsServer:
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        self._listener = listener
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._serve)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task_group is not None
        assert self._listener is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        await self._listener.aclose()

    async def _serve(self) -> None:
        assert self._listener is not None
        await self._listener.serve(self._admit)

    async def _admit(self, client: anyio.abc.SocketStream) -> None:
        if self._clients.value == 0:
            await client.aclose()  # too many at once; Prometheus retries
            return
        await self._handle(client)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with self._clients, client:
            head = bytearray()
            with anyio.move_on_after(_READ_TIMEOUT):
                while b"\r\n\r\n" not in head and len(head) <= _MAX_HEAD:
                    try:
                        head += await client.receive(4096)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
            if b"\r\n\r\n" not in head:
                await self._respond(client, 400, b"request head too large or too slow\n")
                return
            request_line = bytes(head).split(b"\r\n", 1)[0].split()
            if len(request_line) != 3:
                await self._respond(client, 400, b"bad request\n")
                return
            method, target = request_line[0], request_line[1].split(b"?", 1)[0]
            if target not in (b"/metrics", b"/"):
                await self._respond(client, 404, b"not found; try /metrics\n")
            elif method not in (b"GET", b"HEAD"):
                await self._respond(client, 405, b"method not allowed\n")
            else:
                body = generate_latest(self._registry)
                await self._respond(
                    client, 200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD"
                )

    @staticmethod
    async def _respond(
        client: anyio.abc.SocketStream,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await client.send(head if head_only else head + body)
