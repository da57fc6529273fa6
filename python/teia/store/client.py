"""Talking ``/teia/store/1.0.0`` to one store node at a time: `StoreClient`.

A client rides on a `Host` (connected to the node, or able to dial it from its address
book). Each exchange takes an idle stream to that node from a small pool (or opens one), so
concurrent calls run on parallel streams. Deposits are coalesced: at most
``max_deposits_in_flight`` deposit requests go to one node at a time, and the deposits that
wait meanwhile leave together in the next request (up to 256 envelopes and 1 MiB of payload),
each caller still getting its own results; many callers depositing one envelope each cost a
few large requests rather than one request apiece. Refusals come back as typed errors
(`StoreAuthError`, `StoreQuotaExceeded`, `StoreRateLimited`, other `StoreRequestRefused`);
a malformed answer is `InvalidStoreMessage`; a broken stream is a `TransportError` or anyio's
stream errors. Owner operations are signed here with the caller's `Identity`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    INBOX_SIZE,
    MAX_DEPOSIT_ENVELOPES,
    MAX_PAYLOAD,
    MAX_RESPONSE_SIZE,
    MESSAGE_ID_SIZE,
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
_COALESCED_BYTES = 1024 * 1024
"""Payload bytes one coalesced deposit request carries at most (requests stay under the
node's 1.25 MiB limit; a single deposit larger than this goes alone)."""
_ENVELOPE_OVERHEAD = 96
"""Bytes an envelope's fields and framing add to its payload, at most."""


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


@dataclass(slots=True)
class _Deposit:
    """One caller's deposit, waiting to leave in a request."""

    envelopes: tuple[Envelope, ...]
    size: int
    taken: bool = False
    """In a request on its way (sent by whichever caller took it)."""
    done: anyio.Event = field(default_factory=anyio.Event)
    results: list[Status] = field(default_factory=list)
    error: Exception | None = None


@dataclass(slots=True)
class _NodeDeposits:
    """The deposits waiting for one node, and its requests in flight."""

    waiting: deque[_Deposit] = field(default_factory=deque)
    in_flight: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)
    """Set (and replaced) whenever a request ends: waiters look again."""


def _coalescible(envelopes: Sequence[Envelope]) -> bool:
    """Whether these can share a request with others: well-formed, so that the node cannot
    refuse the whole request because of them."""
    return 1 <= len(envelopes) <= MAX_DEPOSIT_ENVELOPES and all(
        len(e.inbox) == INBOX_SIZE
        and len(e.message_id) == MESSAGE_ID_SIZE
        and len(e.payload) <= MAX_PAYLOAD
        and 0 <= e.ttl_s < 2**32
        and 0 <= e.timestamp_ms < 2**63
        and 0 <= e.expires_at_ms < 2**63
        for e in envelopes
    )


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
        max_deposits_in_flight: int = 4,
    ) -> None:
        if max_deposits_in_flight < 1:
            raise ValueError("max_deposits_in_flight must be at least 1")
        self.host = host
        self.timeout = timeout
        self.clock = clock
        self.max_deposits_in_flight = max_deposits_in_flight
        self._idle: dict[PeerId, list[NegotiatedStream]] = {}
        self._deposits: dict[PeerId, _NodeDeposits] = {}
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
        if not _coalescible(envelopes):
            return await self._deposit_now(peer, tuple(envelopes))
        size = sum(len(e.payload) + _ENVELOPE_OVERHEAD for e in envelopes)
        job = _Deposit(tuple(envelopes), size)
        node = self._deposits.setdefault(peer, _NodeDeposits())
        node.waiting.append(job)
        try:
            while not job.done.is_set():
                if not job.taken and node.in_flight < self.max_deposits_in_flight:
                    await self._send_waiting(peer, node)
                else:
                    await node.changed.wait()
        finally:
            if not job.done.is_set() and job in node.waiting:
                node.waiting.remove(job)  # the caller gave up before its deposit left
            if not node.waiting and not node.in_flight:
                self._deposits.pop(peer, None)
        if job.error is not None:
            raise job.error
        return job.results

    async def _deposit_now(self, peer: PeerId, envelopes: tuple[Envelope, ...]) -> list[Status]:
        response = await self._checked(peer, DepositRequest(envelopes))
        if len(response.results) != len(envelopes):
            raise InvalidStoreMessage("deposit answer has the wrong number of results")
        return list(response.results)

    async def _send_waiting(self, peer: PeerId, node: _NodeDeposits) -> None:
        """Send the deposits at the head of the queue as one request; hand out the results."""
        batch: list[_Deposit] = []
        node.in_flight += 1
        try:
            count = size = 0
            while node.waiting:
                head = node.waiting[0]
                if batch and (
                    count + len(head.envelopes) > MAX_DEPOSIT_ENVELOPES
                    or size + head.size > _COALESCED_BYTES
                ):
                    break
                batch.append(node.waiting.popleft())
                head.taken = True
                count += len(head.envelopes)
                size += head.size
            if not batch:
                return
            try:
                results = await self._deposit_now(
                    peer, tuple(e for job in batch for e in job.envelopes)
                )
            except Exception as exc:  # each caller gets the refusal or failure
                for job in batch:
                    job.error = exc
                    job.done.set()
            else:
                offset = 0
                for job in batch:
                    job.results = results[offset : offset + len(job.envelopes)]
                    offset += len(job.envelopes)
                    job.done.set()
        finally:
            node.in_flight -= 1
            # Cancelled on the way: the others' deposits go back to the head of the queue
            # (deposits are idempotent by message ID, so sending them again is safe).
            unsent = [job for job in batch if not job.done.is_set()]
            for job in unsent:
                job.taken = False
            node.waiting.extendleft(reversed(unsent))
            node.changed.set()
            node.changed = anyio.Event()

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
