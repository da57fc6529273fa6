"""Protocol negotiation over a byte stream, and the stream an agreed protocol gets.

`select_protocol` (the side that opened the stream) and `accept_protocol` (the side that
accepted it) run the sans-IO machines of `teia.host.multistream` over any anyio byte stream and
return a `NegotiatedStream`: the same stream, with the protocol name and with any bytes that
arrived behind the negotiation handed out first. Bound them with ``anyio.fail_after``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from teia.errors import InvalidProtobuf, MessageTooLarge, ProtocolNegotiationError
from teia.host.multistream import MultistreamDialer, MultistreamListener, ProtocolAgreed
from teia.host.protobuf import decode_uvarint, encode_uvarint
from teia.identity import PeerId

__all__ = ["NegotiatedStream", "accept_protocol", "receive_exactly", "select_protocol"]

_READ_SIZE = 4096
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
_MAX_PREFIX = 9


class NegotiatedStream(anyio.abc.ByteStream):
    """A byte stream on which both sides agreed to speak `protocol`."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: str, unconsumed: bytes) -> None:
        self.stream = stream
        self.protocol = protocol
        self._unconsumed = unconsumed
        self._offset = 0
        """Where the unread part of ``_unconsumed`` starts (`receive_message_nowait` moves it
        instead of copying the rest after every message)."""
        self.remote_peer_id: PeerId | None = None
        """Who is on the other end, when a host made this stream."""
        self.remote_address: tuple[str, int] | None = None
        """The peer's transport address as this host sees it, when a host made this stream."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        offset, held = self._offset, len(self._unconsumed)
        if offset < held:
            end = min(held, offset + max_bytes)
            data = self._unconsumed[offset:end]
            if end == held:
                self._unconsumed, self._offset = b"", 0
            else:
                self._offset = end
            await anyio.lowlevel.checkpoint()
            return data
        return await self.stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.stream.send(item)

    async def send_message(self, message: bytes) -> None:
        """Send one message framed as an unsigned-varint length and the bytes."""
        await self.stream.send(encode_uvarint(len(message)) + message)

    async def receive_message(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
        """Receive one varint-length-prefixed message of at most ``max_size`` bytes.

        Raises `anyio.EndOfStream` if the stream ends cleanly before a message starts,
        `anyio.IncompleteRead` if it ends inside one, `MessageTooLarge` over ``max_size``.
        """
        buffer = bytearray()
        length = -1
        start = 0
        while True:
            if length < 0 and buffer:
                parsed = _length_prefix(bytes(buffer[:_MAX_PREFIX]), max_size)
                if parsed is not None:
                    length, start = parsed
            if length >= 0 and len(buffer) >= start + length:
                message = bytes(buffer[start : start + length])
                rest = self._unconsumed[self._offset :]
                self._unconsumed, self._offset = bytes(buffer[start + length :]) + rest, 0
                return message
            try:
                wanted = max(1, start + length - len(buffer)) if length >= 0 else _MAX_PREFIX
                buffer += await self.receive(wanted)
            except anyio.EndOfStream:
                if buffer:
                    raise anyio.IncompleteRead from None
                raise

    def receive_message_nowait(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes | None:
        """The next varint-length-prefixed message if it has wholly arrived, else None; never
        waits (the transport's buffer is read through its ``receive_nowait``, when it has one).

        Raises `MessageTooLarge` as `receive_message` does; what is incomplete stays for the
        next call of either.
        """
        take = getattr(self.stream, "receive_nowait", None)
        if callable(take):
            arrived = take()
            if arrived:
                self._unconsumed = self._unconsumed[self._offset :] + arrived
                self._offset = 0
        buffer, offset = self._unconsumed, self._offset
        if offset >= len(buffer):
            return None
        parsed = _length_prefix(buffer[offset : offset + _MAX_PREFIX], max_size)
        if parsed is None:
            return None
        length, start = parsed
        end = offset + start + length
        if len(buffer) < end:
            return None
        self._offset = end
        return buffer[offset + start : end]

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def reset(self, error_code: int = 0) -> None:
        """Abort the stream both ways where the transport can (QUIC); else just drop it."""
        reset = getattr(self.stream, "reset", None)
        if callable(reset):
            reset(error_code)


def _length_prefix(prefix: bytes, max_size: int) -> tuple[int, int] | None:
    """(message length, prefix length) from the first bytes of a message; None while the
    varint is still cut short; `MessageTooLarge` for a bad prefix or one over ``max_size``."""
    try:
        length, start = decode_uvarint(prefix)
    except InvalidProtobuf as exc:
        if len(prefix) >= _MAX_PREFIX or "truncated" not in str(exc):
            raise MessageTooLarge(f"bad message length prefix: {exc}") from exc
        return None
    if length > max_size:
        raise MessageTooLarge(f"message of {length} bytes is over the {max_size}-byte limit")
    return length, start


async def _run(
    stream: anyio.abc.ByteStream, machine: MultistreamDialer | MultistreamListener
) -> ProtocolAgreed:
    while True:
        outgoing = machine.data_to_send()
        if outgoing:
            await stream.send(outgoing)
        try:
            data = await stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            raise ProtocolNegotiationError("stream ended during protocol negotiation") from None
        agreed = machine.receive_data(data)
        if agreed is not None:
            outgoing = machine.data_to_send()
            if outgoing:
                await stream.send(outgoing)
            return agreed


async def select_protocol(
    stream: anyio.abc.ByteStream, protocols: Sequence[str]
) -> NegotiatedStream:
    """Propose ``protocols`` in order on a stream we opened; return it once one is agreed.

    Raises `ProtocolNotSupported` if the peer declines them all.
    """
    agreed = await _run(stream, MultistreamDialer(protocols))
    return NegotiatedStream(stream, agreed.protocol, agreed.unconsumed)


async def accept_protocol(
    stream: anyio.abc.ByteStream, supports: Callable[[str], bool]
) -> NegotiatedStream:
    """Answer the peer's proposals on a stream it opened; return it once one is agreed."""
    agreed = await _run(stream, MultistreamListener(supports))
    return NegotiatedStream(stream, agreed.protocol, agreed.unconsumed)


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, count: int) -> bytes:
    """Read exactly ``count`` bytes; `anyio.IncompleteRead` if the stream ends first."""
    buffer = bytearray()
    while len(buffer) < count:
        try:
            buffer += await stream.receive(count - len(buffer))
        except anyio.EndOfStream:
            raise anyio.IncompleteRead from None
    return bytes(buffer)
