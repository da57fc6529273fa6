"""libp2p identify (``/ipfs/id/1.0.0``): who a peer is, where it listens, what it speaks.

The peer being identified writes one varint-length-prefixed ``Identify`` protobuf and closes
the stream (what go-, rust- and py-libp2p send). When reading we also accept a bare message
filling the whole stream, which older implementations sent. Spec: libp2p/specs
``identify/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import anyio.abc

from teia.errors import InvalidMultiaddr, InvalidProtobuf
from teia.host.protobuf import (
    decode_uvarint,
    encode_bytes_field,
    encode_uvarint,
    iter_fields,
)
from teia.identity import Multiaddr

__all__ = [
    "AGENT_VERSION",
    "IDENTIFY_PROTOCOL",
    "MAX_IDENTIFY_SIZE",
    "PROTOCOL_VERSION",
    "IdentifyInfo",
    "request_identify",
    "serve_identify",
]

IDENTIFY_PROTOCOL = "/ipfs/id/1.0.0"
PROTOCOL_VERSION = "ipfs/0.1.0"
AGENT_VERSION = "teia/0.1.0"
# go-libp2p reads at most 8 KiB here; a signed peer record is the largest thing peers add.
MAX_IDENTIFY_SIZE = 64 * 1024
MAX_ADDRESSES = 128
MAX_PROTOCOLS = 1024

_PUBLIC_KEY, _LISTEN_ADDRS, _PROTOCOLS, _OBSERVED_ADDR = 1, 2, 3, 4
_PROTOCOL_VERSION, _AGENT_VERSION = 5, 6


@dataclass(frozen=True, slots=True)
class IdentifyInfo:
    """The contents of an ``Identify`` message. Addresses are binary multiaddrs."""

    public_key: bytes | None = None
    """The peer's host key as a protobuf ``PublicKey`` (check it against the peer ID)."""
    listen_addrs: tuple[bytes, ...] = ()
    protocols: tuple[str, ...] = ()
    observed_addr: bytes | None = None
    protocol_version: str | None = None
    agent_version: str | None = None
    unknown_fields: tuple[int, ...] = field(default=(), compare=False)

    @property
    def listen_multiaddrs(self) -> list[Multiaddr]:
        """The listen addresses that parse as multiaddrs (others are skipped, not fatal)."""
        return [m for m in map(_parse_multiaddr, self.listen_addrs) if m is not None]

    @property
    def observed_multiaddr(self) -> Multiaddr | None:
        """The address the peer saw us at, if it sent one that parses."""
        return None if self.observed_addr is None else _parse_multiaddr(self.observed_addr)

    def encode(self) -> bytes:
        out = bytearray()
        if self.public_key is not None:
            out += encode_bytes_field(_PUBLIC_KEY, self.public_key)
        for address in self.listen_addrs:
            out += encode_bytes_field(_LISTEN_ADDRS, address)
        for protocol in self.protocols:
            out += encode_bytes_field(_PROTOCOLS, protocol.encode())
        if self.observed_addr is not None:
            out += encode_bytes_field(_OBSERVED_ADDR, self.observed_addr)
        if self.protocol_version is not None:
            out += encode_bytes_field(_PROTOCOL_VERSION, self.protocol_version.encode())
        if self.agent_version is not None:
            out += encode_bytes_field(_AGENT_VERSION, self.agent_version.encode())
        if len(out) > MAX_IDENTIFY_SIZE:
            raise InvalidProtobuf(f"Identify message over {MAX_IDENTIFY_SIZE} bytes")
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> IdentifyInfo:
        """Parse an ``Identify`` message; `InvalidProtobuf` if it is malformed or oversize."""
        if len(data) > MAX_IDENTIFY_SIZE:
            raise InvalidProtobuf(f"Identify message over {MAX_IDENTIFY_SIZE} bytes")
        values: dict[str, bytes | str | None] = {}
        listen: list[bytes] = []
        protocols: list[str] = []
        unknown: list[int] = []
        for number, wire_type, value in iter_fields(data):
            known = number in (1, 2, 3, 4, 5, 6)
            if not known:
                unknown.append(number)
                continue
            if wire_type != 2 or not isinstance(value, bytes):
                raise InvalidProtobuf(f"Identify field {number} must be length-delimited")
            if number == _PUBLIC_KEY:
                values["public_key"] = value
            elif number == _LISTEN_ADDRS:
                if len(listen) == MAX_ADDRESSES:
                    raise InvalidProtobuf(f"more than {MAX_ADDRESSES} listen addresses")
                listen.append(value)
            elif number == _OBSERVED_ADDR:
                values["observed_addr"] = value
            else:
                try:
                    text = value.decode()
                except UnicodeDecodeError as exc:
                    raise InvalidProtobuf(f"Identify field {number} is not UTF-8") from exc
                if number == _PROTOCOLS:
                    if len(protocols) == MAX_PROTOCOLS:
                        raise InvalidProtobuf(f"more than {MAX_PROTOCOLS} protocols")
                    protocols.append(text)
                elif number == _PROTOCOL_VERSION:
                    values["protocol_version"] = text
                else:
                    values["agent_version"] = text
        public_key = values.get("public_key")
        observed = values.get("observed_addr")
        protocol_version = values.get("protocol_version")
        agent_version = values.get("agent_version")
        return cls(
            public_key=public_key if isinstance(public_key, bytes) else None,
            listen_addrs=tuple(listen),
            protocols=tuple(protocols),
            observed_addr=observed if isinstance(observed, bytes) else None,
            protocol_version=protocol_version if isinstance(protocol_version, str) else None,
            agent_version=agent_version if isinstance(agent_version, str) else None,
            unknown_fields=tuple(unknown),
        )


def _parse_multiaddr(data: bytes) -> Multiaddr | None:
    try:
        return Multiaddr.from_bytes(data)
    except InvalidMultiaddr:
        return None


async def serve_identify(stream: anyio.abc.ByteStream, info: IdentifyInfo) -> None:
    """Answer an identify request: one length-prefixed message, then end the stream."""
    message = info.encode()
    await stream.send(encode_uvarint(len(message)) + message)
    await stream.send_eof()


async def request_identify(stream: anyio.abc.ByteReceiveStream) -> IdentifyInfo:
    """Read the peer's ``Identify`` message from a negotiated identify stream."""
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            break
        if len(data) > MAX_IDENTIFY_SIZE + 8:
            raise InvalidProtobuf(f"Identify response over {MAX_IDENTIFY_SIZE} bytes")
    raw = bytes(data)
    try:
        length, start = decode_uvarint(raw)
    except InvalidProtobuf:
        length, start = -1, 0
    if start + length == len(raw):
        return IdentifyInfo.decode(raw[start:])
    return IdentifyInfo.decode(raw)  # an unprefixed message, as early implementations sent
