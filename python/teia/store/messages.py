"""``/teia/store/1.0.0`` messages: a strict, bounded protobuf codec.

A stream carries a sequence of exchanges: the client sends one `Request` (varint-length
framed, at most `MAX_REQUEST_SIZE` bytes), the node answers with one `Response` (at most
`MAX_RESPONSE_SIZE`), and so on until the client closes its side. Field numbers::

    Request   { 1 Deposit | 2 Fetch | 3 Ack | 4 Delete | 5 PutBundle | 6 GetBundle
                | 7 SyncDigests | 8 SyncInbox | 9 SyncPush }            (exactly one)
    Envelope  { 1 inbox (32) 2 message_id (16) 3 payload (≤ 256.25 KiB) 4 timestamp_ms 5 ttl_s
                6 expires_at_ms (node-to-node only) }
    Deposit   { 1 repeated Envelope (1..256) }
    Fetch     { 1 inbox 2 cursor (≤ 16) 3 limit 15 OwnerAuth }
    Ack       { 1 inbox 2 repeated message_id (1..1024) 15 OwnerAuth }      Delete: the same
    PutBundle { 1 inbox 2 bundle (≤ 1 KiB) 3 repeated one_time_prekey (≤ 128 B, ≤ 100)
                4 replace (bool) 15 OwnerAuth }
    GetBundle { 1 inbox }
    OwnerAuth { 1 public_key (32) 2 timestamp_ms 3 nonce (16) 4 signature (64) }
    SyncDigests { 1 repeated InboxDigest { 1 inbox 2 digest (32) } (≤ 4096) }
    SyncInbox { 1 inbox 2 repeated live message_id 3 repeated Tombstone
                { 1 message_id 2 expires_at_ms } }                      (each list ≤ 16,384)
    SyncPush  { 1 repeated Envelope (with expires_at_ms) }
    Response  { 1 status 2 error (text) 3 repeated result status (one per deposited envelope)
                4 repeated Envelope 5 cursor 6 more 7 bundle 8 one_time_prekey
                9 repeated inbox 10 repeated message_id 11 repeated Tombstone 12 remaining }

Decoding checks every length and count, refuses unknown request kinds, two kinds at once,
duplicate singular fields and missing required ones, and raises only `InvalidStoreMessage`.
Unknown fields inside a message are skipped (protobuf's rule), except in `Request`.
The owner's signature covers `signed_params` of the request: its canonical encoding without
the auth field (see `teia.store.auth`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from teia.errors import InvalidProtobuf, InvalidStoreMessage
from teia.host.protobuf import encode_bytes_field, encode_uvarint, iter_fields

__all__ = [
    "INBOX_SIZE",
    "MAX_CURSOR",
    "MAX_PAYLOAD",
    "MAX_REQUEST_SIZE",
    "MAX_RESPONSE_SIZE",
    "MESSAGE_ID_SIZE",
    "PROTOCOL",
    "AckRequest",
    "DeleteRequest",
    "DepositRequest",
    "Envelope",
    "FetchRequest",
    "GetBundleRequest",
    "OwnerAuth",
    "PutBundleRequest",
    "Request",
    "Response",
    "Status",
    "SyncDigestsRequest",
    "SyncInboxRequest",
    "SyncPushRequest",
    "Tombstone",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "signed_params",
]

PROTOCOL: Final = "/teia/store/1.0.0"

INBOX_SIZE: Final = 32
MESSAGE_ID_SIZE: Final = 16
MAX_PAYLOAD: Final = 256 * 1024 + 256
"""The largest payload: a peer's largest envelope (256 KiB, `teia.peer.wire`) sealed for its
recipient fits."""
MAX_CURSOR: Final = 16
MAX_DEPOSIT_ENVELOPES: Final = 256
MAX_FETCH_LIMIT: Final = 256
MAX_ACK_IDS: Final = 1024
MAX_BUNDLE: Final = 1024
MAX_ONE_TIME_PREKEY: Final = 128
MAX_ONE_TIME_PREKEYS: Final = 100
MAX_SYNC_DIGESTS: Final = 4096
MAX_SYNC_IDS: Final = 16_384
MAX_ERROR_TEXT: Final = 512
PUBLIC_KEY_SIZE: Final = 32
NONCE_SIZE: Final = 16
SIGNATURE_SIZE: Final = 64
DIGEST_SIZE: Final = 32

MAX_REQUEST_SIZE: Final = 1_310_720
"""A framed request over this (1.25 MiB: a deposit of 4 envelopes of the largest size fits) is
refused."""
MAX_RESPONSE_SIZE: Final = 1_310_720
"""A node keeps every response under this; fetch pages stop early to fit."""

_UINT_MAX: Final = 2**63 - 1


class Status(enum.IntEnum):
    """Response and per-envelope status codes."""

    OK = 0
    BAD_REQUEST = 1
    TOO_LARGE = 2
    UNAUTHORIZED = 3
    AUTH_EXPIRED = 4
    REPLAYED = 5
    INBOX_FULL = 6
    STORE_FULL = 7
    RATE_LIMITED = 8
    NOT_FOUND = 9
    FORBIDDEN = 10
    BUSY = 11
    INTERNAL = 12
    DUPLICATE = 13
    """The node already holds this message ID for this inbox (a success: it is stored)."""
    GONE = 14
    """The message ID was acknowledged or deleted already (a success: nothing to store)."""

    @property
    def stored(self) -> bool:
        """Whether a deposit with this result counts as acknowledged by the node."""
        return self in (Status.OK, Status.DUPLICATE, Status.GONE)


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """One sealed message for one inbox; the store sees only these fields, never the sender."""

    inbox: bytes
    message_id: bytes
    payload: bytes
    timestamp_ms: int = 0
    ttl_s: int = 0
    """Requested lifetime; 0 means the node's default. Nodes clamp it to their window."""
    expires_at_ms: int = 0
    """Only between store nodes (anti-entropy): the absolute expiry the origin node set."""


