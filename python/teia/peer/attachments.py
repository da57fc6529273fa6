"""Attachments: files up to `MAX_FILE_SIZE`, end-to-end encrypted, sent peer to peer.

Sending (`Attachments.send_file`) encrypts the file once, into the profile
(``DIR/attachments/out/<file ID>.enc``), under a fresh random 256-bit key: fixed-size chunks
(`CHUNK_SIZE`), each sealed with ChaCha20-Poly1305, nonce = the chunk index, associated data =
file ID, file size, chunk size and chunk index — so a chunk cannot move to another position or
another file, and the count is fixed by the size (no truncation, no extension). The offer (file
ID, name, size, chunk size, key, SHA-256 of the plaintext) travels as an application payload
(``teia.file``) over the ratcheted session: the key never leaves it.

Receiving: the recipient pulls the chunks it lacks from the sender over
``/teia/attachment/1.0.0`` on whatever connection the peers have (direct or through a relay);
the sender serves a file only to the peer it offered it to. When the recipient cannot be
reached at sending time, chunks of files up to ``attachment_store_limit`` bytes are pushed as
application payloads instead, which the peer deposits on the store nodes; larger files wait for
a path (state ``waiting-direct``). Chunks that fail authentication are refused, counted and
fetched again; they are never written.

Resuming: each chunk is written, decrypted, at its place in ``DIR/attachments/in/<file
ID>.part`` (mode 0600); a bitmap of the chunks held is committed after each batch. After a lost
connection or a restart only the missing chunks are requested. A complete file is checked
against the offer's digest, then linked into the receive directory (``attachment_dir``, by
default ``DIR/files``) under a name that does not replace any file there, and the sender is told
(``teia.file`` done), which deletes its encrypted copy.

Wire formats (integers big-endian)::

    teia.file payloads     1 offer  | file_id 16 | size u64 | chunk_size u32 | key 32
                                    | sha256 32 | name_len u16 | name (UTF-8)
                           2 chunk  | file_id 16 | index u32 | sealed chunk
                           3 done   | file_id 16
                           4 cancel | file_id 16         (either side; the other stops too)
    stream request         version u8 (1) | file_id 16 | runs u8 (1..64)
                                    | runs x (start u32, count u32)   ascending, disjoint
    stream answer (each)   status u8 | index u32 | sealed chunk (status OK only)

Requests and answers are framed with an unsigned-varint length. The stream answers every chunk
of a request in order, then waits for the next request; the requester closes it.

Nothing here logs keys, names or content.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import shutil
import struct
import unicodedata
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from teia.errors import (
    AttachmentCorrupted,
    AttachmentError,
    AttachmentTooLarge,
    AttachmentUnavailable,
    DeliveryError,
    InvalidAttachmentMessage,
    TeiaError,
    TransportError,
    UnknownAttachment,
)
from teia.identity import PeerId
from teia.peer.broadcast import Broadcast
from teia.peer.db import PeerDatabase, now_ms

if TYPE_CHECKING:
    from teia.host.streams import NegotiatedStream
    from teia.peer.peer import AppMessage, Peer
    from teia.peer.profile import Profile

__all__ = [
    "APP",
    "CHUNK_SIZE",
    "MAX_FILE_SIZE",
    "PROTOCOL",
    "Attachments",
    "ChunkAnswer",
    "ChunkRequest",
    "FileCancel",
    "FileChunk",
    "FileDone",
    "FileOffer",
    "Status",
    "Transfer",
    "TransferCompleted",
    "TransferEvent",
    "TransferFailed",
    "TransferOffered",
    "decode_answer",
    "decode_payload",
    "decode_request",
    "open_chunk",
    "queue_file",
    "seal_chunk",
    "stored_transfers",
]

_log = logging.getLogger(__name__)

PROTOCOL: Final = "/teia/attachment/1.0.0"
APP: Final = "teia.file"
MAX_FILE_SIZE: Final = 100 * 1024 * 1024
"""Largest file sent (100 MiB)."""
CHUNK_SIZE: Final = 60 * 1024
"""Plaintext bytes per chunk: a pushed chunk, sealed to the recipient, fits one store envelope
(with room to spare since stores take whole 256 KiB peer envelopes). Chunks are pulled many at
a time, so their size does not bound throughput."""
MIN_CHUNK_SIZE: Final = 1024
MAX_CHUNK_SIZE: Final = 160 * 1024
"""Bounds on the chunk size an offer may name (a pushed chunk must fit an app payload)."""
MAX_NAME: Final = 255
"""Bytes of UTF-8 in a file name."""
MAX_RUNS: Final = 64
"""Ranges of chunk indexes in one request."""
TAG: Final = 16
FILE_ID_SIZE: Final = 16
KEY_SIZE: Final = 32
DIGEST_SIZE: Final = 32
MAX_SEALED_CHUNK: Final = MAX_CHUNK_SIZE + TAG
MAX_REQUEST: Final = 1 + FILE_ID_SIZE + 1 + 8 * MAX_RUNS
MAX_ANSWER: Final = 5 + MAX_SEALED_CHUNK
RETENTION_MS: Final = 14 * 86_400_000
"""Offers older than this are given up: the encrypted copy is deleted, a partial file too."""
MAX_INCOMING_PER_PEER: Final = 16
MAX_INCOMING: Final = 64
"""Unfinished incoming transfers at once, per sender and in all (more offers are refused)."""
_IDLE: Final = 30.0
_WRITE_BATCH: Final = 2 * 1024 * 1024
_READ_BATCH: Final = 16
_MAX_STALLS: Final = 3
_AD_LABEL: Final = b"teia attachment v1"
_OFFER: Final = 1
_CHUNK: Final = 2
_DONE: Final = 3
_CANCEL: Final = 4
_ENDED: Final = ("complete", "failed", "expired", "cancelled")
"""States a transfer does not leave."""
_OFFER_HEAD = struct.Struct(f">B{FILE_ID_SIZE}sQI{KEY_SIZE}s{DIGEST_SIZE}sH")
_CHUNK_HEAD = struct.Struct(f">B{FILE_ID_SIZE}sI")
_REQUEST_HEAD = struct.Struct(f">B{FILE_ID_SIZE}sB")
_RUN = struct.Struct(">II")
_ANSWER_HEAD = struct.Struct(">BI")
_STREAM_ERRORS = (
    TransportError,
    OSError,
    TimeoutError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)

# --- wire formats --------------------------------------------------------------------------


class Status:
    """Status byte of a stream answer."""

    OK: Final = 0
    UNAVAILABLE: Final = 1
    """Not offered to this peer, finished, expired or unknown (one answer for all of them)."""
    BAD_REQUEST: Final = 2


@dataclass(frozen=True, slots=True)
class FileOffer:
    """What the recipient needs to fetch, open and check a file (inside the ratchet only)."""

    file_id: bytes
    name: str
    size: int
    chunk_size: int
    key: bytes
    digest: bytes
    """SHA-256 of the plaintext."""

    def __post_init__(self) -> None:
        if len(self.file_id) != FILE_ID_SIZE or len(self.key) != KEY_SIZE:
            raise InvalidAttachmentMessage("offer: bad file ID or key length")
        if len(self.digest) != DIGEST_SIZE:
            raise InvalidAttachmentMessage("offer: bad digest length")
        if not 0 <= self.size <= MAX_FILE_SIZE:
            raise InvalidAttachmentMessage(f"offer: size {self.size} is over {MAX_FILE_SIZE}")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidAttachmentMessage(f"offer: chunk size {self.chunk_size} out of range")
        try:
            raw = self.name.encode()
        except UnicodeEncodeError:
            raise InvalidAttachmentMessage("offer: the name is not valid Unicode") from None
        if not 1 <= len(raw) <= MAX_NAME:
            raise InvalidAttachmentMessage("offer: the name must be 1 to 255 bytes of UTF-8")

    @property
    def chunk_count(self) -> int:
        """Chunks in the file (an empty file has one, empty)."""
        return max(1, math.ceil(self.size / self.chunk_size))

    def plain_length(self, index: int) -> int:
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def sealed_offset(self, index: int) -> int:
        """Where chunk ``index`` starts in the sender's encrypted copy."""
        return index * (self.chunk_size + TAG)

    def encode(self) -> bytes:
        name = self.name.encode()
        return (
            _OFFER_HEAD.pack(
                _OFFER, self.file_id, self.size, self.chunk_size, self.key, self.digest, len(name)
            )
            + name
        )


