"""Wire formats of groups: the signed state chain, sender-key distributions, group messages.

Everything travels as application payloads named ``teia.group`` (`Peer.send_app`), so over
the pairwise ratcheted sessions. A payload holds exactly one of::

    GroupPayload  { 1: state (GroupState)  2: key (KeyDistribution)  3: message (GroupMessage)
                    4: join (GroupJoin)  5: leave (GroupLeave) }

    GroupState    { 1: group_id (16)  2: version (uint32)  3: prev_hash (32; absent in version 0)
                    4: name (UTF-8, ≤ 256 bytes)  5: members (repeated peer ID, 1…1000, distinct)
                    6: admins (repeated peer ID, 1…members, distinct, each a member)
                    7: signer (peer ID)  8: timestamp_ms  9: nonce (16; version 0 only)
                    15: signature (Ed25519, 64) }
    GroupHeader   { 1: group_id  2: version  3: prev_hash  4: name_hash (SHA-256 of the name)
                    5: members_hash (SHA-256 of the members' field-5 encodings, in order)
                    6: admins  7: signer  8: timestamp_ms  9: nonce  15: signature }
    GroupJoin     { 1: state (GroupState)  2: headers (repeated GroupHeader, versions f…)
                    3: f (the first header's version; left out when 0) }
    KeyDistribution { 1: group_id  2: version  3: distribution (sender-key distribution, 73) }
    GroupLeave    { 1: group_id  2: version (the leaver's; left out when 0) }
    GroupMessage  { 1: group_id  2: version  3: message_id (16)  4: ciphertext (group message) }
    GroupText     { 1: group_id  2: message_id  3: text }        (the sender-key plaintext)

A state's **header** keeps everything but the member list and the name, which it replaces by
their hashes; the signature covers ``"teia group state v2\\0"`` followed by the header's fields
1-9, and a state's hash (`digest`, what the next version names as ``prev_hash``) is SHA-256 of
the header with its signature. So a chain can be checked link by link from headers alone — a
few hundred bytes a version, where states carry up to 1,000 members: a peer joining a group
gets the headers of every version before the one adding it (`GroupJoin`, in pages when they
do not fit one payload) and checks them back to the creator. Encodings are canonical: fields
in this order, each once (members and admins repeated in place), so decoding and encoding
again give the same bytes. Version 0 binds the
group ID to its creator:
``group_id = SHA-256("teia group id v1\\0" ‖ creator peer ID ‖ nonce)[:16]``.

``version`` in keys and messages is the sender's state version when it sent them: a receiver
that holds an older state keeps them until the state catches up.

Every decoder is strict and bounded and raises `InvalidGroupMessage`; `GroupState.decode`
also verifies the signature (who may sign is the chain's business, `teia.peer.groups`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final

from teia.errors import InvalidGroupMessage, InvalidPeerId
from teia.host.protobuf import (
    bytes_value,
    checked_fields,
    encode_bytes_field,
    encode_varint_field,
    int_value,
)
from teia.identity import Identity, PeerId, verify
from teia.peer.wire import MAX_APP_DATA, MAX_TEXT_BYTES

__all__ = [
    "GROUP_APP",
    "MAX_GROUP_NAME",
    "MAX_MEMBERS",
    "GroupHeader",
    "GroupJoin",
    "GroupLeave",
    "GroupMessage",
    "GroupPayload",
    "GroupState",
    "GroupText",
    "KeyDistribution",
    "derive_group_id",
]

GROUP_APP: Final = "teia.group"
GROUP_ID_SIZE: Final = 16
MAX_MEMBERS: Final = 1000
MAX_GROUP_NAME: Final = 256
"""Largest group name (UTF-8 bytes)."""
MAX_VERSION: Final = 2**32 - 1
_HASH_SIZE: Final = 32
_NONCE_SIZE: Final = 16
_SIGNATURE_SIZE: Final = 64
_SIGNED_FIELDS: Final = frozenset({1, 2, 3, 4, 5, 7, 8, 9, 15})  # besides the repeated ones
_MAX_HEADER: Final = 64 * 1024  # 1,000 admins fit
_MAX_PEER_ID: Final = 64
_DISTRIBUTION_SIZE: Final = 73
_MIN_GROUP_CIPHERTEXT: Final = 121
_SIGNING_DOMAIN: Final = b"teia group state v2\0"
_ID_DOMAIN: Final = b"teia group id v1\0"


_varint_field = encode_varint_field
_fields = partial(checked_fields, error=InvalidGroupMessage)
_bytes = partial(bytes_value, error=InvalidGroupMessage)
_int = partial(int_value, error=InvalidGroupMessage)


def _single(data: bytes, what: str, allowed: frozenset[int]) -> dict[int, int | bytes]:
    """The fields of a message whose fields each appear at most once."""
    values: dict[int, int | bytes] = {}
    for number, _, value in _fields(data, what):
        if number not in allowed:
            raise InvalidGroupMessage(f"{what} has an unknown field {number}")
        if number in values:
            raise InvalidGroupMessage(f"{what} field {number} repeated")
        values[number] = value
    return values


def _group_id(value: int | bytes | None) -> bytes:
    if value is None:
        raise InvalidGroupMessage("group_id missing")
    group_id = _bytes(value, "group_id")
    if len(group_id) != GROUP_ID_SIZE:
        raise InvalidGroupMessage("group_id must be 16 bytes")
    return group_id


def _version(value: int | bytes | None) -> int:
    version = _int(0 if value is None else value, "version")
    if version > MAX_VERSION:
        raise InvalidGroupMessage("version over the limit")
    return version


def _peer(raw: bytes, what: str) -> PeerId:
    if not 1 <= len(raw) <= _MAX_PEER_ID:
        raise InvalidGroupMessage(f"{what} is not a peer ID")
    try:
        peer = PeerId.from_bytes(raw)
    except InvalidPeerId:
        raise InvalidGroupMessage(f"{what} is not a peer ID") from None
    if peer.public_key is None:
        raise InvalidGroupMessage(f"{what} does not embed an Ed25519 key")
    return peer


def derive_group_id(creator: PeerId, nonce: bytes) -> bytes:
    """The ID of a group created by ``creator`` with ``nonce`` (see the module docstring)."""
    return hashlib.sha256(_ID_DOMAIN + creator.to_bytes() + nonce).digest()[:GROUP_ID_SIZE]


def _members_hash(members: tuple[PeerId, ...]) -> bytes:
    return hashlib.sha256(b"".join(encode_bytes_field(5, m.to_bytes()) for m in members)).digest()


def _header_body(
    group_id: bytes,
    version: int,
    prev_hash: bytes,
    name_hash: bytes,
    members_hash: bytes,
    admins: tuple[PeerId, ...],
    signer: PeerId,
    timestamp_ms: int,
    nonce: bytes,
) -> bytes:
    out = [encode_bytes_field(1, group_id), _varint_field(2, version)]
    if prev_hash:
        out.append(encode_bytes_field(3, prev_hash))
    out.append(encode_bytes_field(4, name_hash))
    out.append(encode_bytes_field(5, members_hash))
    out.extend(encode_bytes_field(6, a.to_bytes()) for a in admins)
    out.append(encode_bytes_field(7, signer.to_bytes()))
    out.append(_varint_field(8, timestamp_ms))
    if nonce:
        out.append(encode_bytes_field(9, nonce))
    return b"".join(out)


def _signed_fields(
    data: bytes, what: str, repeated: frozenset[int]
) -> tuple[dict[int, int | bytes], dict[int, list[PeerId]]]:
    """The fields of a signed state or header: peer IDs of the ``repeated`` field numbers (at
    most `MAX_MEMBERS` each), every other known field once, the signer and signature present."""
    single: dict[int, int | bytes] = {}
    peers: dict[int, list[PeerId]] = {number: [] for number in repeated}
    for number, _, value in _fields(data, what):
        if number in repeated:
            if len(peers[number]) >= MAX_MEMBERS:
                listed = "members" if number == 5 else "admins"
                raise InvalidGroupMessage(f"a {what} lists more than {MAX_MEMBERS} {listed}")
            peers[number].append(_peer(_bytes(value, "peer"), "member or admin"))
        elif number in _SIGNED_FIELDS:
            if number in single:
                raise InvalidGroupMessage(f"{what} field {number} repeated")
            single[number] = value
        else:
            raise InvalidGroupMessage(f"{what} has an unknown field {number}")
    if 7 not in single or 15 not in single:
        raise InvalidGroupMessage(f"{what} lacks its signer or signature")
    return single, peers


def _check_link(version: int, prev_hash: bytes, nonce: bytes) -> None:
    """Version 0 has a nonce and no previous hash; every later version the other way round."""
    if version == 0:
        if prev_hash or len(nonce) != _NONCE_SIZE:
            raise InvalidGroupMessage("version 0 has a nonce and no previous hash")
    elif len(prev_hash) != _HASH_SIZE or nonce:
        raise InvalidGroupMessage("a change has a previous hash and no nonce")


@dataclass(frozen=True, slots=True)
class GroupState:
    """One link of a group's chain: who is in it, who administers it, its name; signed."""

    group_id: bytes
    version: int
    prev_hash: bytes
    name: str
    members: tuple[PeerId, ...]
    admins: tuple[PeerId, ...]
    signer: PeerId
    timestamp_ms: int
    nonce: bytes = b""
    signature: bytes = b""

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if len(self.group_id) != GROUP_ID_SIZE:
            raise InvalidGroupMessage("group_id must be 16 bytes")
        if not 0 <= self.version <= MAX_VERSION or self.timestamp_ms < 0:
            raise InvalidGroupMessage("version or timestamp out of range")
        _check_link(self.version, self.prev_hash, self.nonce)
        if len(self.name.encode()) > MAX_GROUP_NAME:
            raise InvalidGroupMessage(f"group name over {MAX_GROUP_NAME} bytes")
        if not 1 <= len(self.members) <= MAX_MEMBERS:
            raise InvalidGroupMessage(f"a group has 1 to {MAX_MEMBERS} members")
        if len(set(self.members)) != len(self.members):
            raise InvalidGroupMessage("a member is listed twice")
        if not self.admins or len(set(self.admins)) != len(self.admins):
            raise InvalidGroupMessage("a group has distinct admins, at least one")
        if not set(self.admins) <= set(self.members):
            raise InvalidGroupMessage("an admin is not a member")
        for peer in (*self.members, self.signer):
            if peer.public_key is None or len(peer.to_bytes()) > _MAX_PEER_ID:
                raise InvalidGroupMessage("a peer ID without an Ed25519 key")
        if self.signature and len(self.signature) != _SIGNATURE_SIZE:
            raise InvalidGroupMessage("signature must be 64 bytes")

    def _body(self) -> bytes:
        out = [
            encode_bytes_field(1, self.group_id),
            _varint_field(2, self.version),
        ]
        if self.prev_hash:
            out.append(encode_bytes_field(3, self.prev_hash))
        out.append(encode_bytes_field(4, self.name.encode()))
        out.extend(encode_bytes_field(5, m.to_bytes()) for m in self.members)
        out.extend(encode_bytes_field(6, a.to_bytes()) for a in self.admins)
        out.append(encode_bytes_field(7, self.signer.to_bytes()))
        out.append(_varint_field(8, self.timestamp_ms))
        if self.nonce:
            out.append(encode_bytes_field(9, self.nonce))
        return b"".join(out)

    def _signed_body(self) -> bytes:
        """What the signature covers: the header's fields."""
        return self.header()._body()

    def header(self) -> GroupHeader:
        """This state without its member list and name (their hashes instead; unsigned when
        the state is)."""
        return GroupHeader(
            self.group_id,
            self.version,
            self.prev_hash,
            hashlib.sha256(self.name.encode()).digest(),
            _members_hash(self.members),
            self.admins,
            self.signer,
            self.timestamp_ms,
            self.nonce,
            self.signature,
        )

    def signed(self, identity: Identity) -> GroupState:
        """This state signed by ``identity`` (which must be its ``signer``)."""
        if identity.peer_id != self.signer:
            raise InvalidGroupMessage("the signer must sign its own state")
        signature = identity.sign(_SIGNING_DOMAIN + self._signed_body())
        return GroupState(
            self.group_id,
            self.version,
            self.prev_hash,
            self.name,
            self.members,
            self.admins,
            self.signer,
            self.timestamp_ms,
            self.nonce,
            signature,
        )

    def verify(self) -> bool:
        """Whether the signature is the signer's over this state."""
        key = self.signer.public_key
        return key is not None and verify(
            key, _SIGNING_DOMAIN + self._signed_body(), self.signature
        )

    def encode(self) -> bytes:
        if not self.signature:
            raise InvalidGroupMessage("an unsigned state cannot be encoded")
        return self._body() + encode_bytes_field(15, self.signature)

    def digest(self) -> bytes:
        """What the next version names as ``prev_hash``: its header's `GroupHeader.digest`."""
        if not self.signature:
            raise InvalidGroupMessage("an unsigned state has no digest")
        return self.header().digest()

    @classmethod
    def decode(cls, data: bytes) -> GroupState:
        """Parse a canonical, signed state; `InvalidGroupMessage` for anything else."""
        if len(data) > MAX_APP_DATA:
            raise InvalidGroupMessage("group state over the limit")
        single, peers = _signed_fields(data, "group state", frozenset({5, 6}))
        try:
            name_raw = _bytes(single.get(4, b""), "name")
            name = name_raw.decode()
        except UnicodeDecodeError:
            raise InvalidGroupMessage("group name is not UTF-8") from None
        if len(name_raw) > MAX_GROUP_NAME:
            raise InvalidGroupMessage("group name over the limit")
        state = cls(
            _group_id(single.get(1)),
            _version(single.get(2)),
            _bytes(single.get(3, b""), "prev_hash"),
            name,
            tuple(peers[5]),
            tuple(peers[6]),
            _peer(_bytes(single[7], "signer"), "signer"),
            _int(single.get(8, 0), "timestamp"),
            _bytes(single.get(9, b""), "nonce"),
            _bytes(single[15], "signature"),
        )
        if state.encode() != data:
            raise InvalidGroupMessage("group state is not in canonical form")
        if not state.verify():
            raise InvalidGroupMessage("group state signature does not verify")
        return state