@dataclass(frozen=True, slots=True)
class OwnerAuth:
    """Proof that the inbox owner made this operation (see `teia.store.auth`)."""

    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A message ID acknowledged or deleted, remembered until ``expires_at_ms``."""

    message_id: bytes
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class DepositRequest:
    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class FetchRequest:
    inbox: bytes
    cursor: bytes = b""
    limit: int = 0
    """0 means the node's default page size."""
    auth: OwnerAuth | None = None


@dataclass(frozen=True, slots=True)
class AckRequest:
    """The owner received these envelopes: delete them (and count them delivered)."""

    inbox: bytes
    message_ids: tuple[bytes, ...]
    auth: OwnerAuth | None = None


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    """The owner discards these envelopes unread."""

    inbox: bytes
    message_ids: tuple[bytes, ...]
    auth: OwnerAuth | None = None


@dataclass(frozen=True, slots=True)
class PutBundleRequest:
    """The owner uploads its prekey bundle (without a one-time prekey) and one-time prekeys."""

    inbox: bytes
    bundle: bytes
    one_time_prekeys: tuple[bytes, ...] = ()
    replace: bool = False
    """Drop the one-time prekeys held so far (else the new ones are added to them)."""
    auth: OwnerAuth | None = None


@dataclass(frozen=True, slots=True)
class GetBundleRequest:
    inbox: bytes


@dataclass(frozen=True, slots=True)
class SyncDigestsRequest:
    """Anti-entropy, step 1: "this is what I hold for these inboxes"; answer: which differ."""

    digests: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class SyncInboxRequest:
    """Anti-entropy, step 2: one inbox's live IDs and tombstones (a part of them, or all)."""

    inbox: bytes
    live_ids: tuple[bytes, ...]
    tombstones: tuple[Tombstone, ...]


@dataclass(frozen=True, slots=True)
class SyncPushRequest:
    """Anti-entropy, step 3: copies of envelopes the other node lacks."""

    envelopes: tuple[Envelope, ...]


Request = (
    DepositRequest
    | FetchRequest
    | AckRequest
    | DeleteRequest
    | PutBundleRequest
    | GetBundleRequest
    | SyncDigestsRequest
    | SyncInboxRequest
    | SyncPushRequest
)


