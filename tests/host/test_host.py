"""Hosts on loopback: connect, ping, handlers by protocol, limits, shutdown."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import (
    ConnectionLimitExceeded,
    NotConnected,
    PeerIdMismatch,
    ProtocolNotSupported,
)
from teia.host.connmgr import ConnectionLimits
from teia.host.host import Host
from teia.host.streams import NegotiatedStream

TIMEOUT = 10
ECHO = "/teia/test-echo/1.0.0"


def new_host(**kwargs: object) -> Host:
    return Host(ed25519.Ed25519PrivateKey.generate(), **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def two_hosts(**b_kwargs: object) -> AsyncIterator[tuple[Host, Host]]:
    async with new_host() as a, new_host(**b_kwargs) as b:
        yield a, b


async def read_all(stream: NegotiatedStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)


@pytest.mark.anyio
async def test_connect_and_ping() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            connection = await a.connect(b.listen_addresses[0], peer_id=b.peer_id)
            assert connection.remote_peer.peer_id == b.peer_id
            rtts = await a.ping(b.peer_id, count=3)
            assert len(rtts) == 3
            # A second connect to a known peer reuses the connection.
            assert await a.connect(b.listen_addresses[0], peer_id=b.peer_id) is connection
            assert a.connections.peers() == [b.peer_id]
            assert b.connections.peers() == [a.peer_id]
            assert "/ipfs/ping/1.0.0" in b.protocols


@pytest.mark.anyio
async def test_handlers_by_protocol_see_the_remote_peer() -> None:
    seen: list[bytes | None] = []

    async def echo(stream: NegotiatedStream) -> None:
        seen.append(stream.remote_peer_id)
        await stream.send(await read_all(stream))

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, echo)
            await a.connect(b.listen_addresses[0])
            stream = await a.open_stream(b.peer_id, ["/teia/unknown/9.9.9", ECHO])
            assert stream.protocol == ECHO
            await stream.send(b"round trip")
            await stream.send_eof()
            assert await read_all(stream) == b"round trip"
            await stream.aclose()
            assert seen == [a.peer_id]

            b.remove_handler(ECHO)
            with pytest.raises(ProtocolNotSupported):
                await a.open_stream(b.peer_id, ECHO)
            with pytest.raises(NotConnected):
                await a.open_stream(b"\x00\x24" + b"\x01" * 36, ECHO)


@pytest.mark.anyio
async def test_a_failing_handler_does_not_hurt_the_connection() -> None:
    async def broken(stream: NegotiatedStream) -> None:
        raise RuntimeError("handler bug")

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, broken)
            await a.connect(b.listen_addresses[0], peer_id=b.peer_id)
            stream = await a.open_stream(b.peer_id, ECHO)
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
async def test_wrong_peer_id_is_refused() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b), new_host() as c:
            with pytest.raises(PeerIdMismatch):
                await a.connect(b.listen_addresses[0], peer_id=c.peer_id)
            assert a.connections.peers() == []


@pytest.mark.anyio
async def test_inbound_limit_closes_the_extra_connection() -> None:
    limits = ConnectionLimits(max_inbound=1)
    with anyio.fail_after(TIMEOUT):
        async with two_hosts(limits=limits) as (a, b), new_host() as c:
            await a.connect(b.listen_addresses[0], peer_id=b.peer_id)
            refused = await c.connect(b.listen_addresses[0], peer_id=b.peer_id)
            await refused.wait_closed()
            assert b.connections.peers() == [a.peer_id]
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
async def test_outbound_limit_raises() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            new_host(limits=ConnectionLimits(max_connections=1)) as a,
            new_host() as b,
            new_host() as c,
        ):
            await a.connect(b.listen_addresses[0])
            with pytest.raises(ConnectionLimitExceeded, match="max_connections"):
                await a.connect(c.listen_addresses[0])
            assert a.connections.peers() == [b.peer_id]


@pytest.mark.anyio
async def test_leaving_the_block_cancels_running_handlers() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def forever(stream: NegotiatedStream) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, forever)
            await a.connect(b.listen_addresses[0])
            await a.open_stream(b.peer_id, ECHO)
            await started.wait()
        assert cancelled.is_set()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.anyio
@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
async def test_dual_stack_host_dials_by_address_family() -> None:
    listen = [("127.0.0.1", 0), ("::1", 0)]
    with anyio.fail_after(TIMEOUT):
        async with new_host(listen=listen) as a, new_host(listen=listen) as b:
            v6 = next(address for address in b.listen_addresses if ":" in address[0])
            connection = await a.connect(v6, peer_id=b.peer_id)
            assert ":" in connection.remote_address[0]
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_smoke_on_asyncio() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            await a.connect(b.listen_addresses[0], peer_id=b.peer_id)
            assert len(await a.ping(b.peer_id, count=2)) == 2
            assert "/ipfs/ping/1.0.0" in (await a.identify(b.peer_id)).protocols