@dataclass(frozen=True, slots=True)
class GroupHeader:
    """A state's header: what its signature and hash cover, with hashes for members and name."""

    group_id: bytes
    version: int
    prev_hash: bytes
    name_hash: bytes
    members_hash: bytes
    admins: tuple[PeerId, ...]
    signer: PeerId
    timestamp_ms: int
    nonce: bytes
    signature: bytes

    def _body(self) -> bytes:
        return _header_body(
            self.group_id,
            self.version,
            self.prev_hash,
            self.name_hash,
            self.members_hash,
            self.admins,
            self.signer,
            self.timestamp_ms,
            self.nonce,
        )

    def encode(self) -> bytes:
        return self._body() + encode_bytes_field(15, self.signature)

    def digest(self) -> bytes:
        """SHA-256 of the encoding (the same as `GroupState.digest` of its state)."""
        return hashlib.sha256(self.encode()).digest()

    def verify(self) -> bool:
        key = self.signer.public_key
        return key is not None and verify(key, _SIGNING_DOMAIN + self._body(), self.signature)

    @classmethod
    def decode(cls, data: bytes) -> GroupHeader:
        """Parse a canonical, signed header; `InvalidGroupMessage` for anything else."""
        if len(data) > _MAX_HEADER:
            raise InvalidGroupMessage("group header over the limit")
        single, peers = _signed_fields(data, "group header", frozenset({6}))
        admins = peers[6]
        version = _version(single.get(2))
        prev_hash = _bytes(single.get(3, b""), "prev_hash")
        nonce = _bytes(single.get(9, b""), "nonce")
        name_hash = _bytes(single.get(4, b""), "name_hash")
        members_hash = _bytes(single.get(5, b""), "members_hash")
        signature = _bytes(single[15], "signature")
        if len(name_hash) != _HASH_SIZE or len(members_hash) != _HASH_SIZE:
            raise InvalidGroupMessage("a header's name and member hashes are 32 bytes")
        _check_link(version, prev_hash, nonce)
        if not admins or len(set(admins)) != len(admins):
            raise InvalidGroupMessage("a group has distinct admins, at least one")
        if len(signature) != _SIGNATURE_SIZE:
            raise InvalidGroupMessage("signature must be 64 bytes")
        header = cls(
            _group_id(single.get(1)),
            version,
            prev_hash,
            name_hash,
            members_hash,
            tuple(admins),
            _peer(_bytes(single[7], "signer"), "signer"),
            _int(single.get(8, 0), "timestamp"),
            nonce,
            signature,
        )
        if header.encode() != data:
            raise InvalidGroupMessage("group header is not in canonical form")
        if not header.verify():
            raise InvalidGroupMessage("group header signature does not verify")
        return header


