"""Signed peer records: where a peer can be reached, signed by the peer itself.

A record is a libp2p ``PeerRecord`` (RFC 0003) with three teia fields that other libp2p
implementations skip, wrapped in a libp2p signed ``Envelope`` (RFC 0002)::

    message Envelope {
      PublicKey public_key = 1;   // libp2p PublicKey protobuf; teia accepts Ed25519 only
      bytes payload_type = 2;     // 0x03 0x01: multicodec libp2p-peer-record (0x0301)
      bytes payload = 3;          // the PeerRecord below
      bytes signature = 5;        // Ed25519 over the signing buffer below
    }
    message PeerRecord {
      bytes peer_id = 1;  uint64 seq = 2;
      message AddressInfo { bytes multiaddr = 1; }
      repeated AddressInfo addresses = 3;
      repeated string protocols = 10;  // teia: protocols the peer speaks
      uint64 issued_at_ms = 11;        // teia: unix ms when signed ("last seen"); required
      uint32 ttl_s = 12;               // teia: lifetime after issued_at_ms; default 7200
    }

The signature covers ``varint(len(domain)) ‖ domain ‖ varint(len(payload_type)) ‖
payload_type ‖ varint(len(payload)) ‖ payload`` with the domain ``"libp2p-peer-record"``. The
payload type is the two bytes ``03 01`` (the code 0x0301 big-endian, *not* its varint), as
go-libp2p, js-libp2p and py-libp2p write it, so their peers can read teia records.

A record is accepted (`SignedPeerRecord.decode`) only if, in this order: the envelope fits in
`MAX_ENVELOPE_SIZE` and parses; its payload type is the peer record one; its key is Ed25519;
the signature verifies (before the payload is even parsed, as RFC 0003 asks); the payload
parses within the limits; the key's peer ID is the record's ``peer_id``; the TTL is 1 s to
24 h; ``issued_at_ms`` is at most 5 minutes ahead of ``now``; and ``issued_at + ttl`` is not
before ``now``. Each failure raises its own `InvalidRecord` subclass (``reason`` says which).
Addresses that teia's multiaddr codec does not understand are skipped (counted in
``skipped_addrs``), so a newer peer's record still serves older nodes.

In the DHT a record lives under ``/teia-peer/ ‖ binary peer ID`` (`record_key`). A higher
``seq`` replaces a lower one; an equal ``seq`` keeps the record already held (`better`,
`check_replaces`). Sequence numbers default to the unix time in milliseconds, raised past the
last one this process issued (`next_sequence`), so they grow across restarts without state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from teia.errors import (
    BadRecordSignature,
    ExpiredRecord,
    FutureRecord,
    InvalidKeyEncoding,
    InvalidMultiaddr,
    InvalidPeerId,
    InvalidProtobuf,
    MalformedRecord,
    OversizeRecord,
    RecordKeyMismatch,
    StaleRecord,
    WrongRecordSigner,
)
from teia.host.protobuf import encode_bytes_field, encode_uvarint, iter_fields
from teia.identity import Identity, KeyType, Multiaddr, PeerId, verify
from teia.identity.keys import decode_public_key, encode_public_key
from teia.identity.varint import MAX_VALUE

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_ADDRS",
    "MAX_CLOCK_SKEW_MS",
    "MAX_ENVELOPE_SIZE",
    "MAX_PROTOCOLS",
    "MAX_PROTOCOL_LENGTH",
    "MAX_TTL_S",
    "PEER_RECORD_DOMAIN",
    "PEER_RECORD_PAYLOAD_TYPE",
    "RECORD_KEY_PREFIX",
    "DhtValue",
    "Envelope",
    "PeerRecord",
    "SignedPeerRecord",
    "better",
    "check_replaces",
    "next_sequence",
    "peer_id_from_key",
    "record_key",
    "unix_ms",
]

PEER_RECORD_DOMAIN: Final = "libp2p-peer-record"
"""The signed-envelope domain string of peer records."""
PEER_RECORD_PAYLOAD_TYPE: Final = b"\x03\x01"
"""The envelope payload type of peer records (multicodec 0x0301, big-endian bytes)."""
RECORD_KEY_PREFIX: Final = b"/teia-peer/"
"""DHT keys of peer records: this prefix, then the binary peer ID."""

DEFAULT_TTL_S: Final = 2 * 60 * 60
MAX_TTL_S: Final = 24 * 60 * 60
MAX_CLOCK_SKEW_MS: Final = 5 * 60 * 1000
"""How far in the future ``issued_at_ms`` may be (the signer's clock may run ahead)."""
MAX_ENVELOPE_SIZE: Final = 8 * 1024
"""Bytes of a whole signed envelope; fits a kad-dht ``Record.value`` (16 KiB) with room."""
MAX_ADDRS: Final = 32
MAX_PROTOCOLS: Final = 64
MAX_PROTOCOL_LENGTH: Final = 256
"""Bytes (UTF-8) of one protocol ID."""

_VARINT, _LEN = 0, 2
_PUBLIC_KEY, _PAYLOAD_TYPE, _PAYLOAD, _SIGNATURE = 1, 2, 3, 5
_PEER_ID, _SEQ, _ADDRESSES, _MULTIADDR = 1, 2, 3, 1
_PROTOCOLS, _ISSUED_AT, _TTL = 10, 11, 12


def unix_ms() -> int:
    """The current unix time in milliseconds (the wall clock; tests pass their own)."""
    return time.time_ns() // 1_000_000


class DhtValue(Protocol):
    """What the DHT stores under a key: a validated, signed, sequence-numbered value.

    `SignedPeerRecord` (``/teia-peer/`` keys) and `teia.dht.devicelists.DeviceListRecord`
    (``/teia-devices/`` keys) are the two kinds. ``peer_id`` is the signer's ID (the peer, or
    the account), ``envelope`` the exact bytes that travel and are stored.
    """

    @property
    def key(self) -> bytes:
        """The DHT key the value lives under."""
        ...

    @property
    def envelope(self) -> bytes:
        """The signed bytes, stored and forwarded as they are."""
        ...

    @property
    def peer_id(self) -> PeerId:
        """Whose value it is: the key that signed it, in peer-ID form."""
        ...

    @property
    def seq(self) -> int:
        """The sequence number: a higher one replaces a lower one."""
        ...

    @property
    def expires_at_ms(self) -> int:
        """Unix ms after which nobody keeps or serves it."""
        ...

    def is_expired(self, at_ms: int) -> bool:
        """Whether it is past ``expires_at_ms`` at ``at_ms``."""
        ...


_sequence_lock = threading.Lock()
_last_sequence = 0


def next_sequence(at_ms: int | None = None) -> int:
    """A sequence number above every one this process issued, and at least ``at_ms``.

    ``at_ms`` defaults to the current unix time in ms: after a restart the clock has moved on,
    so the numbers keep growing without any stored state (RFC 0003 allows this).
    """
    global _last_sequence
    at = unix_ms() if at_ms is None else at_ms
    with _sequence_lock:
        _last_sequence = max(at, _last_sequence + 1)
        return _last_sequence


def record_key(peer_id: PeerId) -> bytes:
    """The DHT key of ``peer_id``'s record: ``b"/teia-peer/" + peer_id.to_bytes()``."""
    return RECORD_KEY_PREFIX + peer_id.to_bytes()


def peer_id_from_key(key: bytes) -> PeerId:
    """The peer a record key names; raises `RecordKeyMismatch` if it is not such a key."""
    if not key.startswith(RECORD_KEY_PREFIX):
        raise RecordKeyMismatch(f"a peer record key starts with {RECORD_KEY_PREFIX!r}")
    try:
        return PeerId.from_bytes(key[len(RECORD_KEY_PREFIX) :])
    except InvalidPeerId as exc:
        raise RecordKeyMismatch(f"peer record key does not end in a peer ID: {exc}") from None


# --- protobuf helpers ----------------------------------------------------------------------


def _fields(data: bytes, what: str) -> list[tuple[int, int, int | bytes]]:
    try:
        return list(iter_fields(data))
    except InvalidProtobuf as exc:
        raise MalformedRecord(f"{what}: {exc}") from None


def _once(seen: set[int], number: int, what: str) -> None:
    if number in seen:
        raise MalformedRecord(f"{what} field {number} appears more than once")
    seen.add(number)


def _as_bytes(value: int | bytes, wire_type: int, what: str) -> bytes:
    if wire_type != _LEN or not isinstance(value, bytes):
        raise MalformedRecord(f"{what} must be length-delimited (wire type 2)")
    return value


def _as_int(value: int | bytes, wire_type: int, what: str) -> int:
    if wire_type != _VARINT or not isinstance(value, int):
        raise MalformedRecord(f"{what} must be a varint (wire type 0)")
    return value


def _signing_buffer(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    encoded_domain = domain.encode()
    return b"".join(
        encode_uvarint(len(part)) + part for part in (encoded_domain, payload_type, payload)
    )


# --- envelope -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """A libp2p signed envelope (RFC 0002) whose signature has been checked.

    Build one with `seal` or `open`; the constructor does not verify anything.
    """

    public_key: bytes
    """The signer's raw Ed25519 public key."""
    payload_type: bytes
    payload: bytes
    signature: bytes

    @property
    def signer(self) -> PeerId:
        """The peer ID of the signing key."""
        return PeerId.from_public_key(self.public_key)

    def encode(self) -> bytes:
        """The envelope protobuf (fields in number order)."""
        return (
            encode_bytes_field(_PUBLIC_KEY, encode_public_key(self.public_key))
            + encode_bytes_field(_PAYLOAD_TYPE, self.payload_type)
            + encode_bytes_field(_PAYLOAD, self.payload)
            + encode_bytes_field(_SIGNATURE, self.signature)
        )

    @classmethod
    def seal(
        cls,
        identity: Identity,
        payload: bytes,
        *,
        domain: str = PEER_RECORD_DOMAIN,
        payload_type: bytes = PEER_RECORD_PAYLOAD_TYPE,
    ) -> Envelope:
        """Sign ``payload`` with ``identity`` in ``domain``."""
        signature = identity.sign(_signing_buffer(domain, payload_type, payload))
        return cls(identity.public_key, payload_type, payload, signature)

    @classmethod
    def open(
        cls,
        data: bytes,
        *,
        domain: str = PEER_RECORD_DOMAIN,
        payload_type: bytes = PEER_RECORD_PAYLOAD_TYPE,
        max_size: int = MAX_ENVELOPE_SIZE,
    ) -> Envelope:
        """Parse an envelope and verify its signature in ``domain``; nothing else is checked.

        Raises `OversizeRecord`, `MalformedRecord` (including another payload type),
        `WrongRecordSigner` (a key that is not Ed25519) or `BadRecordSignature`.
        """
        if len(data) > max_size:
            raise OversizeRecord(f"envelope of {len(data)} bytes is over the {max_size}-byte limit")
        seen: set[int] = set()
        values: dict[int, bytes] = {}
        for number, wire_type, value in _fields(bytes(data), "envelope"):
            if number in (_PUBLIC_KEY, _PAYLOAD_TYPE, _PAYLOAD, _SIGNATURE):
                raw = _as_bytes(value, wire_type, f"envelope field {number}")
                _once(seen, number, "envelope")
                values[number] = raw
        for number, name in ((1, "public_key"), (2, "payload_type"), (5, "signature")):
            if not values.get(number):
                raise MalformedRecord(f"envelope has no {name}")
        if values[_PAYLOAD_TYPE] != payload_type:
            raise MalformedRecord(
                f"envelope payload type {values[_PAYLOAD_TYPE].hex()} is not {payload_type.hex()}"
            )
        try:
            key_type, public_key = decode_public_key(values[_PUBLIC_KEY])
        except InvalidKeyEncoding as exc:
            raise MalformedRecord(f"envelope public key: {exc}") from None
        if key_type is not KeyType.ED25519:
            raise WrongRecordSigner(f"envelope signed with a {key_type.name} key; only Ed25519")
        payload = values.get(_PAYLOAD, b"")
        buffer = _signing_buffer(domain, values[_PAYLOAD_TYPE], payload)
        if not verify(public_key, buffer, values[_SIGNATURE]):
            raise BadRecordSignature("envelope signature does not verify")
        return cls(public_key, values[_PAYLOAD_TYPE], payload, values[_SIGNATURE])


# --- peer record ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What a peer says about itself: addresses (relayed ``/p2p-circuit`` ones too),
    protocols, and for how long that holds.

    Build one with `create` (fills ``seq`` and ``issued_at_ms`` from the clock), sign it with
    `sign`. Limits are checked when encoding (`encode`, `sign`).
    """

    peer_id: PeerId
    seq: int
    addrs: tuple[Multiaddr, ...]
    protocols: tuple[str, ...]
    issued_at_ms: int
    ttl_s: int = DEFAULT_TTL_S
    skipped_addrs: int = field(default=0, compare=False)
    """Addresses in the signed payload that teia could not parse (decoded records only)."""

    @classmethod
    def create(
        cls,
        peer_id: PeerId,
        addrs: Iterable[Multiaddr],
        protocols: Iterable[str] = (),
        *,
        seq: int | None = None,
        issued_at_ms: int | None = None,
        ttl_s: int = DEFAULT_TTL_S,
    ) -> PeerRecord:
        """A record issued now (or at ``issued_at_ms``), with `next_sequence` unless ``seq``."""
        issued = unix_ms() if issued_at_ms is None else issued_at_ms
        return cls(
            peer_id=peer_id,
            seq=next_sequence(issued) if seq is None else seq,
            addrs=tuple(addrs),
            protocols=tuple(protocols),
            issued_at_ms=issued,
            ttl_s=ttl_s,
        )

    @property
    def expires_at_ms(self) -> int:
        """``issued_at_ms + ttl_s * 1000``: from this instant on it is expired."""
        return self.issued_at_ms + self.ttl_s * 1000

    @property
    def key(self) -> bytes:
        """The DHT key it is stored under (`record_key`)."""
        return record_key(self.peer_id)

    def encode(self) -> bytes:
        """The ``PeerRecord`` payload; raises `OversizeRecord` / `MalformedRecord` if invalid."""
        _check_ttl(self.ttl_s)
        for name, value in (("seq", self.seq), ("issued_at_ms", self.issued_at_ms)):
            if isinstance(value, bool) or not 0 <= value <= MAX_VALUE:
                raise MalformedRecord(f"{name} {value} is outside 0 … 2**63-1")
        if len(self.addrs) > MAX_ADDRS:
            raise OversizeRecord(f"more than {MAX_ADDRS} addresses")
        if len(self.protocols) > MAX_PROTOCOLS:
            raise OversizeRecord(f"more than {MAX_PROTOCOLS} protocols")
        out = bytearray(encode_bytes_field(_PEER_ID, self.peer_id.to_bytes()))
        if self.seq:
            out += encode_uvarint(_SEQ << 3) + encode_uvarint(self.seq)
        for address in self.addrs:
            out += encode_bytes_field(
                _ADDRESSES, encode_bytes_field(_MULTIADDR, address.to_bytes())
            )
        for protocol in self.protocols:
            out += encode_bytes_field(_PROTOCOLS, _check_protocol(protocol.encode()))
        out += encode_uvarint(_ISSUED_AT << 3) + encode_uvarint(self.issued_at_ms)
        out += encode_uvarint(_TTL << 3) + encode_uvarint(self.ttl_s)
        return bytes(out)

    @classmethod
    def decode_payload(cls, payload: bytes) -> PeerRecord:
        """Parse a ``PeerRecord`` payload *without* any signature or time check.

        Only for payloads of an envelope already opened; use `SignedPeerRecord.decode`.
        """
        seen: set[int] = set()
        peer_id: PeerId | None = None
        seq = 0
        issued_at: int | None = None
        ttl_s = DEFAULT_TTL_S
        addrs: list[Multiaddr] = []
        skipped = 0
        protocols: list[str] = []
        for number, wire_type, value in _fields(payload, "PeerRecord"):
            if number == _PEER_ID:
                _once(seen, number, "PeerRecord")
                try:
                    peer_id = PeerId.from_bytes(_as_bytes(value, wire_type, "PeerRecord.peer_id"))
                except InvalidPeerId as exc:
                    raise MalformedRecord(f"PeerRecord.peer_id: {exc}") from None
            elif number == _SEQ:
                _once(seen, number, "PeerRecord")
                seq = _as_int(value, wire_type, "PeerRecord.seq")
            elif number == _ADDRESSES:
                if len(addrs) + skipped == MAX_ADDRS:
                    raise OversizeRecord(f"more than {MAX_ADDRS} addresses")
                address = _address(_as_bytes(value, wire_type, "PeerRecord.addresses"))
                if address is None:
                    skipped += 1
                else:
                    addrs.append(address)
            elif number == _PROTOCOLS:
                if len(protocols) == MAX_PROTOCOLS:
                    raise OversizeRecord(f"more than {MAX_PROTOCOLS} protocols")
                raw = _check_protocol(_as_bytes(value, wire_type, "PeerRecord.protocols"))
                try:
                    protocols.append(raw.decode())
                except UnicodeDecodeError:
                    raise MalformedRecord("a protocol ID is not UTF-8") from None
            elif number == _ISSUED_AT:
                _once(seen, number, "PeerRecord")
                issued_at = _as_int(value, wire_type, "PeerRecord.issued_at_ms")
            elif number == _TTL:
                _once(seen, number, "PeerRecord")
                ttl_s = _as_int(value, wire_type, "PeerRecord.ttl_s")
        if peer_id is None:
            raise MalformedRecord("PeerRecord has no peer_id")
        if issued_at is None:
            raise MalformedRecord("PeerRecord has no issued_at_ms (not a teia peer record)")
        _check_ttl(ttl_s)
        return cls(
            peer_id=peer_id,
            seq=seq,
            addrs=tuple(addrs),
            protocols=tuple(protocols),
            issued_at_ms=issued_at,
            ttl_s=ttl_s,
            skipped_addrs=skipped,
        )

    def sign(self, identity: Identity) -> SignedPeerRecord:
        """Seal the record in an envelope signed by ``identity``, which must be its peer's."""
        if identity.peer_id != self.peer_id:
            raise WrongRecordSigner(
                f"the record of {self.peer_id} cannot be signed by {identity.peer_id}"
            )
        envelope = Envelope.seal(identity, self.encode())
        encoded = envelope.encode()
        if len(encoded) > MAX_ENVELOPE_SIZE:
            raise OversizeRecord(
                f"signed record of {len(encoded)} bytes is over the {MAX_ENVELOPE_SIZE}-byte "
                "limit: advertise fewer addresses or protocols"
            )
        return SignedPeerRecord(record=self, envelope=encoded, public_key=identity.public_key)


def _address(info: bytes) -> Multiaddr | None:
    seen: set[int] = set()
    raw: bytes | None = None
    for number, wire_type, value in _fields(info, "AddressInfo"):
        if number == _MULTIADDR:
            _once(seen, number, "AddressInfo")
            raw = _as_bytes(value, wire_type, "AddressInfo.multiaddr")
    if raw is None:
        raise MalformedRecord("AddressInfo has no multiaddr")
    try:
        return Multiaddr.from_bytes(raw)
    except InvalidMultiaddr:
        return None


def _check_protocol(raw: bytes) -> bytes:
    if not raw:
        raise MalformedRecord("empty protocol ID")
    if len(raw) > MAX_PROTOCOL_LENGTH:
        raise OversizeRecord(f"a protocol ID is over {MAX_PROTOCOL_LENGTH} bytes")
    return raw


def _check_ttl(ttl_s: int) -> None:
    if isinstance(ttl_s, bool) or ttl_s < 1:
        raise MalformedRecord(f"ttl_s must be at least 1, not {ttl_s}")
    if ttl_s > MAX_TTL_S:
        raise OversizeRecord(f"ttl_s {ttl_s} is over the {MAX_TTL_S} s (24 h) limit")


@dataclass(frozen=True, slots=True)
class SignedPeerRecord:
    """A `PeerRecord` with the exact envelope bytes that prove it (store and forward these)."""

    record: PeerRecord
    envelope: bytes
    public_key: bytes
    """The signer's raw Ed25519 public key (its peer ID is ``record.peer_id``)."""

    @property
    def peer_id(self) -> PeerId:
        return self.record.peer_id

    @property
    def seq(self) -> int:
        return self.record.seq

    @property
    def expires_at_ms(self) -> int:
        return self.record.expires_at_ms

    @property
    def key(self) -> bytes:
        """The DHT key: `record_key` of the peer."""
        return self.record.key

    def encode(self) -> bytes:
        """The envelope bytes."""
        return self.envelope

    def is_expired(self, at_ms: int) -> bool:
        """Whether the record is past its TTL at ``at_ms``."""
        return self.record.expires_at_ms < at_ms

    @classmethod
    def decode(
        cls, data: bytes, *, now_ms: int | None = None, key: bytes | None = None
    ) -> SignedPeerRecord:
        """Open and check a signed peer record (every rule in the module docstring).

        ``now_ms`` defaults to the wall clock. With ``key``, the record must be the one that
        key names (`RecordKeyMismatch` otherwise). Raises `InvalidRecord` subclasses only.
        """
        data = bytes(data)
        envelope = Envelope.open(data)
        record = PeerRecord.decode_payload(envelope.payload)
        if envelope.signer != record.peer_id:
            raise WrongRecordSigner(
                f"record of {record.peer_id} is signed by {envelope.signer}, not by its peer"
            )
        if key is not None and peer_id_from_key(key) != record.peer_id:
            raise RecordKeyMismatch(f"record of {record.peer_id} is not the one its key names")
        now = unix_ms() if now_ms is None else now_ms
        if record.issued_at_ms > now + MAX_CLOCK_SKEW_MS:
            raise FutureRecord(
                f"record issued {(record.issued_at_ms - now) // 1000} s in the future; "
                "the signer's clock is wrong"
            )
        if record.expires_at_ms < now:
            raise ExpiredRecord(
                f"record expired {(now - record.expires_at_ms) // 1000} s ago (seq {record.seq})"
            )
        return cls(record=record, envelope=data, public_key=envelope.public_key)


def better(existing: DhtValue, candidate: DhtValue) -> DhtValue:
    """The record to keep: ``candidate`` only if its ``seq`` is higher; ties keep ``existing``."""
    return candidate if candidate.seq > existing.seq else existing


def check_replaces(existing: DhtValue | None, candidate: DhtValue) -> bool:
    """Whether ``candidate`` should replace ``existing`` (which may be absent).

    ``True``: store it. ``False``: it is the very record already held (a re-publish; nothing
    to do). Raises `StaleRecord` if its ``seq`` is lower, or equal with other contents, and
    `RecordKeyMismatch` if the two records are of different peers.
    """
    if existing is None:
        return True
    if existing.peer_id != candidate.peer_id:
        raise RecordKeyMismatch(
            f"record of {candidate.peer_id} cannot replace {existing.peer_id}'s"
        )
    if candidate.seq > existing.seq:
        return True
    if candidate.seq == existing.seq and candidate.envelope == existing.envelope:
        return False
    raise StaleRecord(
        f"record seq {candidate.seq} of {existing.peer_id} does not beat the held "
        f"seq {existing.seq}"
    )
