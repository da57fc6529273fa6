"""QUIC endpoints on loopback: libp2p handshake, peer IDs, streams, refusals."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from aioquic import tls as aioquic_tls
from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicProtocolVersion, pull_quic_header
from aioquic.quic.recovery import QuicPacketPacer
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import (
    ConnectionClosed,
    HandshakeFailed,
    InvalidCertificate,
    PeerIdMismatch,
    StreamReset,
)
from teia.transport.quic import (
    STREAM_WINDOW,
    QuicConnectionHandle,
    QuicEndpoint,
    QuicStream,
    _BurstPacer,
    _Libp2pQuicConnection,
)
from teia.transport.tls import generate_certificate, peer_id_of

TIMEOUT = 10


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@asynccontextmanager
async def endpoints(host: str = "127.0.0.1") -> AsyncIterator[tuple[QuicEndpoint, QuicEndpoint]]:
    async with (
        QuicEndpoint(ed25519.Ed25519PrivateKey.generate(), host=host) as a,
        QuicEndpoint(ed25519.Ed25519PrivateKey.generate(), host=host) as b,
    ):
        yield a, b


async def read_all(stream: QuicStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)


async def connect_pair(
    a: QuicEndpoint, b: QuicEndpoint
) -> tuple[QuicConnectionHandle, QuicConnectionHandle]:
    dialed = await a.connect(b.local_address, expected_peer_id=b.peer_id)
    accepted = await b.accept()
    return dialed, accepted


async def echo_upper(connection: QuicConnectionHandle) -> None:
    while True:
        try:
            stream = await connection.accept_stream()
        except ConnectionClosed:
            return
        data = await read_all(stream)
        await stream.send(data.upper())
        await stream.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param("::1", marks=pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")),
    ],
)
async def test_connect_learns_peer_ids_and_exchanges_a_stream(host: str) -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints(host) as (a, b), anyio.create_task_group() as tg:
            dialed, accepted = await connect_pair(a, b)
            assert dialed.remote_peer.peer_id == b.peer_id
            assert accepted.remote_peer.peer_id == a.peer_id
            assert accepted.remote_address == a.local_address
            tg.start_soon(echo_upper, accepted)
            stream = await dialed.open_stream()
            await stream.send(b"hello ")
            await stream.send(b"teia")
            await stream.send_eof()
            assert await read_all(stream) == b"HELLO TEIA"
            await stream.aclose()
            await dialed.aclose()


@pytest.mark.anyio
async def test_many_streams_and_a_megabyte_both_ways() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: several flow-control windows' worth
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b), anyio.create_task_group() as tg:
            dialed, accepted = await connect_pair(a, b)
            tg.start_soon(echo_upper, accepted)
            results: dict[int, bytes] = {}

            async def one(i: int, data: bytes) -> None:
                stream = await dialed.open_stream()
                await stream.send(data)
                await stream.send_eof()
                results[i] = await read_all(stream)
                await stream.aclose()

            async with anyio.create_task_group() as streams:
                for i in range(20):
                    streams.start_soon(one, i, f"stream {i}".encode())
                streams.start_soon(one, 99, payload)
            assert results[99] == payload.upper()
            assert all(results[i] == f"STREAM {i}".encode() for i in range(20))
            await dialed.aclose()


@pytest.mark.anyio
async def test_dialing_the_wrong_peer_id_fails_clearly() -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            someone_else = peer_id_of(ed25519.Ed25519PrivateKey.generate().public_key())
            with pytest.raises(PeerIdMismatch, match="different peer ID"):
                await a.connect(b.local_address, expected_peer_id=someone_else)
            # The endpoints still work afterwards.
            dialed, accepted = await connect_pair(a, b)
            assert accepted.remote_peer.peer_id == a.peer_id
            await dialed.aclose()


@pytest.mark.anyio
async def test_expired_certificate_is_refused_by_the_dialer() -> None:
    def far_future() -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * 200)

    with anyio.fail_after(TIMEOUT):
        async with (
            QuicEndpoint(ed25519.Ed25519PrivateKey.generate()) as server,
            QuicEndpoint(ed25519.Ed25519PrivateKey.generate(), clock=far_future) as client,
        ):
            with pytest.raises(InvalidCertificate, match="expired"):
                await client.connect(server.local_address)


@pytest.mark.anyio
async def test_client_without_certificate_is_refused_by_the_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            original = a._configuration

            def no_certificate(*, is_client: bool):  # type: ignore[no-untyped-def]
                configuration = original(is_client=is_client)
                configuration.certificate = None
                configuration.private_key = None
                return configuration

            monkeypatch.setattr(a, "_configuration", no_certificate)
            # The client finishes its side first (TLS 1.3), then learns of the refusal.
            try:
                dialed = await a.connect(b.local_address)
            except HandshakeFailed as exc:
                reason = str(exc)
            else:
                await dialed.wait_closed()
                reason = dialed.close_reason
            assert "certificate" in reason


@pytest.mark.anyio
async def test_closing_a_connection_ends_the_peers_streams() -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            dialed, accepted = await connect_pair(a, b)
            stream = await dialed.open_stream()
            await stream.send(b"x")
            incoming = await accepted.accept_stream()
            assert await incoming.receive() == b"x"
            await dialed.aclose()
            with pytest.raises(ConnectionClosed):
                await incoming.receive()
            with pytest.raises(ConnectionClosed):
                await accepted.accept_stream()
            with pytest.raises(ConnectionClosed):
                await dialed.open_stream()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_smoke_on_asyncio() -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b), anyio.create_task_group() as tg:
            dialed, accepted = await connect_pair(a, b)
            tg.start_soon(echo_upper, accepted)
            stream = await dialed.open_stream()
            await stream.send(b"asyncio")
            await stream.send_eof()
            assert await read_all(stream) == b"ASYNCIO"
            await dialed.aclose()


@pytest.mark.anyio
async def test_a_reader_that_does_not_read_pushes_back_on_the_writer() -> None:
    total = 8 * 1024 * 1024
    chunk = bytes(range(256)) * 256  # 64 KiB
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b), anyio.create_task_group() as tg:
            dialed, accepted = await connect_pair(a, b)
            stream = await dialed.open_stream()
            written = 0

            async def writer() -> None:
                nonlocal written
                while written < total:
                    await stream.send(chunk)
                    written += len(chunk)
                await stream.send_eof()

            tg.start_soon(writer)
            incoming = await accepted.accept_stream()
            await anyio.wait_all_tasks_blocked()
            # Nobody reads: the writer is held back by flow control, not buffered without end.
            assert written < 3 * STREAM_WINDOW
            assert len(incoming._state.buffer) <= STREAM_WINDOW
            received = bytearray()
            while True:
                try:
                    received += await incoming.receive()
                except anyio.EndOfStream:
                    break
                assert len(incoming._state.buffer) <= STREAM_WINDOW
            assert len(received) == total
            assert bytes(received[: len(chunk)]) == chunk
            assert bytes(received[-len(chunk) :]) == chunk
            await dialed.aclose()


@pytest.mark.anyio
async def test_reset_aborts_both_directions() -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            dialed, accepted = await connect_pair(a, b)
            stream = await dialed.open_stream()
            await stream.send(b"partial")
            incoming = await accepted.accept_stream()
            assert await incoming.receive() == b"partial"
            stream.reset(7)
            with pytest.raises(StreamReset, match="0x7"):
                await incoming.receive()
            with pytest.raises(StreamReset):
                await incoming.send(b"too late")
            with pytest.raises(anyio.ClosedResourceError):
                await stream.receive()
            await dialed.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("keep_alive", [None, 0.1])
async def test_idle_timeout_and_keep_alive(keep_alive: float | None) -> None:
    idle = 0.5
    with anyio.fail_after(TIMEOUT):
        async with (
            QuicEndpoint(
                ed25519.Ed25519PrivateKey.generate(), idle_timeout=idle, keep_alive=keep_alive
            ) as a,
            QuicEndpoint(
                ed25519.Ed25519PrivateKey.generate(), idle_timeout=idle, keep_alive=None
            ) as b,
        ):
            dialed, _accepted = await connect_pair(a, b)
            if keep_alive is None:
                await dialed.wait_closed()  # closes on its own once idle
                assert dialed.is_closed
            else:
                # Observing elapsed time, not synchronising: four idle periods pass, still open.
                with anyio.move_on_after(4 * idle):
                    await dialed.wait_closed()
                assert not dialed.is_closed
                await dialed.aclose()


async def _silent_client_initial(target: tuple[str, int]) -> None:
    """Send one client Initial to ``target`` from a fresh socket, then never answer."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=["libp2p"])
    )
    quic.connect(target, now=anyio.current_time())
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
        for data, (host, port) in quic.datagrams_to_send(now=anyio.current_time()):
            await udp.sendto(data, host, port)