@dataclass(frozen=True, slots=True)
class GroupJoin:
    """The state adding a peer, with the headers of the versions before it: all of them
    (``first`` 0, `complete`), or — when they do not fit one payload — one page of them,
    versions ``first`` to ``first + len(headers) - 1`` (`paged` cuts them; the receiver keeps
    the pages until they cover versions 0 to ``state.version - 1``)."""

    state: GroupState
    headers: tuple[GroupHeader, ...]
    first: int = 0
    """The version of ``headers[0]`` (pages after the first one)."""

    @property
    def complete(self) -> bool:
        """Whether the headers are those of every version before the state."""
        return self.first == 0 and len(self.headers) == self.state.version

    def encode(self) -> bytes:
        out = encode_bytes_field(1, self.state.encode()) + b"".join(
            encode_bytes_field(2, h.encode()) for h in self.headers
        )
        return out + _varint_field(3, self.first) if self.first else out

    @property
    def group_id(self) -> bytes:
        return self.state.group_id

    @classmethod
    def paged(
        cls, state: GroupState, headers: Sequence[GroupHeader], limit: int = MAX_APP_DATA
    ) -> tuple[GroupJoin, ...]:
        """``state`` with ``headers`` (versions 0 to ``state.version`` - 1) cut into joins
        whose `GroupPayload` encodings each fit ``limit`` bytes; one join when they all fit.
        `InvalidGroupMessage` if the state alone leaves no room for a header."""
        whole = cls(state, tuple(headers))
        if len(GroupPayload(whole).encode()) <= limit:
            return (whole,)
        # Room for headers: the limit less the state, the page's first-version field and the
        # payload's own tag and length (a 4-byte varint covers any payload size allowed).
        room = limit - len(encode_bytes_field(1, state.encode())) - 6 - 5
        pages: list[GroupJoin] = []
        chunk: list[GroupHeader] = []
        used = 0
        for header in headers:
            cost = len(encode_bytes_field(2, header.encode()))
            if cost > room:
                raise InvalidGroupMessage("a group header does not fit a join page")
            if used + cost > room:
                pages.append(cls(state, tuple(chunk), header.version - len(chunk)))
                chunk, used = [], 0
            chunk.append(header)
            used += cost
        pages.append(cls(state, tuple(chunk), state.version - len(chunk)))
        return tuple(pages)

    @classmethod
    def decode(cls, data: bytes) -> GroupJoin:
        if len(data) > MAX_APP_DATA:
            raise InvalidGroupMessage("group join over the limit")
        state: GroupState | None = None
        headers: list[GroupHeader] = []
        first: int | None = None
        for number, _, value in _fields(data, "group join"):
            if number == 1 and state is None:
                state = GroupState.decode(_bytes(value, "state"))
            elif number == 2 and state is not None and first is None:
                headers.append(GroupHeader.decode(_bytes(value, "header")))
            elif number == 3 and state is not None and first is None:
                first = _version(value)
                if not first:
                    raise InvalidGroupMessage("a join page's first version is left out when 0")
            else:
                raise InvalidGroupMessage(
                    "a group join is its state, then headers, then the first header's version"
                )
        if state is None:
            raise InvalidGroupMessage("a group join without a state")
        join = cls(state, tuple(headers), first or 0)
        if join.first + len(headers) > state.version or (not headers and state.version):
            raise InvalidGroupMessage("a group join carries headers of versions before its state")
        for at, header in enumerate(headers, join.first):
            if header.version != at or header.group_id != state.group_id:
                raise InvalidGroupMessage("a group join's headers are its group's, in order")
        return join