@dataclass(frozen=True, slots=True)
class Response:
    status: Status = Status.OK
    error: str = ""
    results: tuple[Status, ...] = ()
    envelopes: tuple[Envelope, ...] = ()
    cursor: bytes = b""
    more: bool = False
    bundle: bytes = b""
    one_time_prekey: bytes = b""
    inboxes: tuple[bytes, ...] = ()
    message_ids: tuple[bytes, ...] = ()
    tombstones: tuple[Tombstone, ...] = field(default=())
    remaining: int = 0


# --- encoding ---------------------------------------------------------------------------------

# Deposits carry hundreds of envelopes per request and a node answers each with a result: the
# common one-byte varints and field keys are looked up rather than computed.
_SMALL: Final = tuple(bytes((i,)) for i in range(0x80))


def _varint(value: int) -> bytes:
    if type(value) is not int or not 0 <= value <= _UINT_MAX:
        return encode_uvarint(value)  # raises the codec's error
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _uint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes(number: int, value: bytes) -> bytes:
    if number < 16:
        return _SMALL[number << 3 | 2] + _varint(len(value)) + value
    return encode_bytes_field(number, value)


def _envelope(env: Envelope) -> bytes:
    inbox, message_id, payload = env.inbox, env.message_id, env.payload
    parts = [
        b"\x0a", _varint(len(inbox)), inbox,
        b"\x12", _varint(len(message_id)), message_id,
        b"\x1a", _varint(len(payload)), payload,
    ]  # fmt: skip
    if env.timestamp_ms:
        parts += (b"\x20", _varint(env.timestamp_ms))
    if env.ttl_s:
        parts += (b"\x28", _varint(env.ttl_s))
    if env.expires_at_ms:
        parts += (b"\x30", _varint(env.expires_at_ms))
    return b"".join(parts)


def _auth(auth: OwnerAuth | None) -> bytes:
    if auth is None:
        return b""
    body = (
        _bytes(1, auth.public_key)
        + _uint(2, auth.timestamp_ms)
        + _bytes(3, auth.nonce)
        + _bytes(4, auth.signature)
    )
    return _bytes(15, body)


def _tombstone(tomb: Tombstone) -> bytes:
    return _bytes(1, tomb.message_id) + _uint(2, tomb.expires_at_ms)


def _body(request: Request, *, with_auth: bool) -> tuple[int, bytes]:
    match request:
        case DepositRequest(envelopes=envelopes):
            return 1, b"".join(_bytes(1, _envelope(e)) for e in envelopes)
        case FetchRequest():
            out = _bytes(1, request.inbox)
            if request.cursor:
                out += _bytes(2, request.cursor)
            if request.limit:
                out += _uint(3, request.limit)
            return 2, out + (_auth(request.auth) if with_auth else b"")
        case AckRequest() | DeleteRequest():
            out = _bytes(1, request.inbox) + b"".join(_bytes(2, i) for i in request.message_ids)
            kind = 3 if isinstance(request, AckRequest) else 4
            return kind, out + (_auth(request.auth) if with_auth else b"")
        case PutBundleRequest():
            out = _bytes(1, request.inbox) + _bytes(2, request.bundle)
            out += b"".join(_bytes(3, k) for k in request.one_time_prekeys)
            if request.replace:
                out += _uint(4, 1)
            return 5, out + (_auth(request.auth) if with_auth else b"")
        case GetBundleRequest(inbox=inbox):
            return 6, _bytes(1, inbox)
        case SyncDigestsRequest(digests=digests):
            return 7, b"".join(_bytes(1, _bytes(1, i) + _bytes(2, d)) for i, d in digests)
        case SyncInboxRequest():
            out = _bytes(1, request.inbox) + b"".join(_bytes(2, i) for i in request.live_ids)
            out += b"".join(_bytes(3, _tombstone(t)) for t in request.tombstones)
            return 8, out
        case SyncPushRequest(envelopes=envelopes):
            return 9, b"".join(_bytes(1, _envelope(e)) for e in envelopes)
    raise TypeError(f"not a store request: {type(request).__name__}")  # pragma: no cover


def encode_request(request: Request) -> bytes:
    """The wire form of ``request`` (the caller frames it with a varint length)."""
    kind, body = _body(request, with_auth=True)
    return _bytes(kind, body)


def signed_params(request: Request) -> bytes:
    """What an owner signature covers besides op, inbox, time and nonce: the canonical
    encoding of the request without its auth field."""
    kind, body = _body(request, with_auth=False)
    return bytes([kind]) + body