@dataclass(frozen=True, slots=True)
class FileChunk:
    """A sealed chunk pushed through the message pipeline (the store path)."""

    file_id: bytes
    index: int
    sealed: bytes

    def encode(self) -> bytes:
        return _CHUNK_HEAD.pack(_CHUNK, self.file_id, self.index) + self.sealed


@dataclass(frozen=True, slots=True)
class FileDone:
    """The recipient has the whole file: the sender may forget it."""

    file_id: bytes

    def encode(self) -> bytes:
        return bytes([_DONE]) + self.file_id


@dataclass(frozen=True, slots=True)
class FileCancel:
    """The transfer is called off (by the sender or the recipient): the other side stops and
    deletes what it holds of it."""

    file_id: bytes

    def encode(self) -> bytes:
        return bytes([_CANCEL]) + self.file_id


def decode_payload(data: bytes) -> FileOffer | FileChunk | FileDone | FileCancel:
    """Parse a ``teia.file`` payload; `InvalidAttachmentMessage` on anything else."""
    if not data:
        raise InvalidAttachmentMessage("empty file payload")
    kind = data[0]
    if kind == _OFFER:
        if len(data) < _OFFER_HEAD.size:
            raise InvalidAttachmentMessage("offer: truncated")
        _, file_id, size, chunk_size, key, digest, name_length = _OFFER_HEAD.unpack_from(data)
        if len(data) != _OFFER_HEAD.size + name_length:
            raise InvalidAttachmentMessage("offer: the name length does not match")
        try:
            name = data[_OFFER_HEAD.size :].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAttachmentMessage("offer: the name is not UTF-8") from None
        return FileOffer(file_id, name, size, chunk_size, key, digest)
    if kind == _CHUNK:
        if len(data) < _CHUNK_HEAD.size + TAG:
            raise InvalidAttachmentMessage("chunk: truncated")
        if len(data) > _CHUNK_HEAD.size + MAX_SEALED_CHUNK:
            raise InvalidAttachmentMessage("chunk: oversize")
        _, file_id, index = _CHUNK_HEAD.unpack_from(data)
        return FileChunk(file_id, index, data[_CHUNK_HEAD.size :])
    if kind in (_DONE, _CANCEL):
        if len(data) != 1 + FILE_ID_SIZE:
            raise InvalidAttachmentMessage("done or cancel: wrong length")
        return FileDone(data[1:]) if kind == _DONE else FileCancel(data[1:])
    raise InvalidAttachmentMessage(f"unknown file payload kind {kind}")


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """Chunks asked of the sender: ranges ``(start, count)``, ascending and disjoint."""

    file_id: bytes
    runs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.file_id) != FILE_ID_SIZE:
            raise InvalidAttachmentMessage("request: bad file ID length")
        if not 1 <= len(self.runs) <= MAX_RUNS:
            raise InvalidAttachmentMessage(f"request: 1 to {MAX_RUNS} ranges")
        end = 0
        for start, count in self.runs:
            if count < 1 or start < end or start + count > 2**32:
                raise InvalidAttachmentMessage("request: ranges must be ascending and disjoint")
            end = start + count

    @property
    def indexes(self) -> list[int]:
        return [i for start, count in self.runs for i in range(start, start + count)]

    def encode(self) -> bytes:
        head = _REQUEST_HEAD.pack(1, self.file_id, len(self.runs))
        return head + b"".join(_RUN.pack(start, count) for start, count in self.runs)


def decode_request(data: bytes) -> ChunkRequest:
    """Parse a stream request; `InvalidAttachmentMessage` if malformed or oversize."""
    if len(data) > MAX_REQUEST or len(data) < _REQUEST_HEAD.size:
        raise InvalidAttachmentMessage("request: wrong length")
    version, file_id, count = _REQUEST_HEAD.unpack_from(data)
    if version != 1:
        raise InvalidAttachmentMessage(f"request: unknown version {version}")
    if len(data) != _REQUEST_HEAD.size + count * _RUN.size:
        raise InvalidAttachmentMessage("request: the range count does not match")
    runs = tuple(_RUN.unpack_from(data, _REQUEST_HEAD.size + i * _RUN.size) for i in range(count))
    return ChunkRequest(file_id, runs)


