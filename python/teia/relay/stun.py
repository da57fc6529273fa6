"""STUN and TURN messages (RFC 8489, RFC 8656): a strict, bounded, sans-IO codec.

A message is a 20-byte header (type = method and class bits interleaved, length, the magic
cookie, a 96-bit transaction ID) and attributes (type, length, value, padded to 4 bytes).
`parse` keeps every attribute in order as raw ``(type, value)`` pairs and checks only the
framing and the FINGERPRINT; typed values are read with the ``decode_*`` helpers, which
raise `InvalidStunMessage` for anything out of shape. `MessageBuilder` writes messages,
appending MESSAGE-INTEGRITY (HMAC-SHA1), MESSAGE-INTEGRITY-SHA256 and FINGERPRINT last, with
the length field set the way RFC 8489 section 14.5 wants while each is computed.

Rules kept here (the server core relies on them):

- At most `MAX_MESSAGE_SIZE` bytes and `MAX_ATTRIBUTES` attributes; text attributes have the
  RFC's byte limits.
- Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are
  ignored (dropped from `attributes`), as RFC 8489 section 14.5 says; FINGERPRINT must be
  last, and a wrong one makes the message invalid.
- Padding bytes are skipped whatever their value (RFC 5769's samples pad with spaces).

ChannelData (RFC 8656 section 12.4) is a 4-byte header (channel number 0x4000-0x4FFF,
length) and the application data; over TCP it is padded to 4 bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import stringprep
import struct
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from teia.errors import InvalidStunMessage

__all__ = [
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "MAX_ATTRIBUTES",
    "MAX_MESSAGE_SIZE",
    "Attr",
    "MessageBuilder",
    "MessageClass",
    "Method",
    "StunMessage",
    "decode_address",
    "decode_channel_number",
    "decode_error_code",
    "decode_lifetime",
    "decode_requested_family",
    "decode_requested_transport",
    "decode_text",
    "decode_unknown_attributes",
    "decode_xor_address",
    "encode_address",
    "encode_channel_data",
    "encode_xor_address",
    "frame_length",
    "is_channel_data",
    "is_stun",
    "iter_frames",
    "long_term_key",
    "parse",
    "parse_channel_data",
    "saslprep",
]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
MAX_MESSAGE_SIZE = 65_535 + HEADER_SIZE
"""The largest message the length field can describe; UDP callers see far smaller ones."""
MAX_ATTRIBUTES = 64
"""More attributes than any legitimate STUN/TURN message carries."""
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
"""Channel numbers a client may bind (RFC 8656 section 12; 0x5000-0x7FFF are reserved)."""

_FINGERPRINT_XOR = 0x5354554E
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")

# Byte limits of text attributes (RFC 8489 section 14; RFC 8656 has none of its own).
_TEXT_LIMITS = {0x0006: 513, 0x0014: 763, 0x0015: 763, 0x8022: 763}
_REASON_LIMIT = 763


class Method(enum.IntEnum):
    """STUN methods this relay knows (RFC 8489 section 18.2, RFC 8656 section 17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(enum.IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(enum.IntEnum):
    """Attribute types (RFC 8489 section 18.3, RFC 8656 section 18, RFC 8445 for ICE)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


def _message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, MessageClass]:
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    cls = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(cls)


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A parsed STUN message. ``raw`` is the exact wire bytes (integrity is checked on them).

    ``integrity_at``, ``integrity_sha256_at`` and ``fingerprint_at`` are the byte offsets of
    those attributes' headers in ``raw`` (None when absent).
    """

    method: int
    cls: MessageClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes
    integrity_at: int | None = None
    integrity_sha256_at: int | None = None
    fingerprint_at: int | None = None

    def get(self, attr: int) -> bytes | None:
        """The value of the first ``attr`` attribute, or None."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def get_all(self, attr: int) -> list[bytes]:
        return [value for kind, value in self.attributes if kind == attr]

    def has(self, attr: int) -> bool:
        return any(kind == attr for kind, _ in self.attributes)

    @property
    def has_fingerprint(self) -> bool:
        return self.fingerprint_at is not None

    @property
    def has_integrity(self) -> bool:
        return self.integrity_at is not None or self.integrity_sha256_at is not None

    def unknown_comprehension_required(self, known: Iterable[int]) -> list[int]:
        """Comprehension-required types (0x0000-0x7FFF) not in ``known``, each once, in order;
        the server answers 420 with these in UNKNOWN-ATTRIBUTES."""
        known_set = set(known)
        unknown: list[int] = []
        for kind, _ in self.attributes:
            if kind < 0x8000 and kind not in known_set and kind not in unknown:
                unknown.append(kind)
        return unknown

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY (HMAC-SHA1) and, when present, MESSAGE-INTEGRITY-SHA256
        with ``key``; False when neither is present or either does not match."""
        if not self.has_integrity:
            return False
        if self.integrity_at is not None and not self._check_mac(self.integrity_at, key, "sha1"):
            return False
        return self.integrity_sha256_at is None or self._check_mac(
            self.integrity_sha256_at, key, "sha256"
        )

    def _check_mac(self, offset: int, key: bytes, digest: str) -> bool:
        _, length = _ATTR_HEADER.unpack_from(self.raw, offset)
        received = self.raw[offset + 4 : offset + 4 + length]
        # The length field counts attributes up to and including this one (section 14.5).
        covered = _with_length(self.raw[:offset], offset - HEADER_SIZE + 4 + length)
        expected = hmac.new(key, covered, digest).digest()[: len(received)]
        return hmac.compare_digest(expected, received)


def _with_length(prefix: bytes, length: int) -> bytes:
    return prefix[:2] + struct.pack("!H", length) + prefix[4:]


def is_stun(data: bytes) -> bool:
    """Whether ``data`` starts like a STUN message (top bits 00 and the magic cookie)."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES


def is_channel_data(data: bytes) -> bool:
    """Whether ``data`` starts like ChannelData (top bits 01)."""
    return len(data) >= 4 and 0x40 <= data[0] < 0x80


def _fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF


def parse(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> StunMessage:
    """Parse one whole STUN message; raise `InvalidStunMessage` if it is anything else."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise InvalidStunMessage(f"STUN message of {len(data)} bytes is shorter than its header")
    if len(data) > max_size:
        raise InvalidStunMessage(f"STUN message of {len(data)} bytes is over {max_size}")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise InvalidStunMessage("not a STUN message (the two top bits are not zero)")
    if cookie != MAGIC_COOKIE:
        raise InvalidStunMessage("not a STUN message (no magic cookie)")
    if length % 4:
        raise InvalidStunMessage(f"STUN length {length} is not a multiple of 4")
    if HEADER_SIZE + length != len(data):
        raise InvalidStunMessage(
            f"STUN length field says {length} bytes of attributes, {len(data) - HEADER_SIZE} came"
        )
    method, cls = _split_type(message_type)
    attributes: list[tuple[int, bytes]] = []
    integrity_at = integrity_sha256_at = fingerprint_at = None
    offset = HEADER_SIZE
    count = 0
    while offset < len(data):
        if fingerprint_at is not None:
            raise InvalidStunMessage("attribute after FINGERPRINT")
        if len(data) - offset < 4:
            raise InvalidStunMessage("truncated attribute header")
        kind, size = _ATTR_HEADER.unpack_from(data, offset)
        end = offset + 4 + size
        if end > len(data):
            raise InvalidStunMessage(f"attribute 0x{kind:04x} runs past the end of the message")
        count += 1
        if count > MAX_ATTRIBUTES:
            raise InvalidStunMessage(f"more than {MAX_ATTRIBUTES} attributes")
        value = data[offset + 4 : end]
        if kind == Attr.FINGERPRINT:
            if size != 4:
                raise InvalidStunMessage("FINGERPRINT must be 4 bytes")
            if struct.unpack("!I", value)[0] != _fingerprint(data[:offset]):
                raise InvalidStunMessage("FINGERPRINT does not match")
            fingerprint_at = offset
        elif (
            kind == Attr.MESSAGE_INTEGRITY and integrity_at is None and integrity_sha256_at is None
        ):
            if size != 20:
                raise InvalidStunMessage("MESSAGE-INTEGRITY must be 20 bytes")
            integrity_at = offset
        elif kind == Attr.MESSAGE_INTEGRITY_SHA256 and integrity_sha256_at is None:
            if size < 16 or size > 32 or size % 4:
                raise InvalidStunMessage("MESSAGE-INTEGRITY-SHA256 must be 16-32 bytes, by 4")
            integrity_sha256_at = offset
        elif integrity_at is None and integrity_sha256_at is None:
            attributes.append((kind, value))
        # else: after the integrity attributes, anything but FINGERPRINT is ignored.
        offset = end + (-size % 4)
    if offset != len(data):  # pragma: no cover - the length checks above make this unreachable
        raise InvalidStunMessage("padding runs past the end of the message")
    return StunMessage(
        method=method,
        cls=cls,
        transaction_id=transaction_id,
        attributes=tuple(attributes),
        raw=data,
        integrity_at=integrity_at,
        integrity_sha256_at=integrity_sha256_at,
        fingerprint_at=fingerprint_at,
    )


# --- typed attribute values -------------------------------------------------------------------


def decode_text(attr: int, value: bytes) -> str:
    """USERNAME, REALM, NONCE, SOFTWARE: UTF-8 within the RFC's byte limit."""
    limit = _TEXT_LIMITS.get(attr, _REASON_LIMIT)
    if len(value) > limit:
        raise InvalidStunMessage(f"attribute 0x{attr:04x} is over {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidStunMessage(f"attribute 0x{attr:04x} is not UTF-8") from None


def _address_bytes(family: int, packed: bytes) -> str:
    return str(ipaddress.IPv4Address(packed) if family == 1 else ipaddress.IPv6Address(packed))


def decode_address(value: bytes) -> tuple[str, int]:
    """MAPPED-ADDRESS (and other plain address attributes): ``(ip, port)``."""
    family, port, packed = _split_address(value)
    return _address_bytes(family, packed), port


def _split_address(value: bytes) -> tuple[int, int, bytes]:
    if len(value) < 4:
        raise InvalidStunMessage("address attribute shorter than 4 bytes")
    family = value[1]
    expected = {1: 8, 2: 20}.get(family)
    if expected is None:
        raise InvalidStunMessage(f"unknown address family 0x{family:02x}")
    if len(value) != expected:
        raise InvalidStunMessage(f"address attribute of family {family} must be {expected} bytes")
    return family, struct.unpack_from("!H", value, 2)[0], value[4:]


def _xor_mask(family: int, transaction_id: bytes) -> bytes:
    return _COOKIE_BYTES if family == 1 else _COOKIE_BYTES + transaction_id


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS: ``(ip, port)``."""
    family, port, packed = _split_address(value)
    mask = _xor_mask(family, transaction_id)
    plain = bytes(a ^ b for a, b in zip(packed, mask, strict=True))
    return _address_bytes(family, plain), port ^ (MAGIC_COOKIE >> 16)


def _pack_ip(ip: str) -> tuple[int, bytes]:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidStunMessage(f"{ip!r} is not an IP address") from None
    return (1 if address.version == 4 else 2), address.packed


def encode_address(ip: str, port: int) -> bytes:
    family, packed = _pack_ip(ip)
    return struct.pack("!BBH", 0, family, port) + packed


def encode_xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    family, packed = _pack_ip(ip)
    mask = _xor_mask(family, transaction_id)
    xored = bytes(a ^ b for a, b in zip(packed, mask, strict=True))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + xored


def decode_error_code(value: bytes) -> tuple[int, str]:
    """ERROR-CODE: ``(code, reason)`` with code 300-699."""
    if len(value) < 4:
        raise InvalidStunMessage("ERROR-CODE shorter than 4 bytes")
    code = (value[2] & 0x07) * 100 + value[3]
    if not 300 <= code <= 699 or value[3] > 99:
        raise InvalidStunMessage(f"ERROR-CODE {code} is out of range")
    return code, decode_text(Attr.ERROR_CODE, value[4:])


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise InvalidStunMessage("UNKNOWN-ATTRIBUTES has an odd length")
    return [int(v) for v in struct.unpack(f"!{len(value) // 2}H", value)]


def _u32(attr: str, value: bytes) -> int:
    if len(value) != 4:
        raise InvalidStunMessage(f"{attr} must be 4 bytes")
    return int(struct.unpack("!I", value)[0])


def decode_lifetime(value: bytes) -> int:
    """LIFETIME: seconds."""
    return _u32("LIFETIME", value)


def decode_requested_transport(value: bytes) -> int:
    """REQUESTED-TRANSPORT: the IP protocol number (17 for UDP)."""
    if len(value) != 4:
        raise InvalidStunMessage("REQUESTED-TRANSPORT must be 4 bytes")
    return value[0]


def decode_requested_family(value: bytes) -> int:
    """REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY: 1 (IPv4) or 2 (IPv6)."""
    if len(value) != 4:
        raise InvalidStunMessage("address family attribute must be 4 bytes")
    return value[0]


def decode_channel_number(value: bytes) -> int:
    if len(value) != 4:
        raise InvalidStunMessage("CHANNEL-NUMBER must be 4 bytes")
    return int(struct.unpack_from("!H", value)[0])


# --- building ---------------------------------------------------------------------------------


class MessageBuilder:
    """Build one message: ``MessageBuilder(method, cls, tid).add(...).finish(key=...)``."""

    def __init__(self, method: int, cls: MessageClass, transaction_id: bytes) -> None:
        if len(transaction_id) != 12:
            raise ValueError("a STUN transaction ID is 12 bytes")
        if not 0 <= method <= 0xFFF:
            raise ValueError("a STUN method is 12 bits")
        self.method = method
        self.cls = cls
        self.transaction_id = transaction_id
        self._body = bytearray()
        self._count = 0

    def add(self, attr: int, value: bytes) -> MessageBuilder:
        if len(value) > 0xFFFF:
            raise ValueError("a STUN attribute value is at most 65535 bytes")
        self._count += 1
        if self._count > MAX_ATTRIBUTES:
            raise ValueError(f"more than {MAX_ATTRIBUTES} attributes")
        self._body += _ATTR_HEADER.pack(attr, len(value)) + value + bytes(-len(value) % 4)
        return self

    def add_text(self, attr: int, text: str) -> MessageBuilder:
        return self.add(attr, text.encode("utf-8"))

    def add_u32(self, attr: int, number: int) -> MessageBuilder:
        return self.add(attr, struct.pack("!I", number))

    def add_xor_address(self, attr: int, ip: str, port: int) -> MessageBuilder:
        return self.add(attr, encode_xor_address(ip, port, self.transaction_id))

    def add_error(self, code: int, reason: str) -> MessageBuilder:
        encoded = reason.encode("utf-8")[:_REASON_LIMIT]
        return self.add(Attr.ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + encoded)

    def add_unknown_attributes(self, kinds: Iterable[int]) -> MessageBuilder:
        values = list(kinds)
        return self.add(Attr.UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(values)}H", *values))

    def _header(self, length: int) -> bytes:
        return _HEADER.pack(
            _message_type(self.method, self.cls), length, MAGIC_COOKIE, self.transaction_id
        )

    def finish(
        self,
        *,
        key: bytes | None = None,
        sha256: bool = False,
        fingerprint: bool = False,
    ) -> bytes:
        """The message, with MESSAGE-INTEGRITY (and -SHA256 if ``sha256``) under ``key`` and
        a FINGERPRINT if asked for, in the order RFC 8489 requires."""
        body = bytes(self._body)
        if key is not None:
            for attr, digest, size in (
                (Attr.MESSAGE_INTEGRITY, "sha1", 20),
                *([(Attr.MESSAGE_INTEGRITY_SHA256, "sha256", 32)] if sha256 else []),
            ):
                covered = self._header(len(body) + 4 + size) + body
                mac = hmac.new(key, covered, digest).digest()[:size]
                body += _ATTR_HEADER.pack(attr, size) + mac
        if fingerprint:
            crc = _fingerprint(self._header(len(body) + 8) + body)
            body += _ATTR_HEADER.pack(Attr.FINGERPRINT, 4) + struct.pack("!I", crc)
        if len(body) > 0xFFFF:
            raise ValueError("STUN message over 65535 bytes of attributes")
        return self._header(len(body)) + body


# --- ChannelData and stream framing -------------------------------------------------------------


def parse_channel_data(data: bytes) -> tuple[int, bytes]:
    """ChannelData: ``(channel, application data)``. Trailing padding (TCP) is allowed; a
    length past the end, or a channel outside 0x4000-0x4FFF, is invalid."""
    if len(data) < 4:
        raise InvalidStunMessage("ChannelData shorter than its 4-byte header")
    channel, length = struct.unpack_from("!HH", data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise InvalidStunMessage(f"channel number 0x{channel:04x} is outside 0x4000-0x4FFF")
    if 4 + length > len(data):
        raise InvalidStunMessage("ChannelData is truncated")
    if len(data) - 4 - length > 3:
        raise InvalidStunMessage("ChannelData has more than 3 bytes of padding")
    return channel, bytes(data[4 : 4 + length])


def encode_channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    """ChannelData for ``channel``; ``pad`` (required over TCP) pads to a multiple of 4."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError(f"channel number 0x{channel:04x} is outside 0x4000-0x4FFF")
    if len(payload) > 0xFFFF:
        raise ValueError("ChannelData carries at most 65535 bytes")
    frame = struct.pack("!HH", channel, len(payload)) + payload
    return frame + bytes(-len(frame) % 4) if pad else frame


def frame_length(buffer: bytes | bytearray) -> int | None:
    """Over a stream (TURN over TCP): the size of the frame at the start of ``buffer``, or
    None when the 4 bytes that tell are not there yet. STUN frames are ``20 + length``;
    ChannelData frames ``4 + length`` padded to 4. Raise `InvalidStunMessage` when the
    buffer starts with neither (the stream is out of sync and must be closed)."""
    if len(buffer) < 4:
        return None
    first = buffer[0]
    length = (buffer[2] << 8) | buffer[3]
    if first < 0x40:
        if length % 4:
            raise InvalidStunMessage("STUN length is not a multiple of 4")
        return HEADER_SIZE + length
    if first < 0x80:
        channel = (first << 8) | buffer[1]
        if channel > CHANNEL_MAX:
            raise InvalidStunMessage(f"channel number 0x{channel:04x} is reserved")
        return 4 + length + (-length % 4)
    raise InvalidStunMessage("neither STUN nor ChannelData on the stream")


def iter_frames(buffer: bytearray) -> Iterator[bytes]:
    """Take every complete frame off the front of ``buffer`` (which is consumed)."""
    while True:
        size = frame_length(buffer)
        if size is None or len(buffer) < size:
            return
        frame = bytes(buffer[:size])
        del buffer[:size]
        yield frame


# --- credentials ------------------------------------------------------------------------------


def saslprep(text: str) -> str:
    """SASLprep (RFC 4013) of a password, as RFC 5389 long-term credentials use it: map
    soft-hyphen-like characters to nothing and other spaces to U+0020, NFKC-normalise, and
    refuse prohibited or badly mixed bidirectional characters (`ValueError`)."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    normalised = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for ch in normalised:
        if any(check(ch) for check in prohibited):
            raise ValueError("password contains a character SASLprep prohibits")
    if any(stringprep.in_table_d1(ch) for ch in normalised) and (
        any(stringprep.in_table_d2(ch) for ch in normalised)
        or not (stringprep.in_table_d1(normalised[0]) and stringprep.in_table_d1(normalised[-1]))
    ):
        raise ValueError("password mixes bidirectional text as SASLprep forbids")
    return normalised


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key: MD5(username ":" realm ":" SASLprep(password))."""
    text = f"{username}:{realm}:{saslprep(password)}"
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()
