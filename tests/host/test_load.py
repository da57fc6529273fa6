"""Hosts under load and abuse on loopback: many streams, big transfers, many connections, junk.

Every loop is bounded in count and time. Each abuse test also asserts that the host keeps
serving a well-behaved peer while it happens.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from teia.errors import TransportError
from teia.host.connmgr import ConnectionLimits
from teia.host.host import Host
from teia.host.streams import NegotiatedStream
from teia.identity import Identity
from teia.transport.quic import STREAM_WINDOW, QuicEndpoint

TIMEOUT = 60
ECHO = "/teia/test-echo/1.0.0"
SINK = "/teia/test-sink/1.0.0"
FIREHOSE = "/teia/test-firehose/1.0.0"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [
    pytest.param("/ip4/127.0.0.1/udp/0/quic-v1", id="ipv4"),
    pytest.param(
        "/ip6/::1/udp/0/quic-v1",
        id="ipv6",
        marks=pytest.mark.skipif(not _has_ipv6(), reason="this machine has no IPv6 loopback"),
    ),
]


async def read_all(stream: NegotiatedStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)


async def echo(stream: NegotiatedStream) -> None:
    await stream.send(await read_all(stream))
    await stream.send_eof()


async def sink(stream: NegotiatedStream) -> None:
    """Hash everything received; answer with the byte count and the SHA-256."""
    digest, count = hashlib.sha256(), 0
    while True:
        try:
            chunk = await stream.receive()
        except anyio.EndOfStream:
            break
        digest.update(chunk)
        count += len(chunk)
    await stream.send(count.to_bytes(8, "big") + digest.digest())
    await stream.send_eof()


@asynccontextmanager
async def server_and_client(listen: str, **server: object) -> AsyncIterator[tuple[Host, Host]]:
    async with (
        Host(Identity.generate(), listen=[listen], **server) as b,  # type: ignore[arg-type]
        Host(Identity.generate(), listen=[listen]) as a,
    ):
        b.set_handler(ECHO, echo)
        b.set_handler(SINK, sink)
        await a.connect(b.addrs[0])
        yield a, b


@pytest.mark.anyio
@pytest.mark.parametrize("listen", FAMILIES)
async def test_100_concurrent_streams_echo_intact(listen: str) -> None:
    results: dict[int, bytes] = {}

    async def one(a: Host, b: Host, index: int) -> None:
        payload = os.urandom(8 * 1024) + index.to_bytes(4, "big")
        stream = await a.open_stream(b.peer_id, ECHO)
        await stream.send(payload)
        await stream.send_eof()
        results[index] = await read_all(stream)
        assert results[index] == payload
        await stream.aclose()

    with anyio.fail_after(TIMEOUT):
        async with server_and_client(listen) as (a, b), anyio.create_task_group() as tg:
            for index in range(100):
                tg.start_soon(one, a, b, index)
    assert len(results) == 100


@pytest.mark.anyio
@pytest.mark.parametrize("listen", FAMILIES)
async def test_10_megabytes_arrive_intact(listen: str) -> None:
    total = 10 * 1024 * 1024
    block = os.urandom(64 * 1024)
    expected = hashlib.sha256()
    with anyio.fail_after(TIMEOUT):
        async with server_and_client(listen) as (a, b):
            stream = await a.open_stream(b.peer_id, SINK)
            for _ in range(total // len(block)):
                await stream.send(block)
                expected.update(block)
            await stream.send_eof()
            answer = await read_all(stream)
            await stream.aclose()
    assert int.from_bytes(answer[:8], "big") == total
    assert answer[8:] == expected.digest()


@pytest.mark.anyio
async def test_200_concurrent_connections_to_one_host() -> None:
    clients = 200
    limits = ConnectionLimits(max_connections=clients + 8, max_inbound=clients + 8)
    handshakes = anyio.Semaphore(32)  # many at once, below the endpoint's half-open cap
    connected = 0
    all_connected = anyio.Event()
    all_pinged = anyio.Event()
    release = anyio.Event()
    rtts: list[float] = []

    async def client(server: Host) -> None:
        nonlocal connected
        # Each client in its own task: 200 hosts side by side, not 200 nested contexts.
        async with Host(Identity.generate(), keep_alive=None) as host:
            async with handshakes:
                await host.connect(server.addrs[0])
            connected += 1
            if connected == clients:
                all_connected.set()
            await all_connected.wait()
            rtts.extend(await host.ping(server.peer_id))
            if len(rtts) == clients:
                all_pinged.set()
            await release.wait()

    with anyio.fail_after(TIMEOUT * 2):
        async with (
            Host(Identity.generate(), limits=limits) as server,
            anyio.create_task_group() as tg,
        ):
            for _ in range(clients):
                tg.start_soon(client, server)
            await all_connected.wait()
            # All 200 are open at once, and each one carries a ping.
            await all_pinged.wait()
            assert len(server.connections) == clients
            release.set()
    assert len(rtts) == clients


@pytest.mark.anyio
async def test_garbage_datagrams_do_not_disturb_the_host() -> None:
    junk_sizes = [0, 1, 5, 20, 1199, 1200, 1500, 9000]
    with anyio.fail_after(TIMEOUT):
        async with server_and_client("/ip4/127.0.0.1/udp/0/quic-v1") as (a, b):
            target = b.listen_addrs[0].to_udp_address()
            async with await anyio.create_udp_socket(
                family=socket.AF_INET, local_host="127.0.0.1"
            ) as junk:
                for round_ in range(50):
                    for size in junk_sizes:
                        data = bytearray(os.urandom(size))
                        if data and round_ % 2:
                            data[0] = 0xC0 | (data[0] & 0x0F)  # looks like a long header
                        await junk.sendto(bytes(data), *target)
                    assert len(await a.ping(b.peer_id)) == 1
            # Still accepting new peers too.
            async with Host(Identity.generate()) as c:
                await c.connect(b.addrs[0])
                assert len(await c.ping(b.peer_id)) == 1


@pytest.mark.anyio
async def test_a_peer_opening_streams_without_limit_is_held_to_the_stream_limit() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            server_and_client("/ip4/127.0.0.1/udp/0/quic-v1", negotiation_timeout=30) as (a, b),
            QuicEndpoint(Identity.generate().private_key) as abuser,
        ):
            connection = await abuser.connect(b.listen_addrs[0].to_udp_address())
            # 1000 streams that say one byte and never finish negotiating.
            for _ in range(1000):
                stream = await connection.open_stream()
                await stream.send(b"\x01")
            await anyio.wait_all_tasks_blocked()
            (served,) = b.connections.connections_to(abuser.peer_id)
            # QUIC stream credit (128 concurrent bidirectional streams) bounds what reached b.
            assert len(served._streams) <= 128
            # Meanwhile everyone else is served.
            assert len(await a.ping(b.peer_id, count=3)) == 3
            await connection.aclose()


@pytest.mark.anyio
async def test_a_peer_that_stops_reading_only_stalls_its_own_stream() -> None:
    sent = 0
    stalled = anyio.Event()

    async def firehose(stream: NegotiatedStream) -> None:
        nonlocal sent
        chunk = b"\xab" * 65536
        for _ in range(1024):  # at most 64 MiB, far beyond any window
            await stream.send(chunk)
            sent += len(chunk)
        stalled.set()

    with anyio.fail_after(TIMEOUT):
        async with server_and_client("/ip4/127.0.0.1/udp/0/quic-v1") as (a, b):
            b.set_handler(FIREHOSE, firehose)
            stream = await a.open_stream(b.peer_id, FIREHOSE)
            await stream.send(b"go")
            await anyio.wait_all_tasks_blocked()
            # a never reads: b's handler is held back by flow control, not buffering without end.
            assert 0 < sent <= 3 * STREAM_WINDOW
            assert not stalled.is_set()
            # Other streams and peers are unaffected.
            assert len(await a.ping(b.peer_id, count=3)) == 3
            async with Host(Identity.generate()) as c:
                await c.connect(b.addrs[0])
                assert len(await c.ping(b.peer_id)) == 1
            await stream.aclose()


async def drain(stream: anyio.abc.ByteReceiveStream) -> None:
    """Read until the stream ends (or fails); the host closes a stream it cannot negotiate."""
    for _ in range(1000):
        await stream.receive()


@pytest.mark.anyio
async def test_malformed_negotiation_and_identify_answers_do_not_disturb_the_host() -> None:
    from teia.errors import InvalidProtobuf
    from teia.host.identify import IDENTIFY_PROTOCOL

    async def lying_identify(stream: NegotiatedStream) -> None:
        await stream.send(b"\x05\xff\xff\xff\xff\xff")  # a length prefix, then no valid protobuf
        await stream.send_eof()

    with anyio.fail_after(TIMEOUT):
        async with (
            server_and_client("/ip4/127.0.0.1/udp/0/quic-v1") as (a, b),
            QuicEndpoint(Identity.generate().private_key) as abuser,
        ):
            connection = await abuser.connect(b.listen_addrs[0].to_udp_address())
            # Garbage where multistream-select is expected, and an oversize multistream line.
            for junk in (b"\xff\xff\xff\xff", b"\x13/multistream/1.0.0\n" + b"\x7f" + b"x" * 200):
                stream = await connection.open_stream()
                await stream.send(junk)
                await stream.send_eof()
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, TransportError)):
                    await drain(stream)
            # A peer whose identify answer is malformed: a typed error for the asker only.
            a.set_handler(IDENTIFY_PROTOCOL, lying_identify)
            with pytest.raises(InvalidProtobuf):
                await b.identify(a.peer_id)
            assert len(await a.ping(b.peer_id, count=2)) == 2
            assert len(await b.ping(a.peer_id, count=2)) == 2
            await connection.aclose()