_RESULTS: Final = {status: b"\x18" + _varint(int(status)) for status in Status}


def encode_response(response: Response) -> bytes:
    """The wire form of ``response``."""
    out = b""
    if response.status != Status.OK:
        out += _uint(1, int(response.status))
    if response.error:
        out += _bytes(2, response.error.encode()[:MAX_ERROR_TEXT])
    out += b"".join(_RESULTS[r] if r in _RESULTS else _uint(3, int(r)) for r in response.results)
    out += b"".join(_bytes(4, _envelope(e)) for e in response.envelopes)
    if response.cursor:
        out += _bytes(5, response.cursor)
    if response.more:
        out += _uint(6, 1)
    if response.bundle:
        out += _bytes(7, response.bundle)
    if response.one_time_prekey:
        out += _bytes(8, response.one_time_prekey)
    out += b"".join(_bytes(9, i) for i in response.inboxes)
    out += b"".join(_bytes(10, i) for i in response.message_ids)
    out += b"".join(_bytes(11, _tombstone(t)) for t in response.tombstones)
    if response.remaining:
        out += _uint(12, response.remaining)
    return out


# --- decoding ---------------------------------------------------------------------------------

T = TypeVar("T")


class _Reader:
    """Collects one message's fields with their wire types checked; strict on singulars."""

    def __init__(self, data: bytes, what: str) -> None:
        self.what = what
        self.values: dict[int, list[int | bytes]] = {}
        try:
            for number, wire_type, value in iter_fields(data):
                if wire_type in (1, 5):
                    continue  # fixed-size fields: none in our schema, skipped
                self.values.setdefault(number, []).append(value)
        except InvalidProtobuf as exc:
            raise InvalidStoreMessage(f"{what}: {exc}") from None

    def _one(self, number: int, name: str) -> int | bytes | None:
        values = self.values.get(number)
        if not values:
            return None
        if len(values) > 1:
            raise InvalidStoreMessage(f"{self.what}: {name} given more than once")
        return values[0]

    def uint(self, number: int, name: str, maximum: int = _UINT_MAX) -> int:
        value = self._one(number, name)
        if value is None:
            return 0
        if not isinstance(value, int):
            raise InvalidStoreMessage(f"{self.what}: {name} must be a varint")
        if value > maximum:
            raise InvalidStoreMessage(f"{self.what}: {name} {value} is over {maximum}")
        return value

    def raw(self, number: int, name: str, *, size: int | None = None, maximum: int = 0) -> bytes:
        value = self._one(number, name)
        if value is None:
            if size is not None:
                raise InvalidStoreMessage(f"{self.what}: {name} is missing")
            return b""
        return self._check_bytes(value, name, size=size, maximum=maximum)

    def many(
        self, number: int, name: str, *, size: int | None = None, maximum: int = 0, count: int
    ) -> tuple[bytes, ...]:
        values = self.values.get(number, [])
        if len(values) > count:
            raise InvalidStoreMessage(f"{self.what}: more than {count} {name} entries")
        return tuple(self._check_bytes(v, name, size=size, maximum=maximum) for v in values)

    def uints(self, number: int, name: str, *, count: int) -> tuple[int, ...]:
        values = self.values.get(number, [])
        if len(values) > count:
            raise InvalidStoreMessage(f"{self.what}: more than {count} {name} entries")
        if not all(isinstance(v, int) for v in values):
            raise InvalidStoreMessage(f"{self.what}: {name} must be varints")
        return tuple(int(v) for v in values)

    def messages(
        self, number: int, name: str, decode: Callable[[bytes], T], *, count: int
    ) -> tuple[T, ...]:
        return tuple(decode(raw) for raw in self.many(number, name, maximum=0, count=count))

    def _check_bytes(
        self, value: int | bytes, name: str, *, size: int | None, maximum: int
    ) -> bytes:
        if not isinstance(value, bytes):
            raise InvalidStoreMessage(f"{self.what}: {name} must be length-delimited")
        if size is not None and len(value) != size:
            raise InvalidStoreMessage(f"{self.what}: {name} is {len(value)} bytes, not {size}")
        if maximum and len(value) > maximum:
            raise InvalidStoreMessage(
                f"{self.what}: {name} of {len(value)} bytes is over {maximum}"
            )
        return value


