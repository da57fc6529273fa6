"""Talking ``/teia/store/1.0.0`` to one store node at a time: `StoreClient`.

A client rides on a `Host` (connected to the node, or able to dial it from its address
book). Each exchange takes an idle stream to that node from a small pool (or opens one), so
concurrent calls run on parallel streams. Refusals come back as typed errors
(`StoreAuthError`, `StoreQuotaExceeded`, `StoreRateLimited`, other `StoreRequestRefused`);
a malformed answer is `InvalidStoreMessage`; a broken stream is a `TransportError` or anyio's
stream errors. Owner operations are signed here with the caller's `Identity`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from teia.errors import (
    InvalidStoreMessage,
    StoreAuthError,
    StoreQuotaExceeded,
    StoreRateLimited,
    StoreRequestRefused,
)
from teia.host.host import Host
from teia.host.streams import NegotiatedStream
from teia.identity import Identity, PeerId
from teia.store.auth import inbox_for, sign_request
from teia.store.messages import (
    MAX_RESPONSE_SIZE,
    PROTOCOL,
    AckRequest,
    DeleteRequest,
    DepositRequest,
    Envelope,
    FetchRequest,
    GetBundleRequest,
    PutBundleRequest,
    Request,
    Response,
    Status,
    decode_response,
    encode_request,
)

__all__ = ["BundleAnswer", "FetchPage", "StoreClient", "raise_for_status", "wall_clock_ms"]

_MAX_IDLE_STREAMS = 8


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (what owner signatures are stamped with)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class FetchPage:
    envelopes: tuple[Envelope, ...]
    cursor: bytes
    more: bool


@dataclass(frozen=True, slots=True)
class BundleAnswer:
    bundle: bytes
    one_time_prekey: bytes
    """Empty when the node had none left."""
    remaining: int


_ERRORS: dict[Status, type[StoreRequestRefused]] = {
    Status.UNAUTHORIZED: StoreAuthError,
    Status.AUTH_EXPIRED: StoreAuthError,
    Status.REPLAYED: StoreAuthError,
    Status.INBOX_FULL: StoreQuotaExceeded,
    Status.STORE_FULL: StoreQuotaExceeded,
    Status.RATE_LIMITED: StoreRateLimited,
}


def raise_for_status(status: Status, error: str = "") -> None:
    """Raise the typed error for a refusal; return for OK and the stored deposit results."""
    if status.stored:
        return
    cls = _ERRORS.get(status, StoreRequestRefused)
    raise cls(f"store node refused ({status.name}): {error or status.name}", int(status))


class StoreClient:
    """A store protocol client on ``host``; ``timeout`` bounds each exchange."""

    def __init__(
        self,
        host: Host,
        *,
        timeout: float = 10.0,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.host = host
        self.timeout = timeout
        self.clock = clock
        self._idle: dict[PeerId, list[NegotiatedStream]] = {}
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------

    async def exchange(self, peer: PeerId, request: Request) -> Response:
        """Send one request and return the node's response, whatever its status."""
        return await self.exchange_raw(peer, encode_request(request))

    async def exchange_raw(self, peer: PeerId, data: bytes) -> Response:
        """Send ``data`` as one framed request (tests use it for malformed frames)."""
        with anyio.fail_after(self.timeout):
            stream = await self._stream(peer)
            try:
                await stream.send_message(data)
                raw = await stream.receive_message(MAX_RESPONSE_SIZE)
                response = decode_response(raw)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        if response.status in (Status.TOO_LARGE,):
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the node closes its side: framing was lost
        else:
            self._release(peer, stream)
        return response

    async def _stream(self, peer: PeerId) -> NegotiatedStream:
        idle = self._idle.get(peer)
        if idle:
            return idle.pop()
        await self.host.connect(peer)
        return await self.host.open_stream(peer, PROTOCOL)

    def _release(self, peer: PeerId, stream: NegotiatedStream) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) < _MAX_IDLE_STREAMS and not self._closed:
            idle.append(stream)
        else:
            stream.reset()

    async def aclose(self) -> None:
        """Close the pooled streams."""
        # Taken out of the pool first: other tasks return streams to it while we wait.
        self._closed = True
        idle = [stream for streams in self._idle.values() for stream in streams]
        self._idle.clear()
        for stream in idle:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def forget(self, peer: PeerId) -> None:
        """Drop pooled streams and close connections to ``peer`` after it failed, so the next
        call dials afresh (a node that died or restarted may leave a connection that looks
        open until the QUIC idle timeout)."""
        for stream in self._idle.pop(peer, []):
            stream.reset()
        for connection in self.host.connections.connections_to(peer):
            connection.close("store request failed")

    async def _checked(self, peer: PeerId, request: Request) -> Response:
        response = await self.exchange(peer, request)
        raise_for_status(response.status, response.error)
        return response

    # --- the operations ---------------------------------------------------------------------

    async def deposit(self, peer: PeerId, envelopes: Sequence[Envelope]) -> list[Status]:
        """Deposit envelopes (up to 256 per call); one result per envelope.

        A result for which ``status.stored`` holds is durable on the node (committed before
        the answer); others say why not (INBOX_FULL, STORE_FULL). A refusal of the whole
        request (rate limit, malformed) raises.
        """
        response = await self._checked(peer, DepositRequest(tuple(envelopes)))
        if len(response.results) != len(envelopes):
            raise InvalidStoreMessage("deposit answer has the wrong number of results")
        return list(response.results)

    async def fetch(
        self, peer: PeerId, owner: Identity, cursor: bytes = b"", limit: int = 0
    ) -> FetchPage:
        """One page of the owner's inbox after ``cursor`` (cursors are per node)."""
        request = FetchRequest(inbox_for(owner.public_key), cursor, limit)
        response = await self._checked(peer, sign_request(owner, request, self.clock()))
        return FetchPage(response.envelopes, response.cursor or cursor, response.more)

    async def fetch_all(
        self, peer: PeerId, owner: Identity, *, max_pages: int = 1000
    ) -> list[Envelope]:
        """Every envelope the node holds for the owner (bounded by ``max_pages`` pages)."""
        out: list[Envelope] = []
        cursor = b""
        for _ in range(max_pages):
            page = await self.fetch(peer, owner, cursor)
            out.extend(page.envelopes)
            cursor = page.cursor
            if not page.more:
                break
        return out

    async def ack(self, peer: PeerId, owner: Identity, message_ids: Sequence[bytes]) -> None:
        """The owner received these: the node deletes them and keeps tombstones."""
        inbox = inbox_for(owner.public_key)
        for start in range(0, len(message_ids), 1024):
            request = AckRequest(inbox, tuple(message_ids[start : start + 1024]))
            await self._checked(peer, sign_request(owner, request, self.clock()))

    async def delete(self, peer: PeerId, owner: Identity, message_ids: Sequence[bytes]) -> None:
        """The owner discards these unread (counted as deleted, not delivered)."""
        inbox = inbox_for(owner.public_key)
        for start in range(0, len(message_ids), 1024):
            request = DeleteRequest(inbox, tuple(message_ids[start : start + 1024]))
            await self._checked(peer, sign_request(owner, request, self.clock()))

    async def put_bundle(
        self,
        peer: PeerId,
        owner: Identity,
        bundle: bytes,
        one_time_prekeys: Sequence[bytes] = (),
        *,
        replace: bool = False,
    ) -> int:
        """Upload the owner's prekey bundle (without a one-time prekey) and one-time prekeys
        (opaque to the node; at most 100 per call). Returns how many the node now holds."""
        request = PutBundleRequest(
            inbox_for(owner.public_key), bundle, tuple(one_time_prekeys), replace
        )
        response = await self._checked(peer, sign_request(owner, request, self.clock()))
        return response.remaining

    async def get_bundle(self, peer: PeerId, inbox: bytes) -> BundleAnswer | None:
        """Someone's bundle and one of its one-time prekeys (each handed out once by a node);
        None when the node holds no bundle for that inbox."""
        response = await self.exchange(peer, GetBundleRequest(inbox))
        if response.status == Status.NOT_FOUND:
            return None
        raise_for_status(response.status, response.error)
        return BundleAnswer(response.bundle, response.one_time_prekey, response.remaining)