@pytest.mark.anyio
async def test_half_open_connections_time_out_and_are_capped() -> None:
    with anyio.fail_after(TIMEOUT):
        async with QuicEndpoint(
            ed25519.Ed25519PrivateKey.generate(), handshake_timeout=0.3, max_handshaking=1
        ) as server:
            await _silent_client_initial(server.local_address)
            await _silent_client_initial(server.local_address)
            await anyio.wait_all_tasks_blocked()
            assert len(server._connections) == 1  # the second Initial was dropped
            (half_open,) = server._connections
            await half_open.wait_closed()
            assert "timed out" in half_open.close_reason
            assert not server._connections


def _long_header(version: int, dcid: bytes, scid: bytes, size: int) -> bytes:
    head = bytes([0xC0]) + version.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    return head + b"\x00" * (size - len(head))


@pytest.mark.anyio
async def test_unknown_versions_get_version_negotiation_without_amplification() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            QuicEndpoint(ed25519.Ed25519PrivateKey.generate()) as endpoint,
            await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1") as client,
        ):
            dcid, scid = b"\x11" * 8, b"\x22" * 8
            target = endpoint.local_address
            # Too small to answer (an answer could amplify a spoofed source): silence.
            await client.sendto(_long_header(0x1A2A3A4A, dcid, scid, 300), *target)
            # Full-size: answered with Version Negotiation listing QUIC v1.
            await client.sendto(_long_header(0x1A2A3A4A, dcid, scid, 1200), *target)
            answer, _ = await client.receive()
    header = pull_quic_header(Buffer(data=answer), host_cid_length=8)
    assert header.version == QuicProtocolVersion.NEGOTIATION
    assert header.destination_cid == scid
    assert header.source_cid == dcid
    assert QuicProtocolVersion.VERSION_1 in header.supported_versions
    assert len(answer) < 100