def _decode_envelope(data: bytes) -> Envelope:
    r = _Reader(data, "Envelope")
    return Envelope(
        inbox=r.raw(1, "inbox", size=INBOX_SIZE),
        message_id=r.raw(2, "message_id", size=MESSAGE_ID_SIZE),
        payload=r.raw(3, "payload", maximum=MAX_PAYLOAD),
        timestamp_ms=r.uint(4, "timestamp_ms"),
        ttl_s=r.uint(5, "ttl_s", maximum=2**32 - 1),
        expires_at_ms=r.uint(6, "expires_at_ms"),
    )


def _decode_tombstone(data: bytes) -> Tombstone:
    r = _Reader(data, "Tombstone")
    return Tombstone(
        message_id=r.raw(1, "message_id", size=MESSAGE_ID_SIZE),
        expires_at_ms=r.uint(2, "expires_at_ms"),
    )


def _decode_auth(r: _Reader) -> OwnerAuth | None:
    raw = r.raw(15, "auth")
    if 15 not in r.values:
        return None
    a = _Reader(raw, "OwnerAuth")
    return OwnerAuth(
        public_key=a.raw(1, "public_key", size=PUBLIC_KEY_SIZE),
        timestamp_ms=a.uint(2, "timestamp_ms"),
        nonce=a.raw(3, "nonce", size=NONCE_SIZE),
        signature=a.raw(4, "signature", size=SIGNATURE_SIZE),
    )


def _require_auth(auth: OwnerAuth | None, what: str) -> OwnerAuth:
    if auth is None:
        raise InvalidStoreMessage(f"{what}: an owner operation needs its signature (auth)")
    return auth


def _decode_digest(data: bytes) -> tuple[bytes, bytes]:
    r = _Reader(data, "InboxDigest")
    return r.raw(1, "inbox", size=INBOX_SIZE), r.raw(2, "digest", size=DIGEST_SIZE)


def _nonempty(items: tuple[T, ...], what: str, name: str) -> tuple[T, ...]:
    if not items:
        raise InvalidStoreMessage(f"{what}: no {name}")
    return items


def _decode_kind(kind: int, body: bytes) -> Request:
    if kind == 1:
        r = _Reader(body, "Deposit")
        envelopes = r.messages(1, "envelope", _decode_envelope, count=MAX_DEPOSIT_ENVELOPES)
        return DepositRequest(_nonempty(envelopes, "Deposit", "envelope"))
    if kind == 2:
        r = _Reader(body, "Fetch")
        return FetchRequest(
            inbox=r.raw(1, "inbox", size=INBOX_SIZE),
            cursor=r.raw(2, "cursor", maximum=MAX_CURSOR),
            limit=r.uint(3, "limit", maximum=MAX_FETCH_LIMIT),
            auth=_require_auth(_decode_auth(r), "Fetch"),
        )
    if kind in (3, 4):
        what = "Ack" if kind == 3 else "Delete"
        r = _Reader(body, what)
        inbox = r.raw(1, "inbox", size=INBOX_SIZE)
        ids = r.many(2, "message_id", size=MESSAGE_ID_SIZE, count=MAX_ACK_IDS)
        ids = _nonempty(ids, what, "message_id")
        auth = _require_auth(_decode_auth(r), what)
        if kind == 3:
            return AckRequest(inbox, ids, auth)
        return DeleteRequest(inbox, ids, auth)
    if kind == 5:
        r = _Reader(body, "PutBundle")
        bundle = r.raw(2, "bundle", maximum=MAX_BUNDLE)
        if not bundle:
            raise InvalidStoreMessage("PutBundle: bundle is missing")
        return PutBundleRequest(
            inbox=r.raw(1, "inbox", size=INBOX_SIZE),
            bundle=bundle,
            one_time_prekeys=r.many(
                3, "one_time_prekey", maximum=MAX_ONE_TIME_PREKEY, count=MAX_ONE_TIME_PREKEYS
            ),
            replace=bool(r.uint(4, "replace", maximum=1)),
            auth=_require_auth(_decode_auth(r), "PutBundle"),
        )
    if kind == 6:
        r = _Reader(body, "GetBundle")
        return GetBundleRequest(r.raw(1, "inbox", size=INBOX_SIZE))
    if kind == 7:
        r = _Reader(body, "SyncDigests")
        return SyncDigestsRequest(r.messages(1, "digest", _decode_digest, count=MAX_SYNC_DIGESTS))
    if kind == 8:
        r = _Reader(body, "SyncInbox")
        return SyncInboxRequest(
            inbox=r.raw(1, "inbox", size=INBOX_SIZE),
            live_ids=r.many(2, "message_id", size=MESSAGE_ID_SIZE, count=MAX_SYNC_IDS),
            tombstones=r.messages(3, "tombstone", _decode_tombstone, count=MAX_SYNC_IDS),
        )
    if kind == 9:
        r = _Reader(body, "SyncPush")
        envelopes = r.messages(1, "envelope", _decode_envelope, count=MAX_DEPOSIT_ENVELOPES)
        return SyncPushRequest(_nonempty(envelopes, "SyncPush", "envelope"))
    raise InvalidStoreMessage(f"Request: unknown kind {kind}")


