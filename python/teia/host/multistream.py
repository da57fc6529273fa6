"""multistream-select 1.0 as sans-IO state machines: bytes in, an agreed protocol (or an error) out.

Wire rules (libp2p/specs `connections/README.md`): every message is a UTF-8 line ending in
``\\n``, prefixed by its length (newline included) as an unsigned varint. Both sides first send
``/multistream/1.0.0``; the dialer then proposes protocol IDs one at a time, and the listener
echoes the one it accepts or answers ``na``.

Rules these machines enforce:

- the first message from either side must be the multistream header, or negotiation aborts;
- a message is at most `MAX_MESSAGE_SIZE` bytes and must be one non-empty line of UTF-8;
- a listener answers at most ``max_proposals`` proposals, then aborts (a dialer cannot keep a
  stream busy forever); ``ls`` is answered with ``na`` (listing is optional in the spec);
- the dialer sends its header and first proposal at once (one round trip when the first
  proposal is accepted) and accepts only the echo of its current proposal or ``na``;
- bytes that arrive after agreement belong to the application: they are handed back in
  `ProtocolAgreed.unconsumed`, never interpreted.

Neither machine does I/O or reads a clock; the caller feeds `receive_data` and sends
`data_to_send`. Failures raise `ProtocolNegotiationError` / `ProtocolNotSupported`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from teia.errors import ProtocolNegotiationError, ProtocolNotSupported
from teia.identity import varint

__all__ = [
    "MAX_MESSAGE_SIZE",
    "MULTISTREAM_PROTOCOL",
    "MultistreamDialer",
    "MultistreamListener",
    "ProtocolAgreed",
    "encode_message",
]

MULTISTREAM_PROTOCOL = "/multistream/1.0.0"
NOT_AVAILABLE = "na"
LIST = "ls"
# go-multistream and rust-libp2p use the same bound; a protocol ID is far shorter.
MAX_MESSAGE_SIZE = 1024
DEFAULT_MAX_PROPOSALS = 16


@dataclass(frozen=True, slots=True)
class ProtocolAgreed:
    """Negotiation finished: both sides now speak ``protocol``."""

    protocol: str
    unconsumed: bytes
    """Bytes received after the last negotiation message; the application's first data."""


def encode_message(text: str) -> bytes:
    """Frame one multistream message: varint length, UTF-8 text, newline."""
    body = text.encode() + b"\n"
    if "\n" in text or not text or len(body) > MAX_MESSAGE_SIZE:
        raise ProtocolNegotiationError(
            f"a multistream message must be one non-empty line of at most "
            f"{MAX_MESSAGE_SIZE - 1} bytes"
        )
    return _encode_length(len(body)) + body


def _encode_length(length: int) -> bytes:
    return varint.encode(length)


class _MessageReader:
    """Splits incoming bytes into multistream messages; keeps the rest for the application."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def next_message(self) -> str | None:
        buffer = self._buffer
        if not buffer:
            return None
        first = buffer[0]
        if first < 0x80:
            length, header = first, 1
        else:
            if len(buffer) < 2:
                return None
            second = buffer[1]
            if second & 0x80:
                raise ProtocolNegotiationError(
                    f"multistream message over the {MAX_MESSAGE_SIZE}-byte limit"
                )
            if second == 0:
                raise ProtocolNegotiationError("multistream length is not a minimal varint")
            length, header = (first & 0x7F) | (second << 7), 2
        if length > MAX_MESSAGE_SIZE:
            raise ProtocolNegotiationError(
                f"multistream message of {length} bytes is over the {MAX_MESSAGE_SIZE}-byte limit"
            )
        if length < 2:
            raise ProtocolNegotiationError("empty multistream message")
        if len(buffer) < header + length:
            return None
        body = bytes(buffer[header : header + length])
        del buffer[: header + length]
        if body[-1:] != b"\n" or b"\n" in body[:-1]:
            raise ProtocolNegotiationError("multistream message is not exactly one line")
        try:
            return body[:-1].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolNegotiationError("multistream message is not UTF-8") from exc


class _Negotiation:
    """What both sides share: the bytes to send, the multistream header to see first, then one
    message at a time for the side's own rule (`_on_message`) until it settles."""

    def __init__(self, first: bytes) -> None:
        self._reader = _MessageReader()
        self._outgoing = bytearray(first)
        self._header_seen = False
        self._done = False

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> ProtocolAgreed | None:
        """Feed bytes from the other side; return the agreement once it is reached."""
        if self._done:
            raise ProtocolNegotiationError("negotiation already finished")
        self._reader.feed(data)
        while (message := self._reader.next_message()) is not None:
            if not self._header_seen:
                if message != MULTISTREAM_PROTOCOL:
                    raise ProtocolNegotiationError(
                        f"peer does not speak {MULTISTREAM_PROTOCOL} (got {message[:64]!r})"
                    )
                self._header_seen = True
                continue
            agreed = self._on_message(message)
            if agreed is not None:
                self._done = True
                return ProtocolAgreed(agreed, self._reader.take_rest())
        return None

    def _on_message(self, message: str) -> str | None:
        """One message after the header: the protocol agreed on, or None to go on."""
        raise NotImplementedError


class MultistreamDialer(_Negotiation):
    """The initiator's side: proposes ``protocols`` in order until one is accepted."""

    def __init__(self, protocols: Sequence[str]) -> None:
        if not protocols:
            raise ValueError("propose at least one protocol")
        self._proposals = list(protocols)
        for protocol in self._proposals:
            encode_message(protocol)  # validate early, with the typed error
        self._index = 0
        super().__init__(encode_message(MULTISTREAM_PROTOCOL) + encode_message(self._proposals[0]))

    def _on_message(self, message: str) -> str | None:
        current = self._proposals[self._index]
        if message == current:
            return current
        if message != NOT_AVAILABLE:
            raise ProtocolNegotiationError(
                f"expected {current!r} or 'na' from the listener, got {message[:64]!r}"
            )
        self._index += 1
        if self._index == len(self._proposals):
            self._done = True
            raise ProtocolNotSupported(f"peer supports none of {', '.join(self._proposals)}")
        self._outgoing += encode_message(self._proposals[self._index])
        return None


class MultistreamListener(_Negotiation):
    """The responder's side: accepts the first proposal ``supports`` says yes to."""

    def __init__(
        self,
        supports: Callable[[str], bool],
        *,
        max_proposals: int = DEFAULT_MAX_PROPOSALS,
    ) -> None:
        self._supports = supports
        self._max_proposals = max_proposals
        self._proposals_seen = 0
        # Sent eagerly: both sides may send the header without waiting for the other's.
        super().__init__(encode_message(MULTISTREAM_PROTOCOL))

    def _on_message(self, message: str) -> str | None:
        self._proposals_seen += 1
        if self._proposals_seen > self._max_proposals:
            self._done = True
            raise ProtocolNegotiationError(f"peer made more than {self._max_proposals} proposals")
        if message not in (LIST, NOT_AVAILABLE, MULTISTREAM_PROTOCOL) and self._supports(message):
            self._outgoing += encode_message(message)
            return message
        self._outgoing += encode_message(NOT_AVAILABLE)
        return None