@dataclass(frozen=True, slots=True)
class ChunkAnswer:
    """One answer on the stream: a sealed chunk (``Status.OK``) or a refusal."""

    status: int
    index: int = 0
    sealed: bytes = b""

    def __post_init__(self) -> None:
        if self.status not in (Status.OK, Status.UNAVAILABLE, Status.BAD_REQUEST):
            raise InvalidAttachmentMessage(f"answer: unknown status {self.status}")
        if not 0 <= self.index < 2**32:
            raise InvalidAttachmentMessage("answer: index out of range")
        if self.status == Status.OK and not TAG <= len(self.sealed) <= MAX_SEALED_CHUNK:
            raise InvalidAttachmentMessage("answer: chunk of a wrong size")
        if self.status != Status.OK and self.sealed:
            raise InvalidAttachmentMessage("answer: a refusal carries no data")

    def encode(self) -> bytes:
        return _ANSWER_HEAD.pack(self.status, self.index) + self.sealed


def decode_answer(data: bytes) -> ChunkAnswer:
    """Parse a stream answer; `InvalidAttachmentMessage` if malformed or oversize."""
    if not _ANSWER_HEAD.size <= len(data) <= MAX_ANSWER:
        raise InvalidAttachmentMessage("answer: wrong length")
    status, index = _ANSWER_HEAD.unpack_from(data)
    return ChunkAnswer(status, index, data[_ANSWER_HEAD.size :])


# --- chunk crypto --------------------------------------------------------------------------


def _associated(offer: FileOffer, index: int) -> bytes:
    return (
        _AD_LABEL
        + offer.file_id
        + offer.size.to_bytes(8, "big")
        + offer.chunk_size.to_bytes(4, "big")
        + index.to_bytes(4, "big")
    )


def seal_chunk(offer: FileOffer, key: bytes, index: int, plaintext: bytes) -> bytes:
    """Encrypt chunk ``index`` (the key is unique to the file, so the index is a fine nonce)."""
    return ChaCha20Poly1305(key).encrypt(
        index.to_bytes(12, "big"), plaintext, _associated(offer, index)
    )


def open_chunk(offer: FileOffer, index: int, sealed: bytes) -> bytes:
    """Decrypt and authenticate chunk ``index``; `AttachmentCorrupted` if it is not exactly
    what the sender sealed at that place of that file."""
    if not 0 <= index < offer.chunk_count or len(sealed) != offer.plain_length(index) + TAG:
        raise AttachmentCorrupted(f"chunk {index} has the wrong place or length")
    try:
        return ChaCha20Poly1305(offer.key).decrypt(
            index.to_bytes(12, "big"), sealed, _associated(offer, index)
        )
    except InvalidTag:
        raise AttachmentCorrupted(f"chunk {index} does not authenticate") from None


def _encrypt_file(source: Path, target: Path, file_id: bytes, key: bytes, size: int) -> bytes:
    """Encrypt ``source`` into ``target`` (mode 0600, written aside then renamed); returns the
    SHA-256 of the plaintext. `AttachmentError` if the file changes size while read."""
    offer = FileOffer(file_id, "x", size, CHUNK_SIZE, key, bytes(DIGEST_SIZE))
    digest = hashlib.sha256()
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            for index in range(offer.chunk_count):
                want = offer.plain_length(index)
                plain = src.read(want)
                if len(plain) != want:
                    raise AttachmentError(f"{source.name} changed while it was read")
                digest.update(plain)
                out.write(seal_chunk(offer, key, index, plain))
            if src.read(1):
                raise AttachmentError(f"{source.name} changed while it was read")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return digest.digest()


def _bit(bitmap: bytes | bytearray, index: int) -> bool:
    return bool(bitmap[index >> 3] & (1 << (index & 7)))


def _runs(bitmap: bytes | bytearray, count: int, limit: int) -> tuple[tuple[int, int], ...]:
    """Up to ``limit`` ranges of chunks not in ``bitmap``."""
    runs: list[tuple[int, int]] = []
    index = 0
    while index < count and len(runs) < limit:
        if _bit(bitmap, index):
            index += 1
            continue
        start = index
        while index < count and not _bit(bitmap, index):
            index += 1
        runs.append((start, index - start))
    return tuple(runs)


def safe_name(name: str) -> str:
    """A file name that stays inside the receive directory and shows no control characters."""
    name = name.encode("utf-8", "replace").decode().replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip().lstrip(".")
    while len(name.encode()) > MAX_NAME:
        name = name[:-1]
    return name or "file"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError  # pragma: no cover


# --- what the application sees -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transfer:
    """A file sent or received, as the profile remembers it."""

    file_id: str
    """Hex of the 16-byte file ID."""
    peer: PeerId
    """The recipient (outgoing) or the sender (incoming)."""
    outgoing: bool
    name: str
    size: int
    chunks: int
    have: int
    """Chunks held (incoming); for outgoing transfers, ``chunks`` once complete, else 0."""
    state: str
    """Outgoing: ``queued`` (by another process, for the one with the profile online),
    ``offered`` (the recipient pulls), ``pushed`` (chunks handed to the message
    pipeline for the store), ``waiting-direct`` (too large for the store; sent when the peers
    can connect), ``complete`` (the recipient has it), ``expired``, ``cancelled`` (by either
    side). Incoming: ``receiving``, ``complete``, ``failed``, ``expired``, ``cancelled``."""
    path: str | None
    """How chunks travelled last: ``direct``, ``relayed`` or ``stored``."""
    saved_as: Path | None
    """Where a complete incoming file is."""


@dataclass(frozen=True, slots=True)
class TransferOffered:
    """A file was offered to us (it is being fetched)."""

    transfer: Transfer


@dataclass(frozen=True, slots=True)
class TransferCompleted:
    """A file reached the recipient (we sent it) or its place on our disk (we received it)."""

    transfer: Transfer


@dataclass(frozen=True, slots=True)
class TransferFailed:
    transfer: Transfer
    reason: str


TransferEvent = TransferOffered | TransferCompleted | TransferFailed


# --- persistence ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    file_id BLOB PRIMARY KEY,
    peer_id TEXT NOT NULL,
    outgoing INTEGER NOT NULL,
    offer BLOB NOT NULL,
    state TEXT NOT NULL,
    have BLOB NOT NULL,
    path TEXT,
    saved BLOB,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attachments_by_state ON attachments (outgoing, state);