# --- fast paths --------------------------------------------------------------------------------
# Deposits, their results and fetched pages are most of the traffic. For them a direct parser
# reads the canonical form (known fields, one-byte keys, each singular field once); anything
# else, well-formed or not, raises `_Slow` and is parsed again by the general reader above,
# which alone decides what is accepted and every error message. So the fast paths only ever
# return what the general reader returns (the codec tests check it on arbitrary input).


class _Slow(Exception):
    """Not in the form the fast path reads: use the general reader."""


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for index in range(9):
        if pos >= len(data):
            raise _Slow
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and index:
                raise _Slow  # not minimal
            return result, pos
        shift += 7
    raise _Slow


def _envelope_fast(data: bytes) -> Envelope:
    end = len(data)
    pos = seen = 0
    inbox = message_id = payload = b""
    timestamp = ttl = expires = 0
    while pos < end:
        key = data[pos]
        pos += 1
        if key > 0x30 or key & 7 not in (0, 2):
            raise _Slow
        bit = 1 << (key >> 3)
        if seen & bit:
            raise _Slow
        seen |= bit
        if key < 0x80 and pos < end and data[pos] < 0x80:
            value = data[pos]
            pos += 1
        else:
            value, pos = _varint_at(data, pos)
        if key == 0x0A or key == 0x12 or key == 0x1A:
            stop = pos + value
            if stop > end:
                raise _Slow
            chunk = data[pos:stop]
            pos = stop
            if key == 0x0A:
                inbox = chunk
            elif key == 0x12:
                message_id = chunk
            else:
                payload = chunk
        elif key == 0x20:
            timestamp = value
        elif key == 0x28:
            ttl = value
        elif key == 0x30:
            expires = value
        else:
            raise _Slow
    if (
        len(inbox) != INBOX_SIZE
        or len(message_id) != MESSAGE_ID_SIZE
        or len(payload) > MAX_PAYLOAD
        or ttl > 2**32 - 1
    ):
        raise _Slow
    return Envelope(inbox, message_id, payload, timestamp, ttl, expires)


def _envelopes_fast(body: bytes, limit: int) -> tuple[Envelope, ...]:
    end = len(body)
    pos = 0
    out: list[Envelope] = []
    while pos < end:
        if body[pos] != 0x0A or len(out) >= limit:
            raise _Slow
        length, pos = _varint_at(body, pos + 1)
        stop = pos + length
        if stop > end:
            raise _Slow
        out.append(_envelope_fast(body[pos:stop]))
        pos = stop
    if not out:
        raise _Slow
    return tuple(out)


_STATUS_BY_CODE: Final = {int(status): status for status in Status}