def _burst(pacer: QuicPacketPacer, now: float = 1.0) -> int:
    """Packets the pacer lets go back to back from a full bucket."""
    pacer.update_bucket(now=now)
    sent = 0
    while pacer.next_send_time(now=now) is None and sent < 100:
        pacer.update_after_send(now=now)
        sent += 1
    return sent


def test_pacer_keeps_full_bursts_at_loopback_rates() -> None:
    # A window of 10 000 packets over a 1 ms round trip: aioquic floors the time per packet at
    # 1 µs, and its own pacer then allows one or two packets per wake-up.
    window, rtt = 10_000 * 1200, 0.001
    plain, ours = QuicPacketPacer(max_datagram_size=1200), _BurstPacer(max_datagram_size=1200)
    plain.update_rate(window, rtt)
    ours.update_rate(window, rtt)
    assert _burst(plain) <= 2
    assert _burst(ours) == 16


def test_pacer_is_aioquics_own_at_ordinary_rates() -> None:
    for window, rtt in ((40 * 1200, 0.01), (4 * 1200, 0.05), (200 * 1200, 0.002)):
        plain, ours = QuicPacketPacer(max_datagram_size=1200), _BurstPacer(max_datagram_size=1200)
        plain.update_rate(window, rtt)
        ours.update_rate(window, rtt)
        assert ours.bucket_max == pytest.approx(plain.bucket_max)
        assert _burst(ours) == _burst(plain)


@pytest.mark.anyio
async def test_a_write_leaves_at_once_and_one_the_socket_cannot_take_waits() -> None:
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b), anyio.create_task_group() as tg:
            dialed, accepted = await connect_pair(a, b)
            tg.start_soon(echo_upper, accepted)
            # A write goes out from the writer's own step: built and sent before it yields.
            stream = await dialed.open_stream()
            sent: list[int] = []
            original = a._send_datagrams_now

            def counting(
                datagrams: list[tuple[bytes, tuple[str, int]]],
            ) -> list[tuple[bytes, tuple[str, int]]]:
                sent.append(len(datagrams))
                return original(datagrams)

            a._send_datagrams_now = counting  # type: ignore[method-assign]
            await stream.send(b"first ")
            assert sent
            assert sent[0] >= 1
            # While another task sends through the event loop, what a write built is kept for
            # the driver, in order, and goes out once the socket is free.
            async with a._send_lock:
                dialed._send_stream_data(stream.stream_id, b"second", end_stream=True)
                assert dialed._backlog
                assert sent[-1] == len(dialed._backlog)
            assert await read_all(stream) == b"FIRST SECOND"
            assert not dialed._backlog
            await dialed.aclose()


