"""Multiaddrs: self-describing, composable network addresses (multiformats/multiaddr).

Text form ``/ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3KooW…``; binary form a sequence of
``varint(protocol code) ‖ value`` where the value is fixed-size (ip4: 4 bytes, ip6: 16, ports: 2
big-endian), absent (``quic-v1``, ``p2p-circuit`` …) or ``varint(length) ‖ bytes`` (dns names,
``p2p`` peer IDs). Codes are those of the multiaddr ``protocols.csv`` table.

Only the protocols in `PROTOCOLS` are understood: a binary multiaddr cannot be walked past an
unknown code (its value size is unknown), so an unknown protocol is an `InvalidMultiaddr` in
both forms. Parsing is strict and bounded; every malformed input raises `InvalidMultiaddr`.
Values are kept in their binary form, so the text form is canonical (IPv6 compressed, ports
without leading zeros, ``/ipfs/`` written as ``/p2p/``, peer IDs in base58btc).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, final

from teia.errors import InvalidMultiaddr, InvalidPeerId, InvalidVarint
from teia.identity import varint
from teia.identity.peer_id import PeerId

__all__ = ["MAX_MULTIADDR_BYTES", "PROTOCOLS", "Multiaddr", "Protocol"]

MAX_MULTIADDR_BYTES: Final = 1024
"""The longest binary multiaddr accepted (the text form may be up to 4 times as long)."""

_MAX_NAME_BYTES: Final = 255  # a DNS name is at most 255 octets


@dataclass(frozen=True, slots=True)
class Protocol:
    """One multiaddr protocol: its code, name and value size (bytes; 0 none, -1 variable)."""

    code: int
    name: str
    size: int


def _port_to_bytes(text: str) -> bytes:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise InvalidMultiaddr(f"port {text!r} is not a decimal number")
    port = int(text)
    if port > 0xFFFF:
        raise InvalidMultiaddr(f"port {port} is over 65535")
    return port.to_bytes(2, "big")


def _port_to_text(value: bytes) -> str:
    return str(int.from_bytes(value, "big"))


def _ip4_to_bytes(text: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise InvalidMultiaddr(f"{text!r} is not an IPv4 address") from None


def _ip6_to_bytes(text: str) -> bytes:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise InvalidMultiaddr(f"{text!r} is not an IPv6 address") from None
    if address.scope_id is not None:
        raise InvalidMultiaddr(f"IPv6 address {text!r} has a zone; zones are not supported")
    return address.packed


def _ip4_to_text(value: bytes) -> str:
    return str(ipaddress.IPv4Address(value))


def _ip6_to_text(value: bytes) -> str:
    return str(ipaddress.IPv6Address(value))


def _name_to_bytes(text: str) -> bytes:
    value = text.encode("utf-8", "surrogatepass")
    _check_name(value)
    return value


def _name_to_text(value: bytes) -> str:
    _check_name(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMultiaddr("DNS name is not valid UTF-8") from None


def _check_name(value: bytes) -> None:
    if not value:
        raise InvalidMultiaddr("empty DNS name")
    if len(value) > _MAX_NAME_BYTES:
        raise InvalidMultiaddr(f"DNS name of {len(value)} bytes; the limit is {_MAX_NAME_BYTES}")
    if b"/" in value or any(byte < 0x21 or byte == 0x7F for byte in value):
        raise InvalidMultiaddr("DNS name contains '/', whitespace or control characters")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMultiaddr("DNS name is not valid UTF-8") from None


def _peer_id_to_bytes(text: str) -> bytes:
    try:
        return PeerId.from_string(text).to_bytes()
    except InvalidPeerId as exc:
        raise InvalidMultiaddr(f"/p2p/ value: {exc}") from None


def _peer_id_to_text(value: bytes) -> str:
    try:
        return str(PeerId.from_bytes(value))
    except InvalidPeerId as exc:
        raise InvalidMultiaddr(f"/p2p/ value: {exc}") from None


_Codec = tuple[Callable[[str], bytes], Callable[[bytes], str]]

_IP4 = Protocol(4, "ip4", 4)
_TCP = Protocol(6, "tcp", 2)
_UDP = Protocol(273, "udp", 2)
_DNS = Protocol(53, "dns", -1)
_DNS4 = Protocol(54, "dns4", -1)
_DNS6 = Protocol(55, "dns6", -1)
_DNSADDR = Protocol(56, "dnsaddr", -1)
_IP6 = Protocol(41, "ip6", 16)
_P2P = Protocol(421, "p2p", -1)
_P2P_CIRCUIT = Protocol(290, "p2p-circuit", 0)
_QUIC = Protocol(460, "quic", 0)
_QUIC_V1 = Protocol(461, "quic-v1", 0)

PROTOCOLS: Final[tuple[Protocol, ...]] = (
    _IP4,
    _TCP,
    _UDP,
    _DNS,
    _DNS4,
    _DNS6,
    _DNSADDR,
    _IP6,
    _P2P,
    _P2P_CIRCUIT,
    _QUIC,
    _QUIC_V1,
    Protocol(448, "tls", 0),
    Protocol(454, "noise", 0),
    Protocol(465, "webtransport", 0),
    Protocol(477, "ws", 0),
    Protocol(478, "wss", 0),
    Protocol(280, "webrtc-direct", 0),
    Protocol(281, "webrtc", 0),
)
"""The protocols this codec understands (codes from multiformats ``protocols.csv``)."""

_BY_CODE: Final = {protocol.code: protocol for protocol in PROTOCOLS}
_BY_NAME: Final = {protocol.name: protocol for protocol in PROTOCOLS} | {"ipfs": _P2P}
_CODECS: Final[dict[int, _Codec]] = {
    _IP4.code: (_ip4_to_bytes, _ip4_to_text),
    _IP6.code: (_ip6_to_bytes, _ip6_to_text),
    _TCP.code: (_port_to_bytes, _port_to_text),
    _UDP.code: (_port_to_bytes, _port_to_text),
    _DNS.code: (_name_to_bytes, _name_to_text),
    _DNS4.code: (_name_to_bytes, _name_to_text),
    _DNS6.code: (_name_to_bytes, _name_to_text),
    _DNSADDR.code: (_name_to_bytes, _name_to_text),
    _P2P.code: (_peer_id_to_bytes, _peer_id_to_text),
}
_HOSTS: Final = frozenset({_IP4.code, _IP6.code, _DNS.code, _DNS4.code, _DNS6.code})

_Component = tuple[Protocol, bytes]


@final
class Multiaddr:
    """An immutable, hashable multiaddr; equal when the binary forms are equal.

    ``Multiaddr("/ip4/…")`` parses text; `from_bytes` parses the binary form. A multiaddr has
    at least one component.
    """

    __slots__ = ("_bytes", "_components")

    _bytes: bytes
    _components: tuple[_Component, ...]

    def __init__(self, text: str) -> None:
        """Parse the text form; raises `InvalidMultiaddr`."""
        if not isinstance(text, str):
            raise InvalidMultiaddr(f"multiaddr text must be str, not {type(text).__name__}")
        self._set(_parse_text(text))

    def _set(self, components: Iterable[_Component]) -> None:
        parts = tuple(components)
        if not parts:
            raise InvalidMultiaddr("empty multiaddr")
        data = b"".join(_encode_component(protocol, value) for protocol, value in parts)
        if len(data) > MAX_MULTIADDR_BYTES:
            raise InvalidMultiaddr(
                f"multiaddr of {len(data)} bytes; the limit is {MAX_MULTIADDR_BYTES}"
            )
        object.__setattr__(self, "_components", parts)
        object.__setattr__(self, "_bytes", data)

    @classmethod
    def _from_components(cls, components: Iterable[_Component]) -> Multiaddr:
        addr = cls.__new__(cls)
        addr._set(components)
        return addr

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        """Parse the binary form; raises `InvalidMultiaddr`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidMultiaddr(f"multiaddr bytes must be bytes, not {type(data).__name__}")
        return cls._from_components(_parse_bytes(bytes(data)))

    @classmethod
    def from_udp(
        cls, host: str, port: int, *, quic: bool = True, peer_id: PeerId | None = None
    ) -> Multiaddr:
        """``/ip4|ip6|dns/<host>/udp/<port>`` (+ ``/quic-v1`` if ``quic``, + ``/p2p/<id>``).

        An IP literal becomes ``ip4`` or ``ip6``; anything else is a ``dns`` name.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise InvalidMultiaddr(f"UDP port {port!r} is not in 0 … 65535")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            host_part: _Component = (_DNS, _name_to_bytes(host))
        else:
            if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
                raise InvalidMultiaddr(f"IPv6 address {host!r} has a zone; zones are not supported")
            host_part = (_IP4 if address.version == 4 else _IP6, address.packed)
        parts = [host_part, (_UDP, port.to_bytes(2, "big"))]
        if quic:
            parts.append((_QUIC_V1, b""))
        if peer_id is not None:
            parts.append((_P2P, peer_id.to_bytes()))
        return cls._from_components(parts)

    # --- views --------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The binary form."""
        return self._bytes

    @property
    def components(self) -> list[tuple[str, str | None]]:
        """``(protocol name, text value)`` pairs, left to right; the value is ``None`` for
        protocols that carry none (``quic-v1``, ``p2p-circuit`` …)."""
        return [
            (protocol.name, None if protocol.size == 0 else _value_to_text(protocol, value))
            for protocol, value in self._components
        ]

    @property
    def protocols(self) -> list[str]:
        """The protocol names, left to right."""
        return [protocol.name for protocol, _ in self._components]

    def value_for(self, name: str) -> str | None:
        """The text value of the first component named ``name``, or ``None`` if there is none."""
        for protocol, value in self._components:
            if protocol.name == name:
                return _value_to_text(protocol, value)
        return None

    @property
    def peer_id(self) -> PeerId | None:
        """The peer ID of the last ``/p2p/`` component (the target, in a circuit address)."""
        for protocol, value in reversed(self._components):
            if protocol is _P2P:
                return PeerId.from_bytes(value)
        return None

    # --- composition --------------------------------------------------------------------------

    def encapsulate(self, other: Multiaddr | str) -> Multiaddr:
        """This address followed by ``other`` (``/ip4/…/udp/1`` + ``/quic-v1``)."""
        other_addr = other if isinstance(other, Multiaddr) else Multiaddr(other)
        return Multiaddr._from_components(self._components + other_addr._components)

    def decapsulate(self, other: Multiaddr | str) -> Multiaddr:
        """This address cut before the last occurrence of ``other``; unchanged if absent.

        Raises `InvalidMultiaddr` if nothing would be left.
        """
        other_addr = other if isinstance(other, Multiaddr) else Multiaddr(other)
        mine, theirs = self._components, other_addr._components
        for start in range(len(mine) - len(theirs), -1, -1):
            if mine[start : start + len(theirs)] == theirs:
                return Multiaddr._from_components(mine[:start])
        return self

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        """This address ending in ``/p2p/<peer_id>``.

        Returns ``self`` if it already ends with that peer ID; raises `InvalidMultiaddr` if it
        ends with a different one (replacing it silently would hide a mix-up).
        """
        if self._components[-1][0] is _P2P:
            if self._components[-1][1] == peer_id.to_bytes():
                return self
            raise InvalidMultiaddr(
                f"{self} already names peer {self.peer_id}, not {peer_id}; "
                "call without_peer_id() first to replace it"
            )
        return Multiaddr._from_components((*self._components, (_P2P, peer_id.to_bytes())))

    def without_peer_id(self) -> Multiaddr:
        """This address without its trailing ``/p2p/<id>`` (unchanged if there is none)."""
        if self._components[-1][0] is not _P2P:
            return self
        return Multiaddr._from_components(self._components[:-1])

    # --- transport helpers --------------------------------------------------------------------

    def to_udp_address(self) -> tuple[str, int]:
        """``(host, port)`` of an address starting ``/ip4|ip6|dns|dns4|dns6/<host>/udp/<port>``.

        The host is the IP text or the DNS name (unresolved). Raises `InvalidMultiaddr` for
        any other shape.
        """
        if (
            len(self._components) < 2
            or self._components[0][0].code not in _HOSTS
            or self._components[1][0] is not _UDP
        ):
            raise InvalidMultiaddr(f"{self} is not a UDP address (/<ip or dns>/<host>/udp/<port>)")
        (host_protocol, host), (_, port) = self._components[0], self._components[1]
        return _value_to_text(host_protocol, host), int.from_bytes(port, "big")

    @property
    def is_quic_v1(self) -> bool:
        """Whether this is a direct QUIC-v1 address: ``/<host>/udp/<port>/quic-v1[/p2p/<id>]``."""
        parts = self._components
        return (
            len(parts) in (3, 4)
            and parts[0][0].code in _HOSTS
            and parts[1][0] is _UDP
            and parts[2][0] is _QUIC_V1
            and (len(parts) == 3 or parts[3][0] is _P2P)
        )

    # --- object protocol ----------------------------------------------------------------------

    def __str__(self) -> str:
        out: list[str] = []
        for protocol, value in self._components:
            out.append("/" + protocol.name)
            if protocol.size != 0:
                out.append("/" + _value_to_text(protocol, value))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Multiaddr):
            return NotImplemented
        return self._bytes == other._bytes

    def __hash__(self) -> int:
        return hash((Multiaddr, self._bytes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Multiaddr is immutable")

    def __reduce__(self) -> tuple[Callable[[bytes], Multiaddr], tuple[bytes]]:
        return (Multiaddr.from_bytes, (self._bytes,))


def _value_to_text(protocol: Protocol, value: bytes) -> str:
    return _CODECS[protocol.code][1](value)


def _encode_component(protocol: Protocol, value: bytes) -> bytes:
    head = varint.encode(protocol.code)
    if protocol.size < 0:
        return head + varint.encode(len(value)) + value
    return head + value


def _parse_text(text: str) -> Iterator[_Component]:
    if len(text) > 4 * MAX_MULTIADDR_BYTES:
        raise InvalidMultiaddr(f"multiaddr text of {len(text)} characters is too long")
    if not text.startswith("/"):
        raise InvalidMultiaddr(f"multiaddr {text[:64]!r} must start with '/'")
    parts = text[1:].split("/")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing slash is tolerated
    index = 0
    while index < len(parts):
        name = parts[index]
        protocol = _BY_NAME.get(name)
        if protocol is None:
            if not name:
                raise InvalidMultiaddr(f"empty protocol name in {text[:64]!r}")
            raise InvalidMultiaddr(f"unknown or unsupported multiaddr protocol {name[:32]!r}")
        index += 1
        if protocol.size == 0:
            yield protocol, b""
            continue
        if index >= len(parts):
            raise InvalidMultiaddr(f"/{protocol.name} needs a value")
        value = _CODECS[protocol.code][0](parts[index])
        index += 1
        yield protocol, value


def _parse_bytes(data: bytes) -> Iterator[_Component]:
    if len(data) > MAX_MULTIADDR_BYTES:
        raise InvalidMultiaddr(
            f"multiaddr of {len(data)} bytes; the limit is {MAX_MULTIADDR_BYTES}"
        )
    offset = 0
    try:
        while offset < len(data):
            code, offset = varint.decode(data, offset)
            protocol = _BY_CODE.get(code)
            if protocol is None:
                raise InvalidMultiaddr(f"unknown or unsupported multiaddr protocol code {code}")
            size = protocol.size
            if size < 0:
                size, offset = varint.decode(data, offset)
            if size > len(data) - offset:
                raise InvalidMultiaddr(f"/{protocol.name} value runs past the end of the input")
            value = data[offset : offset + size]
            offset += size
            if protocol.size < 0:
                _value_to_text(protocol, value)  # names and peer IDs must be valid, too
            yield protocol, value
    except InvalidVarint as exc:
        raise InvalidMultiaddr(f"malformed multiaddr bytes: {exc}") from None