def _response_fast(data: bytes) -> Response:
    end = len(data)
    pos = 0
    results: list[Status] = []
    envelopes: list[Envelope] = []
    cursor = b""
    more = seen_cursor = seen_more = False
    while pos < end:
        key = data[pos]
        if key == 0x18:  # result
            if pos + 1 >= end or len(results) >= MAX_DEPOSIT_ENVELOPES:
                raise _Slow
            status = _STATUS_BY_CODE.get(data[pos + 1])
            if status is None:
                raise _Slow
            results.append(status)
            pos += 2
        elif key == 0x22 or key == 0x2A:  # envelope, cursor
            length, pos = _varint_at(data, pos + 1)
            stop = pos + length
            if stop > end:
                raise _Slow
            if key == 0x22:
                if len(envelopes) >= MAX_FETCH_LIMIT:
                    raise _Slow
                envelopes.append(_envelope_fast(data[pos:stop]))
            else:
                if seen_cursor or length > MAX_CURSOR:
                    raise _Slow
                seen_cursor = True
                cursor = data[pos:stop]
            pos = stop
        elif key == 0x30:  # more
            if seen_more or pos + 1 >= end or data[pos + 1] > 1:
                raise _Slow
            seen_more = True
            more = data[pos + 1] == 1
            pos += 2
        else:
            raise _Slow
    return Response(results=tuple(results), envelopes=tuple(envelopes), cursor=cursor, more=more)


def decode_request(data: bytes) -> Request:
    """Parse one request; `InvalidStoreMessage` on anything malformed or over a limit."""
    if len(data) > MAX_REQUEST_SIZE:
        raise InvalidStoreMessage(f"request of {len(data)} bytes is over {MAX_REQUEST_SIZE}")
    if data[:1] == b"\x0a":  # a deposit
        try:
            length, pos = _varint_at(data, 1)
            if pos + length == len(data):
                return DepositRequest(_envelopes_fast(data[pos:], MAX_DEPOSIT_ENVELOPES))
        except _Slow:
            pass
    return _decode_request_general(data)


def _decode_request_general(data: bytes) -> Request:
    try:
        fields = list(iter_fields(data))
    except InvalidProtobuf as exc:
        raise InvalidStoreMessage(f"Request: {exc}") from None
    if len(fields) != 1:
        raise InvalidStoreMessage(f"Request: {len(fields)} fields, a request has exactly one")
    kind, wire_type, body = fields[0]
    if wire_type != 2 or not isinstance(body, bytes):
        raise InvalidStoreMessage("Request: its field must be length-delimited")
    return _decode_kind(kind, body)


def decode_response(data: bytes) -> Response:
    """Parse one response; `InvalidStoreMessage` on anything malformed or over a limit."""
    if len(data) > MAX_RESPONSE_SIZE:
        raise InvalidStoreMessage(f"response of {len(data)} bytes is over {MAX_RESPONSE_SIZE}")
    try:
        return _response_fast(data)
    except _Slow:
        return _decode_response_general(data)


def _decode_response_general(data: bytes) -> Response:
    r = _Reader(data, "Response")
    status = r.uint(1, "status", maximum=255)
    try:
        results = tuple(Status(v) for v in r.uints(3, "result", count=MAX_DEPOSIT_ENVELOPES))
        code = Status(status)
    except ValueError:
        raise InvalidStoreMessage("Response: unknown status code") from None
    return Response(
        status=code,
        error=r.raw(2, "error", maximum=MAX_ERROR_TEXT).decode("utf-8", "replace"),
        results=results,
        envelopes=r.messages(4, "envelope", _decode_envelope, count=MAX_FETCH_LIMIT),
        cursor=r.raw(5, "cursor", maximum=MAX_CURSOR),
        more=bool(r.uint(6, "more", maximum=1)),
        bundle=r.raw(7, "bundle", maximum=MAX_BUNDLE),
        one_time_prekey=r.raw(8, "one_time_prekey", maximum=MAX_ONE_TIME_PREKEY),
        inboxes=r.many(9, "inbox", size=INBOX_SIZE, count=MAX_SYNC_DIGESTS),
        message_ids=r.many(10, "message_id", size=MESSAGE_ID_SIZE, count=MAX_SYNC_IDS),
        tombstones=r.messages(11, "tombstone", _decode_tombstone, count=MAX_SYNC_IDS),
        remaining=r.uint(12, "remaining"),
    )


def encoded_size(envelopes: Iterable[Envelope]) -> int:
    """Bytes these envelopes take inside a response (to keep fetch pages under the limit)."""
    return sum(len(_envelope(e)) + 5 for e in envelopes)
