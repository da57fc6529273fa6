"""libp2p kad-dht (``/ipfs/kad/1.0.0``) wire messages: strict, bounded, sans-IO.

The protobuf (proto3) of libp2p/specs ``kad-dht/README.md``::

    message Record  { bytes key = 1; bytes value = 2; string timeReceived = 5; }
    message Message {
      enum MessageType { PUT_VALUE = 0; GET_VALUE = 1; ADD_PROVIDER = 2;
                         GET_PROVIDERS = 3; FIND_NODE = 4; PING = 5; }
      enum ConnectionType { NOT_CONNECTED = 0; CONNECTED = 1; CAN_CONNECT = 2;
                            CANNOT_CONNECT = 3; }
      message Peer { bytes id = 1; repeated bytes addrs = 2; ConnectionType connection = 3; }
      MessageType type = 1;  int32 clusterLevelRaw = 10;  bytes key = 2;  Record record = 3;
      repeated Peer closerPeers = 8;  repeated Peer providerPeers = 9;
    }

Encoding follows proto3: fields in number order, scalars at their default value (0, empty) are
left out, so a ``PUT_VALUE`` message carries no ``type`` field at all. Decoding skips unknown
fields, reads an absent field as its default, and refuses (with `InvalidDhtMessage`, the only
error it raises) wrong wire types, a singular field given twice, unknown message types, a
``Peer`` without an id, truncation, and anything over the `MessageLimits`.

Peer IDs and addresses inside a `Peer` stay raw bytes: the wire layer does not judge them.
`Peer.peer_id` raises `InvalidDhtMessage` for an ID that does not parse; `parse_peers` skips
such peers (one bad entry must not spoil a whole lookup response) and `Peer.multiaddrs` skips
addresses that do not parse (other implementations advertise transports teia does not know).

On a stream, every message is prefixed with its length as an unsigned varint: `frame` builds
that, `FrameDecoder` takes it apart from arbitrary chunks, and `send_message` /
`receive_message` use a `teia.host.streams.NegotiatedStream`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from teia.errors import (
    InvalidDhtMessage,
    InvalidMultiaddr,
    InvalidPeerId,
    InvalidProtobuf,
    MessageTooLarge,
)
from teia.host.protobuf import decode_uvarint, encode_bytes_field, encode_uvarint, iter_fields
from teia.identity import Multiaddr, PeerId
from teia.identity.multiaddr import MAX_MULTIADDR_BYTES

__all__ = [
    "DEFAULT_LIMITS",
    "KAD_PROTOCOL",
    "ConnectionType",
    "FrameDecoder",
    "Message",
    "MessageLimits",
    "MessageStream",
    "MessageType",
    "Peer",
    "Record",
    "frame",
    "parse_peers",
    "receive_message",
    "send_message",
]

KAD_PROTOCOL: Final = "/ipfs/kad/1.0.0"
"""The protocol ID the DHT speaks over host streams."""

_VARINT, _LEN = 0, 2
_MAX_INT32: Final = (1 << 31) - 1
_MAX_PREFIX: Final = 9  # our varints are at most 9 bytes


class MessageType(enum.IntEnum):
    """``Message.MessageType``: what a request asks (a response repeats its request's type)."""

    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(enum.IntEnum):
    """``Message.ConnectionType``: the sender's advisory view of its link to a peer.

    An unknown value on the wire reads as `NOT_CONNECTED` (it is only a hint).
    """

    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """Bounds on what `Message.decode` accepts (and `Message.encode` produces).

    The defaults fit every legitimate message (a FIND_NODE answer carries k = 20 peers; a
    teia peer record is at most 8 KiB) with room to spare.
    """

    max_message_size: int = 64 * 1024
    """Bytes of one encoded message (without its length prefix)."""
    max_peers: int = 64
    """Entries in ``closerPeers``, and separately in ``providerPeers``."""
    max_addrs: int = 32
    """Addresses of one peer."""
    max_addr_size: int = MAX_MULTIADDR_BYTES
    """Bytes of one binary multiaddr."""
    max_peer_id_size: int = 128
    """Bytes of one binary peer ID (an Ed25519 ID is 38, a sha2-256 ID 34)."""
    max_key_size: int = 512
    """Bytes of ``Message.key`` and ``Record.key``."""
    max_value_size: int = 16 * 1024
    """Bytes of ``Record.value``."""
    max_time_received_size: int = 64
    """Bytes of ``Record.timeReceived`` (an RFC 3339 timestamp)."""


DEFAULT_LIMITS: Final = MessageLimits()


# --- protobuf helpers ----------------------------------------------------------------------


def _varint_field(number: int, value: int) -> bytes:
    return encode_uvarint(number << 3 | _VARINT) + encode_uvarint(value)


def _fields(data: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    try:
        yield from iter_fields(data)
    except InvalidProtobuf as exc:
        raise InvalidDhtMessage(f"{what}: {exc}") from None


def _expect_bytes(value: int | bytes, wire_type: int, what: str) -> bytes:
    if wire_type != _LEN or not isinstance(value, bytes):
        raise InvalidDhtMessage(f"{what} must be length-delimited (wire type 2)")
    return value


def _expect_int(value: int | bytes, wire_type: int, what: str) -> int:
    if wire_type != _VARINT or not isinstance(value, int):
        raise InvalidDhtMessage(f"{what} must be a varint (wire type 0)")
    return value


def _check_size(value: bytes, limit: int, what: str) -> bytes:
    if len(value) > limit:
        raise InvalidDhtMessage(f"{what} of {len(value)} bytes is over the {limit}-byte limit")
    return value


class _Seen:
    """Refuses a singular field given twice (proto3 would silently keep the last one)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._numbers: set[int] = set()

    def once(self, number: int) -> None:
        if number in self._numbers:
            raise InvalidDhtMessage(f"{self._what} field {number} appears more than once")
        self._numbers.add(number)


# --- Record ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """``Message.Record``: a key and its value (for teia, a signed peer record envelope).

    ``time_received`` is set by a receiver for its own bookkeeping; senders leave it empty.
    """

    key: bytes = b""
    value: bytes = b""
    time_received: str = ""

    def encode(self, limits: MessageLimits = DEFAULT_LIMITS) -> bytes:
        """The protobuf bytes; raises `InvalidDhtMessage` if a field is over ``limits``."""
        _check_size(self.key, limits.max_key_size, "record key")
        _check_size(self.value, limits.max_value_size, "record value")
        time_received = self.time_received.encode()
        _check_size(time_received, limits.max_time_received_size, "record timeReceived")
        out = bytearray()
        if self.key:
            out += encode_bytes_field(1, self.key)
        if self.value:
            out += encode_bytes_field(2, self.value)
        if time_received:
            out += encode_bytes_field(5, time_received)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, limits: MessageLimits = DEFAULT_LIMITS) -> Record:
        """Parse a ``Record``; raises `InvalidDhtMessage`."""
        seen = _Seen("Record")
        key = value = b""
        time_received = ""
        for number, wire_type, raw in _fields(data, "Record"):
            if number == 1:
                seen.once(number)
                key = _check_size(
                    _expect_bytes(raw, wire_type, "Record.key"), limits.max_key_size, "record key"
                )
            elif number == 2:
                seen.once(number)
                value = _check_size(
                    _expect_bytes(raw, wire_type, "Record.value"),
                    limits.max_value_size,
                    "record value",
                )
            elif number == 5:
                seen.once(number)
                encoded = _check_size(
                    _expect_bytes(raw, wire_type, "Record.timeReceived"),
                    limits.max_time_received_size,
                    "record timeReceived",
                )
                try:
                    time_received = encoded.decode()
                except UnicodeDecodeError:
                    raise InvalidDhtMessage("Record.timeReceived is not UTF-8") from None
        return cls(key=key, value=value, time_received=time_received)


# --- Peer -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """``Message.Peer``: a peer ID and its addresses, both in raw binary form."""

    id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    @classmethod
    def from_peer_id(
        cls,
        peer_id: PeerId,
        addrs: Iterable[Multiaddr] = (),
        connection: ConnectionType = ConnectionType.NOT_CONNECTED,
    ) -> Peer:
        """The entry for ``peer_id`` and its addresses."""
        return cls(peer_id.to_bytes(), tuple(a.to_bytes() for a in addrs), connection)

    def peer_id(self) -> PeerId:
        """The peer ID; raises `InvalidDhtMessage` if ``id`` is not a valid binary peer ID."""
        try:
            return PeerId.from_bytes(self.id)
        except InvalidPeerId as exc:
            raise InvalidDhtMessage(f"Peer.id is not a peer ID: {exc}") from None

    def multiaddrs(self) -> list[Multiaddr]:
        """The addresses that parse as multiaddrs; others are skipped, not fatal."""
        out = []
        for address in self.addrs:
            try:
                out.append(Multiaddr.from_bytes(address))
            except InvalidMultiaddr:
                continue
        return out

    def encode(self, limits: MessageLimits = DEFAULT_LIMITS) -> bytes:
        """The protobuf bytes; raises `InvalidDhtMessage` if over ``limits`` or without id."""
        if not self.id:
            raise InvalidDhtMessage("a Peer needs an id")
        _check_size(self.id, limits.max_peer_id_size, "peer id")
        if len(self.addrs) > limits.max_addrs:
            raise InvalidDhtMessage(f"a Peer has more than {limits.max_addrs} addresses")
        out = bytearray(encode_bytes_field(1, self.id))
        for address in self.addrs:
            out += encode_bytes_field(2, _check_size(address, limits.max_addr_size, "address"))
        if self.connection:
            out += _varint_field(3, int(self.connection))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, limits: MessageLimits = DEFAULT_LIMITS) -> Peer:
        """Parse a ``Peer``; raises `InvalidDhtMessage`."""
        seen = _Seen("Peer")
        peer_id = b""
        addrs: list[bytes] = []
        connection = ConnectionType.NOT_CONNECTED
        for number, wire_type, raw in _fields(data, "Peer"):
            if number == 1:
                seen.once(number)
                peer_id = _check_size(
                    _expect_bytes(raw, wire_type, "Peer.id"), limits.max_peer_id_size, "peer id"
                )
            elif number == 2:
                if len(addrs) == limits.max_addrs:
                    raise InvalidDhtMessage(f"a Peer has more than {limits.max_addrs} addresses")
                address = _expect_bytes(raw, wire_type, "Peer.addrs")
                addrs.append(_check_size(address, limits.max_addr_size, "address"))
            elif number == 3:
                seen.once(number)
                value = _expect_int(raw, wire_type, "Peer.connection")
                try:
                    connection = ConnectionType(value)
                except ValueError:
                    connection = ConnectionType.NOT_CONNECTED
        if not peer_id:
            raise InvalidDhtMessage("a Peer without an id")
        return cls(id=peer_id, addrs=tuple(addrs), connection=connection)


def parse_peers(peers: Iterable[Peer]) -> list[tuple[PeerId, list[Multiaddr]]]:
    """Each peer whose ID parses, with the addresses that parse; invalid IDs are skipped."""
    out = []
    for peer in peers:
        try:
            peer_id = peer.peer_id()
        except InvalidDhtMessage:
            continue
        out.append((peer_id, peer.multiaddrs()))
    return out


# --- Message --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One kad-dht request or response.

    ``key`` is the binary peer ID for FIND_NODE, the record key for GET_VALUE / PUT_VALUE, the
    content key (a multihash) for the provider messages. ``record`` is ``None`` when absent
    (proto3 keeps presence for message fields). ``cluster_level`` is ``clusterLevelRaw``,
    unused by every implementation; it is kept so that messages round-trip.
    """

    type: MessageType
    key: bytes = b""
    record: Record | None = None
    closer_peers: tuple[Peer, ...] = ()
    provider_peers: tuple[Peer, ...] = ()
    cluster_level: int = 0

    def encode(self, limits: MessageLimits = DEFAULT_LIMITS) -> bytes:
        """The protobuf bytes; raises `InvalidDhtMessage` if anything is over ``limits``."""
        if not 0 <= self.cluster_level <= _MAX_INT32:
            raise InvalidDhtMessage(f"clusterLevelRaw {self.cluster_level} is out of range")
        _check_size(self.key, limits.max_key_size, "message key")
        for name, peers in (
            ("closerPeers", self.closer_peers),
            ("providerPeers", self.provider_peers),
        ):
            if len(peers) > limits.max_peers:
                raise InvalidDhtMessage(f"more than {limits.max_peers} {name}")
        out = bytearray()
        if self.type:
            out += _varint_field(1, int(self.type))
        if self.key:
            out += encode_bytes_field(2, self.key)
        if self.record is not None:
            out += encode_bytes_field(3, self.record.encode(limits))
        for peer in self.closer_peers:
            out += encode_bytes_field(8, peer.encode(limits))
        for peer in self.provider_peers:
            out += encode_bytes_field(9, peer.encode(limits))
        if self.cluster_level:
            out += _varint_field(10, self.cluster_level)
        if len(out) > limits.max_message_size:
            raise InvalidDhtMessage(
                f"message of {len(out)} bytes is over the {limits.max_message_size}-byte limit"
            )
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, limits: MessageLimits = DEFAULT_LIMITS) -> Message:
        """Parse one message (without its length prefix); raises `InvalidDhtMessage` only."""
        if len(data) > limits.max_message_size:
            raise InvalidDhtMessage(
                f"message of {len(data)} bytes is over the {limits.max_message_size}-byte limit"
            )
        data = bytes(data)
        seen = _Seen("Message")
        message_type = MessageType.PUT_VALUE
        key = b""
        record: Record | None = None
        closer: list[Peer] = []
        providers: list[Peer] = []
        cluster_level = 0
        for number, wire_type, raw in _fields(data, "Message"):
            if number == 1:
                seen.once(number)
                value = _expect_int(raw, wire_type, "Message.type")
                try:
                    message_type = MessageType(value)
                except ValueError:
                    raise InvalidDhtMessage(f"unknown message type {value}") from None
            elif number == 2:
                seen.once(number)
                key = _check_size(
                    _expect_bytes(raw, wire_type, "Message.key"),
                    limits.max_key_size,
                    "message key",
                )
            elif number == 3:
                seen.once(number)
                record = Record.decode(_expect_bytes(raw, wire_type, "Message.record"), limits)
            elif number in (8, 9):
                peers, name = (
                    (closer, "closerPeers") if number == 8 else (providers, "providerPeers")
                )
                if len(peers) == limits.max_peers:
                    raise InvalidDhtMessage(f"more than {limits.max_peers} {name}")
                peers.append(Peer.decode(_expect_bytes(raw, wire_type, f"Message.{name}"), limits))
            elif number == 10:
                seen.once(number)
                cluster_level = _expect_int(raw, wire_type, "Message.clusterLevelRaw")
                if cluster_level > _MAX_INT32:
                    raise InvalidDhtMessage(f"clusterLevelRaw {cluster_level} is out of range")
        return cls(
            type=message_type,
            key=key,
            record=record,
            closer_peers=tuple(closer),
            provider_peers=tuple(providers),
            cluster_level=cluster_level,
        )


# --- framing --------------------------------------------------------------------------------


def frame(message: Message, limits: MessageLimits = DEFAULT_LIMITS) -> bytes:
    """``varint(length) ‖ message``: what goes on the stream."""
    encoded = message.encode(limits)
    return encode_uvarint(len(encoded)) + encoded


class FrameDecoder:
    """Takes length-prefixed messages apart from a byte stream that arrives in any chunks.

    Feed bytes with `receive_data`, take messages with `next_message`. A length prefix over
    ``limits.max_message_size`` raises `InvalidDhtMessage` as soon as it is read, so nothing
    waits for a body that would be refused anyway. After an error, drop the decoder (and reset
    the stream): the framing is lost.
    """

    def __init__(self, limits: MessageLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message (non-zero at a clean end: error)."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the stream; raises `InvalidDhtMessage` if a prefix is bad or over."""
        self._buffer += data
        self._length()

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        header = self._length()
        if header is None:
            return None
        length, start = header
        if len(self._buffer) < start + length:
            return None
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]
        return Message.decode(body, self._limits)

    def _length(self) -> tuple[int, int] | None:
        if not self._buffer:
            return None
        try:
            length, start = decode_uvarint(bytes(self._buffer[:_MAX_PREFIX]))
        except InvalidProtobuf as exc:
            if len(self._buffer) < _MAX_PREFIX and "truncated" in str(exc):
                return None
            raise InvalidDhtMessage(f"bad message length prefix: {exc}") from None
        if length > self._limits.max_message_size:
            raise InvalidDhtMessage(
                f"message of {length} bytes is over the {self._limits.max_message_size}-byte limit"
            )
        return length, start


class MessageStream(Protocol):
    """What `send_message` / `receive_message` need (a `NegotiatedStream` has both)."""

    async def send_message(self, message: bytes) -> None: ...

    async def receive_message(self, max_size: int = ...) -> bytes: ...


async def send_message(
    stream: MessageStream, message: Message, limits: MessageLimits = DEFAULT_LIMITS
) -> None:
    """Write one length-prefixed message to ``stream``."""
    await stream.send_message(message.encode(limits))


async def receive_message(stream: MessageStream, limits: MessageLimits = DEFAULT_LIMITS) -> Message:
    """Read one length-prefixed message; raises `InvalidDhtMessage` if bad or oversize.

    A stream that ends before or inside a message raises what the stream raises
    (`anyio.EndOfStream`, `anyio.IncompleteRead`).
    """
    try:
        data = await stream.receive_message(limits.max_message_size)
    except MessageTooLarge as exc:
        raise InvalidDhtMessage(str(exc)) from None
    return Message.decode(data, limits)