"""


def _offer_ad(file_id: bytes) -> bytes:
    return b"attachment offer " + file_id


def _saved_ad(file_id: bytes) -> bytes:
    return b"attachment saved " + file_id


@dataclass(slots=True)
class _Row:
    offer: FileOffer
    peer_id: str
    outgoing: bool
    state: str
    have: bytearray
    path: str | None
    saved: str | None
    created_ms: int

    def transfer(self) -> Transfer:
        count = self.offer.chunk_count
        held = count if self.outgoing and self.state == "complete" else 0
        if not self.outgoing:
            held = sum(_bit(self.have, i) for i in range(count))
        return Transfer(
            self.offer.file_id.hex(),
            PeerId.from_string(self.peer_id),
            self.outgoing,
            self.offer.name,
            self.offer.size,
            count,
            held,
            self.state,
            self.path,
            Path(self.saved) if self.saved else None,
        )


_SELECT = (
    "SELECT file_id, peer_id, outgoing, offer, state, have, path, saved, created_ms "
    "FROM attachments "
)


def _load(db: PeerDatabase, row: Any) -> _Row:
    file_id = bytes(row[0])
    offer = decode_payload(db.cipher.open(_offer_ad(file_id), bytes(row[3])))
    assert isinstance(offer, FileOffer)
    saved = row[7]
    return _Row(
        offer,
        str(row[1]),
        bool(row[2]),
        str(row[4]),
        bytearray(bytes(row[5])),
        None if row[6] is None else str(row[6]),
        None if saved is None else db.cipher.open(_saved_ad(file_id), bytes(saved)).decode(),
        int(row[8]),
    )


def _get(db: PeerDatabase, file_id: bytes) -> _Row | None:
    rows = db.read(_SELECT + "WHERE file_id = ?", (file_id,))
    return _load(db, rows[0]) if rows else None


def _all(db: PeerDatabase) -> list[_Row]:
    return [_load(db, row) for row in db.read(_SELECT + "ORDER BY created_ms")]


def _insert(
    db: PeerDatabase,
    row: _Row,
    *,
    message_id: bytes,
    sent_ms: int,
    history: str,
    path: str | None,
) -> None:
    """A new transfer and its line in the conversation, in one transaction."""
    file_id = row.offer.file_id
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO attachments (file_id, peer_id, outgoing, offer, state, have, path, "
            "saved, created_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                file_id,
                row.peer_id,
                int(row.outgoing),
                db.cipher.seal(_offer_ad(file_id), row.offer.encode()),
                row.state,
                bytes(row.have),
                row.path,
                None,
                row.created_ms,
                row.created_ms,
            ),
        )
        db.insert_history(
            conn,
            message_id=message_id,
            peer_id=row.peer_id,
            conversation=row.peer_id,
            outgoing=row.outgoing,
            sent_ms=sent_ms,
            text=history,
            state="sent" if row.outgoing else "received",
            path=path,
        )


def _update(
    db: PeerDatabase,
    file_id: bytes,
    *,
    state: str | None = None,
    have: bytes | None = None,
    path: str | None = None,
    saved: str | None = None,
    delivered: bool = False,
) -> None:
    with db.transaction() as conn:
        conn.execute(
            "UPDATE attachments SET state = coalesce(?, state), have = coalesce(?, have), "
            "path = coalesce(?, path), saved = coalesce(?, saved), updated_ms = ? "
            "WHERE file_id = ?",
            (
                state,
                have,
                path,
                None if saved is None else db.cipher.seal(_saved_ad(file_id), saved.encode()),
                now_ms(),
                file_id,
            ),
        )
        if delivered:
            conn.execute(
                "UPDATE messages SET state = 'delivered' "
                "WHERE outgoing = 1 AND message_id = ? "
                "AND state NOT IN ('delivered', 'read', 'retracted')",
                (file_id,),
            )


def _count_incoming(db: PeerDatabase, peer_id: str) -> tuple[int, int]:
    rows = db.read(
        "SELECT count(*), coalesce(sum(peer_id = ?), 0) FROM attachments "
        "WHERE outgoing = 0 AND state = 'receiving'",
        (peer_id,),
    )
    return int(rows[0][0]), int(rows[0][1])


def stored_transfers(db: PeerDatabase) -> list[Transfer]:
    """Every transfer a profile remembers, oldest first (no peer needed: ``teia file list``)."""
    db.ensure_schema(_SCHEMA)
    return [row.transfer() for row in _all(db)]


def queue_file(profile: Profile, to: PeerId, source: Path, name: str | None = None) -> str:
    """Offer a file from a process that does not have the profile online: encrypt it, record
    it (state ``queued``) and queue the offer in the outbox. The process that has the profile
    online delivers the offer, takes the transfer over (`Attachments.adopt_queued`: it pushes
    the chunks through the store when the recipient is unreachable, as `send_file` does) and
    serves the chunks. Returns the file ID (hex)."""
    size = source.stat().st_size
    if size > MAX_FILE_SIZE:
        raise AttachmentTooLarge(f"{source.name} is over the {human_size(MAX_FILE_SIZE)} limit")
    db = profile.db
    db.ensure_schema(_SCHEMA)
    work = profile.directory / "attachments" / "out"
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    file_id, key = secrets.token_bytes(FILE_ID_SIZE), secrets.token_bytes(KEY_SIZE)
    target = work / f"{file_id.hex()}.enc"
    digest = _encrypt_file(source, target, file_id, key, size)
    offer = FileOffer(file_id, safe_name(name or source.name), size, CHUNK_SIZE, key, digest)
    row = _Row(offer, str(to), True, "queued", bytearray(), None, None, now_ms())
    try:
        _insert(
            db,
            row,
            message_id=file_id,
            sent_ms=db.next_timestamp(),
            history=f"[file {offer.name}, {human_size(size)}]",
            path=None,
        )
        db.queue_app(str(to), APP, offer.encode())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return file_id.hex()


# --- the transfers in progress -------------------------------------------------------------


class _Receiving:
    """An incoming transfer being fetched: its bitmap in memory, one writer at a time."""

    def __init__(self, row: _Row, part: Path) -> None:
        self.row = row
        self.part = part
        self.lock = anyio.Lock()
        self.wake = anyio.Event()
        self.finished = False
        self.failures = 0
        self.pulling = anyio.CancelScope()
        """Around the pull in progress: cancelled when the transfer is called off."""

    @property
    def offer(self) -> FileOffer:
        return self.row.offer

    @property
    def complete(self) -> bool:
        count = self.offer.chunk_count
        return all(_bit(self.row.have, i) for i in range(count))

    def write(self, chunks: list[tuple[int, bytes]]) -> tuple[list[int], int]:
        """In a worker thread: authenticate and write chunks not held yet; (written, bad)."""
        written: list[int] = []
        bad = 0
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for index, sealed in chunks:
                if index >= self.offer.chunk_count or _bit(self.row.have, index):
                    continue
                try:
                    plain = open_chunk(self.offer, index, sealed)
                except AttachmentCorrupted:
                    bad += 1
                    continue
                os.pwrite(fd, plain, index * self.offer.chunk_size)
                written.append(index)
        finally:
            os.close(fd)
        return written, bad


class Attachments:
    """File transfers of a `teia.peer.Peer` (``peer.attachments``); see the module docstring."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        directory = peer.profile.directory
        configured = peer.config.attachment_dir
        self.receive_dir = Path(configured).expanduser() if configured else directory / "files"
        """Where complete incoming files are placed."""
        self._work = directory / "attachments"
        self.store_limit = peer.config.attachment_store_limit
        """Largest file whose chunks go through the store nodes when the recipient is away."""
        self._receiving: dict[bytes, _Receiving] = {}
        self._waiters: dict[bytes, anyio.Event] = {}
        self._events: Broadcast[TransferEvent] = Broadcast()
        self._pulls = anyio.CapacityLimiter(4)
        self._serving = anyio.CapacityLimiter(8)
        self.stats: dict[str, int] = {
            "chunks_served": 0,
            "chunks_received": 0,
            "chunks_corrupted": 0,
            "requests_refused": 0,
            "offers_refused": 0,
        }
        """Counts (metadata only) for metrics and tests."""
        self._adopting: set[bytes] = set()
        self.push_notices: dict[str, str] = {}
        """File ID → message ID of the last chunk pushed towards the store (the outbox queues
        in order: `Peer.wait_delivered` on it says when all are stored)."""
        self.cancel_notices: dict[str, str] = {}
        """File ID → message ID of the cancel notice sent to the other side (`Peer.wait_delivered`
        tells when it got there or into the store)."""
        peer.on_app(APP, self._on_payload)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the tables and directories, expire old transfers, resume unfinished ones
        (the peer calls this when it opens, before payloads are handed out)."""
        db = self._peer.profile.db
        await self._peer.run_db(db.ensure_schema, _SCHEMA)
        for sub in (self._work, self._work / "in", self._work / "out", self.receive_dir):
            sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        cutoff = now_ms() - RETENTION_MS
        for row in await self._peer.run_db(_all, db):
            if row.state in _ENDED:
                continue
            if row.created_ms < cutoff:
                await self._expire(row)
            elif not row.outgoing:
                self._resume(row)

    async def _expire(self, row: _Row) -> None:
        file_id = row.offer.file_id
        self._discard_files(file_id)
        await self._peer.run_db(_update, self._peer.profile.db, file_id, state="expired")

    def _discard_files(self, file_id: bytes) -> None:
        for path in (self._out_path(file_id), self._part_path(file_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _out_path(self, file_id: bytes) -> Path:
        return self._work / "out" / f"{file_id.hex()}.enc"

    def _part_path(self, file_id: bytes) -> Path:
        return self._work / "in" / f"{file_id.hex()}.part"

    def _resume(self, row: _Row) -> _Receiving:
        file_id = row.offer.file_id
        receiving = _Receiving(row, self._part_path(file_id))
        if not receiving.part.exists():
            receiving.row.have = bytearray(len(row.have))  # nothing on disk: start again
        self._receiving[file_id] = receiving
        self._peer.task_group.start_soon(self._pull_loop, receiving)
        return receiving

    # --- sending ------------------------------------------------------------------------

    async def send_file(
        self, to: PeerId | str, path: Path | str, *, name: str | None = None
    ) -> str:
        """Offer the file at ``path`` to ``to`` (peer ID or contact name); returns the file ID
        (hex). The file is encrypted into the profile first (so it may change or go away
        afterwards); the transfer then runs in the background (`wait_complete`, `status`)."""
        peer = self._peer
        peer_id = await peer.resolve(to)
        if peer_id == peer.peer_id:
            raise DeliveryError("cannot send a file to ourselves")
        source = Path(path)
        try:
            size = (await anyio.to_thread.run_sync(source.stat)).st_size
        except OSError as exc:
            raise AttachmentError(f"cannot read {source}: {exc.strerror}") from None
        if size > MAX_FILE_SIZE:
            raise AttachmentTooLarge(
                f"{source.name} is {human_size(size)}, over the {human_size(MAX_FILE_SIZE)} limit"
            )
        file_id, key = secrets.token_bytes(FILE_ID_SIZE), secrets.token_bytes(KEY_SIZE)
        target = self._out_path(file_id)
        try:
            digest = await anyio.to_thread.run_sync(
                _encrypt_file, source, target, file_id, key, size
            )
        except OSError as exc:
            raise AttachmentError(f"cannot read {source}: {exc.strerror}") from None
        offer = FileOffer(file_id, safe_name(name or source.name), size, CHUNK_SIZE, key, digest)
        row = _Row(offer, str(peer_id), True, "offered", bytearray(), None, None, now_ms())
        db = peer.profile.db
        try:
            await peer.run_db(
                _insert,
                db,
                row,
                message_id=file_id,
                sent_ms=db.next_timestamp(),
                history=f"[file {offer.name}, {human_size(size)}]",
                path=None,
            )
            reachable = await self._reachable(peer_id)
            await peer.send_app(peer_id, APP, offer.encode())
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if not reachable:
            await self._push_or_wait(peer_id, offer)
        return file_id.hex()

    async def _reachable(self, peer_id: PeerId) -> bool:
        try:
            await self._peer._connect(peer_id)  # the peer's path selection: direct, then relay
        except (DeliveryError, *_STREAM_ERRORS):
            return False
        return True

    async def _push_or_wait(self, peer_id: PeerId, offer: FileOffer) -> None:
        """The recipient is unreachable: push the chunks the way messages go (to its store
        inbox, after the offer in the same outbox) when the file is small enough and there
        are store nodes, else wait for a path (``waiting-direct``)."""
        peer, db, file_id = self._peer, self._peer.profile.db, offer.file_id
        if peer._store is None or offer.size > self.store_limit:
            _log.info("file %s waits for a path to its recipient", file_id.hex())
            await peer.run_db(_update, db, file_id, state="waiting-direct")
            self._notify(file_id)
            return
        last = ""
        for first in range(0, offer.chunk_count, _READ_BATCH):
            indexes = range(first, min(first + _READ_BATCH, offer.chunk_count))
            sealed = await anyio.to_thread.run_sync(self._read_sealed, offer, indexes)
            for index, data in zip(indexes, sealed, strict=True):
                last = await peer.send_app(peer_id, APP, FileChunk(file_id, index, data).encode())
        await peer.run_db(_update, db, file_id, state="pushed", path="stored")
        self.push_notices[file_id.hex()] = last
        while len(self.push_notices) > 1024:
            del self.push_notices[next(iter(self.push_notices))]
        self._notify(file_id)

    async def adopt_queued(self) -> int:
        """Take over the transfers other processes queued (`queue_file`): each becomes
        ``offered`` (its offer is in the outbox already), and when its recipient cannot be
        reached its chunks are pushed through the store like `send_file`'s. How many were
        taken (the peer calls this at start and whenever it scans its outbox)."""
        db = self._peer.profile.db
        rows = [
            r
            for r in await self._peer.run_db(_all, db)
            if r.outgoing and r.state == "queued" and r.offer.file_id not in self._adopting
        ]
        for row in rows:
            self._adopting.add(row.offer.file_id)
            self._peer.task_group.start_soon(self._adopt, row)
        return len(rows)

    async def _adopt(self, row: _Row) -> None:
        file_id = row.offer.file_id
        try:
            await self._peer.run_db(_update, self._peer.profile.db, file_id, state="offered")
            self._notify(file_id)
            peer_id = PeerId.from_string(row.peer_id)
            if not await self._reachable(peer_id):
                await self._push_or_wait(peer_id, row.offer)
        except (TeiaError, *_STREAM_ERRORS) as exc:
            _log.info("queued file %s: %s", file_id.hex(), type(exc).__name__)
        finally:
            self._adopting.discard(file_id)

    def _read_sealed(self, offer: FileOffer, indexes: Sequence[int]) -> list[bytes]:
        out = []
        with self._out_path(offer.file_id).open("rb") as file:
            for index in indexes:
                file.seek(offer.sealed_offset(index))
                want = offer.plain_length(index) + TAG
                data = file.read(want)
                if len(data) != want:
                    raise AttachmentUnavailable("the encrypted copy is damaged")
                out.append(data)
        return out

    async def serve(self, stream: NegotiatedStream) -> None:
        """``/teia/attachment/1.0.0``: answer chunk requests for files offered to the peer at
        the other end (everything else is ``UNAVAILABLE``, whether or not it exists)."""
        requester = stream.remote_peer_id
        try:
            if requester is None:
                return
            async with self._serving:
                while True:
                    try:
                        with anyio.fail_after(_IDLE):
                            raw = await stream.receive_message(MAX_REQUEST)
                    except anyio.EndOfStream:
                        return
                    if not await self._answer(stream, requester, raw):
                        return
        except (TeiaError, *_STREAM_ERRORS) as exc:
            _log.debug("attachment stream ended: %s", type(exc).__name__)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _answer(self, stream: NegotiatedStream, requester: PeerId, raw: bytes) -> bool:
        try:
            request = decode_request(raw)
        except InvalidAttachmentMessage:
            self.stats["requests_refused"] += 1
            await stream.send_message(ChunkAnswer(Status.BAD_REQUEST).encode())
            return False
        row = await self._peer.run_db(_get, self._peer.profile.db, request.file_id)
        if (
            row is None
            or not row.outgoing
            or row.peer_id != str(requester)
            or row.state in _ENDED
            or not self._out_path(request.file_id).exists()
        ):
            self.stats["requests_refused"] += 1
            await stream.send_message(ChunkAnswer(Status.UNAVAILABLE).encode())
            return False
        offer = row.offer
        indexes = request.indexes
        if indexes[-1] >= offer.chunk_count:
            self.stats["requests_refused"] += 1
            await stream.send_message(ChunkAnswer(Status.BAD_REQUEST).encode())
            return False
        for first in range(0, len(indexes), _READ_BATCH):
            batch = indexes[first : first + _READ_BATCH]
            sealed = await anyio.to_thread.run_sync(self._read_sealed, offer, batch)
            for index, data in zip(batch, sealed, strict=True):
                with anyio.fail_after(_IDLE):
                    await stream.send_message(ChunkAnswer(Status.OK, index, data).encode())
                self.stats["chunks_served"] += 1
        return True

    # --- receiving ----------------------------------------------------------------------

    async def _on_payload(self, message: AppMessage) -> None:
        payload = decode_payload(message.data)
        if isinstance(payload, FileOffer):
            await self._take_offer(message, payload)
        elif isinstance(payload, FileChunk):
            await self._take_chunk(message.sender, payload, message.path)
        elif isinstance(payload, FileCancel):
            await self._end(payload.file_id, message.sender, "cancelled by the other side")
        else:
            await self._take_done(message.sender, payload)

    async def _take_offer(self, message: AppMessage, offer: FileOffer) -> None:
        db = self._peer.profile.db
        sender = str(message.sender)
        existing = await self._peer.run_db(_get, db, offer.file_id)
        if existing is not None:
            if existing.outgoing or existing.peer_id != sender or existing.offer != offer:
                self.stats["offers_refused"] += 1
                raise AttachmentError("an offer reuses a file ID")
            receiving = self._receiving.get(offer.file_id)
            if receiving is not None:
                receiving.wake.set()  # offered again: the sender is back
            return
        if not await self._accepts(message.sender):
            # Refused by policy: the sender is told, so it stops offering and deletes its copy.
            self.stats["offers_refused"] += 1
            await self._peer.send_app(message.sender, APP, FileCancel(offer.file_id).encode())
            return
        total, from_sender = await self._peer.run_db(_count_incoming, db, sender)
        if total >= MAX_INCOMING or from_sender >= MAX_INCOMING_PER_PEER:
            self.stats["offers_refused"] += 1
            raise AttachmentError("too many unfinished incoming files")
        row = _Row(
            offer,
            sender,
            False,
            "receiving",
            bytearray((offer.chunk_count + 7) // 8),
            None,
            None,
            now_ms(),
        )
        await self._peer.run_db(
            _insert,
            db,
            row,
            message_id=offer.file_id,
            sent_ms=message.sent_ms,
            history=f"[file {safe_name(offer.name)}, {human_size(offer.size)}]",
            path=message.path,
        )
        self._peer._history_changed()
        receiving = self._resume(row)
        self._emit(TransferOffered(receiving.row.transfer()))
        self._notify(offer.file_id)

    async def _accepts(self, sender: PeerId) -> bool:
        """Whether the ``attachment_accept`` setting takes offers from ``sender``."""
        policy = self._peer.config.attachment_accept
        if policy in ("all", "none"):
            return policy == "all"
        contact = await self._peer.run_db(self._peer.profile.db.contact, str(sender))
        if contact is None:
            return False
        return policy == "contacts" or contact.trust == "verified"

    async def _take_chunk(self, sender: PeerId, chunk: FileChunk, path: str) -> None:
        receiving = self._receiving.get(chunk.file_id)
        if receiving is None or receiving.row.peer_id != str(sender):
            return  # finished already, or not offered by this sender: nothing to do
        await self._accept(receiving, [(chunk.index, chunk.sealed)], path)

    async def _accept(
        self, receiving: _Receiving, chunks: list[tuple[int, bytes]], path: str
    ) -> tuple[int, int]:
        """Write authenticated chunks, commit the bitmap, finish when complete; (new, bad)."""
        async with receiving.lock:
            if receiving.finished:
                return 0, 0
            written, bad = await anyio.to_thread.run_sync(receiving.write, chunks)
            self.stats["chunks_corrupted"] += bad
            self.stats["chunks_received"] += len(written)
            if written:
                for index in written:
                    receiving.row.have[index >> 3] |= 1 << (index & 7)
                receiving.row.path = path
                await self._peer.run_db(
                    _update,
                    self._peer.profile.db,
                    receiving.offer.file_id,
                    have=bytes(receiving.row.have),
                    path=path,
                )
            if receiving.complete:
                await self._finish(receiving)
            return len(written), bad

    async def _finish(self, receiving: _Receiving) -> None:
        """The last chunk is in: check the digest, place the file, tell the sender."""
        offer = receiving.offer
        db = self._peer.profile.db
        try:
            saved = await anyio.to_thread.run_sync(self._place, receiving)
        except AttachmentCorrupted:
            # Only a damaged disk gets here (every chunk authenticated): fetch it all again.
            receiving.failures += 1
            receiving.row.have = bytearray(len(receiving.row.have))
            receiving.part.unlink(missing_ok=True)
            state = "failed" if receiving.failures >= 2 else "receiving"
            await self._peer.run_db(
                _update, db, offer.file_id, state=state, have=bytes(receiving.row.have)
            )
            if state == "failed":
                receiving.finished = True
                self._receiving.pop(offer.file_id, None)
                receiving.row.state = state
                self._emit(TransferFailed(receiving.row.transfer(), "digest mismatch"))
                self._notify(offer.file_id)
            return
        receiving.finished = True
        receiving.row.state = "complete"
        receiving.row.saved = str(saved)
        await self._peer.run_db(_update, db, offer.file_id, state="complete", saved=str(saved))
        self._receiving.pop(offer.file_id, None)
        receiving.wake.set()
        await self._peer.send_app(
            PeerId.from_string(receiving.row.peer_id), APP, FileDone(offer.file_id).encode()
        )
        self._emit(TransferCompleted(receiving.row.transfer()))
        self._notify(offer.file_id)

    def _place(self, receiving: _Receiving) -> Path:
        """In a worker thread: check the digest, sync, link under a free name (atomic: the
        file appears complete or not at all, and never replaces another)."""
        offer = receiving.offer
        part = receiving.part
        if not part.exists():
            os.close(os.open(part, os.O_WRONLY | os.O_CREAT, 0o600))
        digest = hashlib.sha256()
        with part.open("r+b") as file:
            file.truncate(offer.size)
            while block := file.read(1024 * 1024):
                digest.update(block)
            if not secrets.compare_digest(digest.digest(), offer.digest):
                raise AttachmentCorrupted("the received file does not match its digest")
            os.fsync(file.fileno())
        wanted = safe_name(offer.name)
        stem, dot, suffix = wanted.rpartition(".")
        if not stem:
            stem, dot, suffix = suffix, "", ""
        for attempt in range(1000):
            name = wanted if attempt == 0 else f"{stem} ({attempt}){dot}{suffix}"
            target = self.receive_dir / name
            try:
                os.link(part, target)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: another file system, copy it over first
                    raise
                tmp = self.receive_dir / f".{offer.file_id.hex()}.tmp"
                shutil.copyfile(part, tmp)
                os.chmod(tmp, 0o600)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    tmp.unlink()
                    continue
                tmp.unlink()
            part.unlink()
            return target
        raise AttachmentError("no free name for the received file")

    async def _take_done(self, sender: PeerId, done: FileDone) -> None:
        db = self._peer.profile.db
        row = await self._peer.run_db(_get, db, done.file_id)
        if row is None or not row.outgoing or row.peer_id != str(sender):
            return
        if row.state in _ENDED:
            return
        self._out_path(done.file_id).unlink(missing_ok=True)
        await self._peer.run_db(_update, db, done.file_id, state="complete", delivered=True)
        row.state = "complete"
        self._emit(TransferCompleted(row.transfer()))
        self._notify(done.file_id)

    # --- cancelling ---------------------------------------------------------------------

    async def cancel(self, file_id: str) -> Transfer:
        """Call off a transfer that has not ended, sent or received: what this side holds of
        it is deleted (the encrypted copy, or the partial file), the other side is told
        (``cancel`` payload: it stops and deletes its part too), and waiters get
        `AttachmentError`. `UnknownAttachment` for no such transfer; one that already ended
        (complete, failed, expired, cancelled) is returned as it is."""
        try:
            raw = bytes.fromhex(file_id)
        except ValueError:
            raise UnknownAttachment(f"{file_id!r} is not a file ID") from None
        row = await self._peer.run_db(_get, self._peer.profile.db, raw)
        if row is None:
            raise UnknownAttachment(f"no transfer {file_id}")
        if await self._end(raw, None, "cancelled"):
            other = PeerId.from_string(row.peer_id)
            notice = await self._peer.send_app(other, APP, FileCancel(raw).encode())
            self.cancel_notices[file_id] = notice
            while len(self.cancel_notices) > 1024:
                del self.cancel_notices[next(iter(self.cancel_notices))]
        return await self.status(file_id)

    async def _end(self, file_id: bytes, by: PeerId | None, reason: str) -> bool:
        """Mark a transfer cancelled and delete its files, unless it ended already or ``by``
        (the peer asking, None for us) is not the other side of it; whether it was ended."""
        db = self._peer.profile.db
        receiving = self._receiving.get(file_id)
        if receiving is not None:
            if by is not None and receiving.row.peer_id != str(by):
                return False
            async with receiving.lock:  # no chunk is being written while the part goes
                if receiving.finished:
                    return False
                receiving.finished = True
                self._receiving.pop(file_id, None)
                receiving.wake.set()
                receiving.pulling.cancel()
                row = receiving.row
                self._discard_files(file_id)
                await self._peer.run_db(_update, db, file_id, state="cancelled")
        else:
            row_or_none = await self._peer.run_db(_get, db, file_id)
            if row_or_none is None or row_or_none.state in _ENDED:
                return False
            row = row_or_none
            if by is not None and row.peer_id != str(by):
                return False
            self._discard_files(file_id)
            await self._peer.run_db(_update, db, file_id, state="cancelled")
        row.state = "cancelled"
        self._emit(TransferFailed(row.transfer(), reason))
        self._notify(file_id)
        return True

    # --- pulling ------------------------------------------------------------------------

    async def _pull_loop(self, receiving: _Receiving) -> None:
        """Fetch what is missing from the sender until complete; after a failure try again
        later (sooner when the offer comes again), until the offer expires."""
        retry = self._peer.config.retry_interval
        cap = min(30.0, retry * 16)
        failures = 0
        while not receiving.finished:
            if receiving.complete:
                async with receiving.lock:
                    if not receiving.finished:
                        await self._finish(receiving)
                continue
            if now_ms() - receiving.row.created_ms > RETENTION_MS:
                await self._expire(receiving.row)
                receiving.finished = True
                self._receiving.pop(receiving.offer.file_id, None)
                self._emit(TransferFailed(receiving.row.transfer(), "expired"))
                self._notify(receiving.offer.file_id)
                return
            receiving.wake = anyio.Event()
            try:
                with anyio.CancelScope() as receiving.pulling:
                    async with self._pulls:
                        await self._pull(receiving)
                failures = 0
                continue
            except (TeiaError, *_STREAM_ERRORS) as exc:
                _log.info(
                    "fetching file %s deferred: %s", receiving.offer.file_id.hex(),
                    type(exc).__name__,
                )  # fmt: skip
            failures += 1
            with anyio.move_on_after(min(cap, retry * 2 ** min(failures, 10))):
                await receiving.wake.wait()

    async def _pull(self, receiving: _Receiving) -> None:
        peer = self._peer
        sender = PeerId.from_string(receiving.row.peer_id)
        await peer._connect(sender)
        path = peer._path_of(sender)
        stream = await peer.host.open_stream(sender, PROTOCOL)
        offer = receiving.offer
        stalls = 0
        try:
            while not receiving.finished and not receiving.complete:
                runs = _runs(receiving.row.have, offer.chunk_count, MAX_RUNS)
                request = ChunkRequest(offer.file_id, runs)
                with anyio.fail_after(_IDLE):
                    await stream.send_message(request.encode())
                batch: list[tuple[int, bytes]] = []
                size = new = bad = 0
                try:
                    for index in request.indexes:
                        with anyio.fail_after(_IDLE):
                            answer = decode_answer(await stream.receive_message(MAX_ANSWER))
                        if answer.status == Status.UNAVAILABLE:
                            raise AttachmentUnavailable("the sender does not serve this file")
                        if answer.status != Status.OK or answer.index != index:
                            raise InvalidAttachmentMessage("the sender answered out of order")
                        batch.append((index, answer.sealed))
                        size += len(answer.sealed)
                        if size >= _WRITE_BATCH:
                            got, lost = await self._accept(receiving, batch, path)
                            new, bad, batch, size = new + got, bad + lost, [], 0
                except (TeiaError, *_STREAM_ERRORS):
                    if batch:  # keep what arrived before the stream broke
                        await self._accept(receiving, batch, path)
                    raise
                if batch:
                    got, lost = await self._accept(receiving, batch, path)
                    new, bad = new + got, bad + lost
                if bad and not new:
                    stalls += 1
                    if stalls >= _MAX_STALLS:
                        raise AttachmentCorrupted("the sender keeps sending damaged chunks")
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    # --- what the application asks ------------------------------------------------------

    async def status(self, file_id: str) -> Transfer:
        """A transfer by file ID (hex); `UnknownAttachment` if there is none."""
        try:
            raw = bytes.fromhex(file_id)
        except ValueError:
            raise UnknownAttachment(f"{file_id!r} is not a file ID") from None
        receiving = self._receiving.get(raw)
        if receiving is not None:
            return receiving.row.transfer()
        row = await self._peer.run_db(_get, self._peer.profile.db, raw)
        if row is None:
            raise UnknownAttachment(f"no transfer {file_id}")
        return row.transfer()

    async def transfers(self) -> list[Transfer]:
        """Every transfer the profile remembers, oldest first."""
        rows = await self._peer.run_db(_all, self._peer.profile.db)
        out = []
        for row in rows:
            receiving = self._receiving.get(row.offer.file_id)
            out.append((receiving.row if receiving is not None else row).transfer())
        return out

    async def wait_complete(self, file_id: str) -> Transfer:
        """Wait until the transfer is complete — the recipient has the file (outgoing), or it
        is in the receive directory (incoming); `AttachmentError` if it failed or expired. A
        file ID not known yet is waited for (its offer may be on the way). Bound it with
        ``anyio.fail_after``."""
        try:
            raw = bytes.fromhex(file_id)
        except ValueError:
            raise UnknownAttachment(f"{file_id!r} is not a file ID") from None
        while True:
            waiter = self._waiters.setdefault(raw, anyio.Event())
            try:
                transfer = await self.status(file_id)
            except UnknownAttachment:
                await waiter.wait()  # its offer is on the way
                continue
            if transfer.state == "complete":
                return transfer
            if transfer.state in _ENDED:
                raise AttachmentError(f"transfer {file_id} {transfer.state}")
            await waiter.wait()

    async def wait_state(self, file_id: str, *states: str) -> Transfer:
        """Wait until the transfer is in one of ``states`` (or has ended); the transfer.
        Bound it with ``anyio.fail_after``."""
        raw = bytes.fromhex(file_id)
        while True:
            waiter = self._waiters.setdefault(raw, anyio.Event())
            with contextlib.suppress(UnknownAttachment):
                transfer = await self.status(file_id)
                if transfer.state in states or transfer.state in _ENDED:
                    return transfer
            await waiter.wait()

    def wake(self) -> None:
        """Try every unfinished incoming transfer again now (after a network change, say)."""
        for receiving in list(self._receiving.values()):
            receiving.wake.set()

    @asynccontextmanager
    async def events(
        self, buffer: int = 256
    ) -> AsyncIterator[anyio.abc.ObjectReceiveStream[TransferEvent]]:
        """``async with peer.attachments.events() as events:`` — offers, completions and
        failures (dropped when the consumer falls ``buffer`` behind)."""
        async with self._events.subscribe(buffer) as receive:
            yield receive

    def _emit(self, event: TransferEvent) -> None:
        self._events.emit(event)

    def _notify(self, file_id: bytes) -> None:
        waiter = self._waiters.pop(file_id, None)
        if waiter is not None:
            waiter.set()