@dataclass(frozen=True, slots=True)
class KeyDistribution:
    """A member's sender key for a group, handed to another member."""

    group_id: bytes
    version: int
    distribution: bytes

    def encode(self) -> bytes:
        return b"".join(
            (
                encode_bytes_field(1, self.group_id),
                _varint_field(2, self.version),
                encode_bytes_field(3, self.distribution),
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyDistribution:
        values = _single(data, "key distribution", frozenset({1, 2, 3}))
        distribution = _bytes(values.get(3, b""), "distribution")
        if len(distribution) != _DISTRIBUTION_SIZE:
            raise InvalidGroupMessage("a sender-key distribution is 73 bytes")
        return cls(_group_id(values.get(1)), _version(values.get(2)), distribution)


@dataclass(frozen=True, slots=True)
class GroupLeave:
    """A member asking the group's admins to remove it (only admins sign versions)."""

    group_id: bytes
    version: int
    """The version the member held when it left."""

    def encode(self) -> bytes:
        return encode_bytes_field(1, self.group_id) + (
            _varint_field(2, self.version) if self.version else b""
        )

    @classmethod
    def decode(cls, data: bytes) -> GroupLeave:
        values = _single(data, "group leave", frozenset({1, 2}))
        leave = cls(_group_id(values.get(1)), _version(values.get(2)))
        if leave.encode() != data:
            raise InvalidGroupMessage("group leave is not in canonical form")
        return leave


MAX_GROUP_CIPHERTEXT: Final = MAX_APP_DATA - 256
"""Largest sender-key ciphertext a group message may carry (it fits one payload)."""


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """A group text as fanned out: encrypted once with the sender's key."""

    group_id: bytes
    version: int
    message_id: bytes
    ciphertext: bytes

    @property
    def chain_id(self) -> int:
        """The sender-key chain the ciphertext names (its bytes 1-4)."""
        return int.from_bytes(self.ciphertext[1:5], "big")

    def encode(self) -> bytes:
        return b"".join(
            (
                encode_bytes_field(1, self.group_id),
                _varint_field(2, self.version),
                encode_bytes_field(3, self.message_id),
                encode_bytes_field(4, self.ciphertext),
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> GroupMessage:
        values = _single(data, "group message", frozenset({1, 2, 3, 4}))
        message_id = _bytes(values.get(3, b""), "message_id")
        ciphertext = _bytes(values.get(4, b""), "ciphertext")
        if len(message_id) != 16:
            raise InvalidGroupMessage("message_id must be 16 bytes")
        if not _MIN_GROUP_CIPHERTEXT <= len(ciphertext) <= MAX_GROUP_CIPHERTEXT:
            raise InvalidGroupMessage("group ciphertext of a wrong size")
        return cls(_group_id(values.get(1)), _version(values.get(2)), message_id, ciphertext)


@dataclass(frozen=True, slots=True)
class GroupText:
    """What a group message's ciphertext holds."""

    group_id: bytes
    message_id: bytes
    text: str

    def encode(self) -> bytes:
        text = self.text.encode()
        if len(text) > MAX_TEXT_BYTES:
            raise InvalidGroupMessage(f"text of {len(text)} bytes is over {MAX_TEXT_BYTES}")
        return b"".join(
            (
                encode_bytes_field(1, self.group_id),
                encode_bytes_field(2, self.message_id),
                encode_bytes_field(3, text),
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> GroupText:
        values = _single(data, "group text", frozenset({1, 2, 3}))
        message_id = _bytes(values.get(2, b""), "message_id")
        text = _bytes(values.get(3, b""), "text")
        if len(message_id) != 16 or len(text) > MAX_TEXT_BYTES:
            raise InvalidGroupMessage("bad group text")
        try:
            return cls(_group_id(values.get(1)), message_id, text.decode())
        except UnicodeDecodeError:
            raise InvalidGroupMessage("group text is not UTF-8") from None


GroupBody = GroupState | KeyDistribution | GroupMessage | GroupJoin | GroupLeave


@dataclass(frozen=True, slots=True)
class GroupPayload:
    """One ``teia.group`` application payload."""

    body: GroupBody

    def encode(self) -> bytes:
        if isinstance(self.body, GroupState):
            return encode_bytes_field(1, self.body.encode())
        if isinstance(self.body, KeyDistribution):
            return encode_bytes_field(2, self.body.encode())
        if isinstance(self.body, GroupJoin):
            return encode_bytes_field(4, self.body.encode())
        if isinstance(self.body, GroupLeave):
            return encode_bytes_field(5, self.body.encode())
        return encode_bytes_field(3, self.body.encode())

    @classmethod
    def decode(cls, data: bytes) -> GroupPayload:
        if len(data) > MAX_APP_DATA:
            raise InvalidGroupMessage("group payload over the limit")
        fields = _fields(data, "group payload")
        if len(fields) != 1:
            raise InvalidGroupMessage("a group payload holds exactly one field")
        number, _, value = fields[0]
        raw = _bytes(value, "group payload")
        if number == 1:
            return cls(GroupState.decode(raw))
        if number == 2:
            return cls(KeyDistribution.decode(raw))
        if number == 3:
            return cls(GroupMessage.decode(raw))
        if number == 4:
            return cls(GroupJoin.decode(raw))
        if number == 5:
            return cls(GroupLeave.decode(raw))
        raise InvalidGroupMessage(f"unknown group payload field {number}")
