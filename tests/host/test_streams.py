"""Negotiation over byte streams, and ping, in memory and over real QUIC on loopback."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import anyio
import anyio.abc
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teia.errors import (
    MessageTooLarge,
    PingFailed,
    ProtocolNegotiationError,
    ProtocolNotSupported,
)
from teia.host.multistream import encode_message
from teia.host.ping import PING_PROTOCOL, ping, serve_ping
from teia.host.protobuf import encode_uvarint
from teia.host.streams import (
    NegotiatedStream,
    accept_protocol,
    receive_exactly,
    select_protocol,
)
from teia.transport.quic import QuicEndpoint

TIMEOUT = 10


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-memory byte pipe (test helper)."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive

    async def send(self, item: bytes) -> None:
        await self._send.send(item)

    async def send_eof(self) -> None:
        self._send.close()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        self._send.close()
        self._receive.close()


PipeFactory = Callable[[], tuple[MemoryByteStream, MemoryByteStream]]


@pytest.fixture
def byte_pipe() -> Iterator[PipeFactory]:
    """Makes connected in-memory byte stream pairs; closes them all after the test."""
    made: list[MemoryByteStream] = []

    def make() -> tuple[MemoryByteStream, MemoryByteStream]:
        a_send, b_receive = anyio.create_memory_object_stream[bytes](math.inf)
        b_send, a_receive = anyio.create_memory_object_stream[bytes](math.inf)
        pair = MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
        made.extend(pair)
        return pair

    yield make
    for stream in made:
        stream.close_now()


@pytest.mark.anyio
async def test_negotiation_then_application_data(byte_pipe: PipeFactory) -> None:
    dialer_end, listener_end = byte_pipe()
    results: dict[str, NegotiatedStream] = {}

    async def listener() -> None:
        results["l"] = await accept_protocol(listener_end, {"/b/1"}.__contains__)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener)
            results["d"] = await select_protocol(dialer_end, ["/a/1", "/b/1"])
        assert results["d"].protocol == results["l"].protocol == "/b/1"
        await results["d"].send(b"hello")
        assert await receive_exactly(results["l"], 5) == b"hello"
        await dialer_end.aclose()
        await listener_end.aclose()


@pytest.mark.anyio
async def test_bytes_behind_the_negotiation_reach_the_application_first(
    byte_pipe: PipeFactory,
) -> None:
    dialer_end, listener_end = byte_pipe()
    with anyio.fail_after(TIMEOUT):
        header = encode_message("/multistream/1.0.0")
        # A pipelining dialer: header, proposal and its first data in one write.
        await dialer_end.send(header + encode_message("/x/1") + b"early")
        negotiated = await accept_protocol(listener_end, {"/x/1"}.__contains__)
        assert await receive_exactly(negotiated, 5) == b"early"
        reply = header + encode_message("/x/1")
        assert await receive_exactly(dialer_end, len(reply)) == reply


@pytest.mark.anyio
async def test_declined_and_garbage_and_early_end(byte_pipe: PipeFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        dialer_end, listener_end = byte_pipe()
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_protocol, listener_end, lambda _: False)
            with pytest.raises(ProtocolNotSupported):
                await select_protocol(dialer_end, ["/a/1"])
            tg.cancel_scope.cancel()

        dialer_end, listener_end = byte_pipe()
        await dialer_end.send(b"\x05junk!")
        with pytest.raises(ProtocolNegotiationError):
            await accept_protocol(listener_end, lambda _: True)

        dialer_end, listener_end = byte_pipe()
        await dialer_end.send_eof()
        with pytest.raises(ProtocolNegotiationError, match="ended"):
            await accept_protocol(listener_end, lambda _: True)


@pytest.mark.anyio
async def test_ping_in_memory_detects_a_wrong_echo(byte_pipe: PipeFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        a, b = byte_pipe()
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_ping, b)
            for _ in range(3):
                assert await ping(a) >= 0
            await a.send_eof()

        a, b = byte_pipe()
        await b.send(b"\x00" * 32)
        with pytest.raises(PingFailed):
            await ping(a)


@pytest.mark.anyio
async def test_ping_over_quic() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            QuicEndpoint(ed25519.Ed25519PrivateKey.generate()) as a,
            QuicEndpoint(ed25519.Ed25519PrivateKey.generate()) as b,
            anyio.create_task_group() as tg,
        ):
            dialed = await a.connect(b.local_address, expected_peer_id=b.peer_id)
            accepted = await b.accept()

            async def serve() -> None:
                stream = await accepted.accept_stream()
                negotiated = await accept_protocol(stream, {PING_PROTOCOL}.__contains__)
                await serve_ping(negotiated)
                await negotiated.aclose()

            tg.start_soon(serve)
            stream = await select_protocol(await dialed.open_stream(), [PING_PROTOCOL])
            rtts = [await ping(stream) for _ in range(5)]
            assert all(0 <= rtt < TIMEOUT for rtt in rtts)
            await stream.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await dialed.aclose()


def _negotiated(stream: MemoryByteStream) -> NegotiatedStream:
    return NegotiatedStream(stream, "/test/1", b"")


@pytest.mark.anyio
@given(
    messages=st.lists(st.binary(max_size=300), max_size=6),
    chunk=st.integers(min_value=1, max_value=50),
)
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_length_prefixed_messages_survive_any_chunking(
    byte_pipe: PipeFactory, messages: list[bytes], chunk: int
) -> None:
    a, b = byte_pipe()
    wire = b"".join(encode_uvarint(len(m)) + m for m in messages) + b"tail"
    for i in range(0, len(wire), chunk):
        await a.send(wire[i : i + chunk])
    await a.send_eof()
    reader = _negotiated(b)
    assert [await reader.receive_message() for _ in messages] == messages
    assert await receive_exactly(reader, 4) == b"tail"
    with pytest.raises(anyio.EndOfStream):
        await reader.receive_message()


class _Arrivals(anyio.abc.ByteStream):
    """A byte stream whose bytes arrive in chunks the test hands in (`arrive`), readable by
    ``receive`` and, without waiting, by ``receive_nowait`` (as a QUIC stream's are)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def arrive(self, data: bytes) -> None:
        self.buffer += data

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        return data

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self.buffer:
            raise anyio.EndOfStream
        return self.receive_nowait(max_bytes)

    async def send(self, item: bytes) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    chunk=st.integers(min_value=1, max_value=80),
    awaited=st.lists(st.booleans(), min_size=8, max_size=8),
)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_messages_already_here_are_taken_without_waiting(
    messages: list[bytes], chunk: int, awaited: list[bool]
) -> None:
    """Whatever the chunking, and mixing awaited and non-waiting reads, the messages come out
    whole and in order; a message not wholly here is None and stays for the next read."""
    source = _Arrivals()
    reader = NegotiatedStream(source, "/test/1", b"")
    wire = b"".join(encode_uvarint(len(m)) + m for m in messages)
    got: list[bytes] = []
    for i in range(0, len(wire), chunk):
        source.arrive(wire[i : i + chunk])
        while (message := reader.receive_message_nowait()) is not None:
            got.append(message)
    assert got == messages
    assert reader.receive_message_nowait() is None
    # The same bytes read half awaited, half not, in any order of the two.
    source.arrive(wire)
    again = []
    for wait in awaited[: len(messages)]:
        message = await reader.receive_message() if wait else reader.receive_message_nowait()
        again.append(message)
    assert again == messages