@pytest.mark.anyio
async def test_a_reader_woken_by_a_datagram_runs_before_its_drivers_pass() -> None:
    """Trio runs a batch of woken tasks in either order; the driver yields once after waking,
    so the reader a datagram woke always goes first (its answer leaves from its own step)."""
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            dialed, accepted = await connect_pair(a, b)
            log: list[str] = []
            quic = accepted._quic
            original = quic.datagrams_to_send

            def logged(now: float) -> list[tuple[bytes, tuple[str, int]]]:
                log.append("driver")
                return original(now=now)

            quic.datagrams_to_send = logged  # type: ignore[method-assign]
            received = quic.receive_datagram

            def logged_rx(data: bytes, addr: tuple[str, int], now: float) -> None:
                log.append("rx")
                received(data, addr, now=now)

            quic.receive_datagram = logged_rx  # type: ignore[method-assign]
            stream = await dialed.open_stream()
            await stream.send(b"open")
            served = await accepted.accept_stream()
            assert await served.receive() == b"open"
            driver_first = 0
            for index in range(40):
                log.clear()
                await stream.send(b"%d" % index)  # one datagram: wakes the reader and driver
                assert await served.receive() == b"%d" % index
                log.append("reader")
                await served.send(b"ok")
                assert await stream.receive() == b"ok"
                after = log[log.index("rx") + 1 :]
                driver = after.index("driver") if "driver" in after else len(after)
                driver_first += driver < after.index("reader")
            # Without the yield the driver went first in about half the exchanges (it can now
            # only when a pass of its was already due as the datagram came).
            assert driver_first < 10
            await dialed.aclose()


@pytest.mark.anyio
async def test_a_new_stream_on_a_closing_connection_is_dropped_not_raised() -> None:
    """Events are handed over from the endpoint's receive loop too: a stream the peer opens as
    this side stops taking streams must not take the loop down."""
    with anyio.fail_after(TIMEOUT):
        async with endpoints() as (a, b):
            dialed, accepted = await connect_pair(a, b)
            accepted._incoming_send.close()  # as `_check_closing` does when closing starts
            remote_stream = 0  # the dialer's first bidirectional stream
            accepted._handle_event(
                events.StreamDataReceived(data=b"late", end_stream=False, stream_id=remote_stream)
            )
            assert remote_stream not in accepted._streams
            await dialed.aclose()


# --- acknowledgements ride with data (sans-IO, explicit time) ---------------------------------

_CLIENT_ADDR = ("127.0.0.1", 4001)
_SERVER_ADDR = ("127.0.0.1", 4002)


def _configurations() -> tuple[QuicConfiguration, QuicConfiguration]:
    configurations = []
    for is_client in (True, False):
        key = ed25519.Ed25519PrivateKey.generate()
        endpoint = QuicEndpoint(key)  # not entered: only its configuration is used
        endpoint._certified = generate_certificate(key, now=dt.datetime.now(dt.UTC))
        configurations.append(endpoint._configuration(is_client=is_client))
    return configurations[0], configurations[1]


def _pump(source: _Libp2pQuicConnection, target: _Libp2pQuicConnection, now: float) -> int:
    datagrams = source.datagrams_to_send(now=now)
    sender = _CLIENT_ADDR if source._is_client else _SERVER_ADDR
    for data, _ in datagrams:
        target.receive_datagram(data, sender, now=now)
    return len(datagrams)


def _established_pair() -> tuple[_Libp2pQuicConnection, _Libp2pQuicConnection, float]:
    client_config, server_config = _configurations()
    clock = lambda: dt.datetime.now(dt.UTC)  # noqa: E731
    client = _Libp2pQuicConnection(configuration=client_config, expected_peer_id=None, clock=clock)
    now = 1.0
    client.connect(_SERVER_ADDR, now=now)
    first = client.datagrams_to_send(now=now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = _Libp2pQuicConnection(
        configuration=server_config,
        expected_peer_id=None,
        clock=clock,
        original_destination_connection_id=header.destination_cid,
    )
    for data, _ in first:
        server.receive_datagram(data, _CLIENT_ADDR, now=now)
    for _ in range(10):
        now += 0.001
        moved = _pump(server, client, now) + _pump(client, server, now)
        if not moved and client.verified_peer and server.verified_peer:
            break
    # Let every acknowledgement of the handshake go, so that nothing is owed.
    now += 0.05
    while _pump(client, server, now) + _pump(server, client, now):
        pass
    return client, server, now


def test_an_owed_ack_leaves_with_the_answer_not_in_a_packet_of_its_own() -> None:
    client, server, now = _established_pair()
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"request")
    assert _pump(client, server, now) == 1
    space = server._spaces[aioquic_tls.Epoch.ONE_RTT]
    assert space.ack_at is not None  # the server owes an ACK, due in a millisecond
    server.send_stream_data(stream_id, b"answer")  # answered before that
    answer = server.datagrams_to_send(now=now)
    assert len(answer) == 1
    assert space.ack_at is None  # the ACK left in the answer's packet
    # No ACK-only packet follows once the delay would have run out.
    assert server.datagrams_to_send(now=now + 0.01) == []
    # The client learns its request was received from the answer alone.
    for data, _ in answer:
        client.receive_datagram(data, _SERVER_ADDR, now=now)
    assert client._loss.bytes_in_flight == 0