def test_a_message_not_here_yet_waits_and_an_oversize_one_is_refused() -> None:
    source = _Arrivals()
    reader = NegotiatedStream(source, "/test/1", b"")
    source.arrive(encode_uvarint(5) + b"abc")
    assert reader.receive_message_nowait() is None  # three bytes of five
    source.arrive(b"de")
    assert reader.receive_message_nowait() == b"abcde"
    source.arrive(b"\x80")  # half a length prefix
    assert reader.receive_message_nowait() is None
    source.arrive(b"\x08" + b"x" * 1024)
    with pytest.raises(MessageTooLarge, match="over the 99-byte limit"):
        reader.receive_message_nowait(max_size=99)
    source = _Arrivals()
    reader = NegotiatedStream(source, "/test/1", b"")
    source.arrive(b"\xff" * 10)  # no varint ends
    with pytest.raises(MessageTooLarge, match="prefix"):
        reader.receive_message_nowait()


@pytest.mark.anyio
async def test_message_limits_and_truncation(byte_pipe: PipeFactory) -> None:
    with anyio.fail_after(TIMEOUT):
        a, b = byte_pipe()
        await _negotiated(a).send_message(b"x" * 100)
        with pytest.raises(MessageTooLarge, match="over the 99-byte limit"):
            await _negotiated(b).receive_message(max_size=99)

        a, b = byte_pipe()
        await a.send(b"\x80\x00")  # non-minimal varint
        with pytest.raises(MessageTooLarge, match="prefix"):
            await _negotiated(b).receive_message()

        a, b = byte_pipe()
        await a.send(b"\x05abc")
        await a.send_eof()
        with pytest.raises(anyio.IncompleteRead):
            await _negotiated(b).receive_message()
