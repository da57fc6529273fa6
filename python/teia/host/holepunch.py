"""Hole punching: a relayed connection is upgraded to a direct one (``/teia/holepunch/1.0.0``).

Two peers behind NATs reach each other first through a TURN relay (`teia.transport.quic`).
Over that relayed connection they swap the public addresses they know for themselves, agree
on a moment, and then both dial each other's public address at once, each from its one UDP
socket: each side's first packets open its own NAT's mapping towards the other, so the other
side's packets get in. With endpoint-independent ("cone") NATs a direct QUIC connection comes
up and the host moves to it (`teia.host.host.Host` prefers a direct connection over a relayed
one and drains the relayed one). Behind a symmetric NAT, where each destination sees another
port, the attempt ends within ``punch_timeout`` and the relayed connection simply stays; the
attempt is repeated later with backoff, so a direct path that appears later is taken up.

The exchange follows the shape of libp2p's DCUtR (Connect, Connect, Sync), on our own protocol
ID and message format. The side that *accepted* the relayed connection drives it:

1. it opens a stream and sends ``CONNECT`` with its candidate addresses, starting a clock;
2. the other side answers ``CONNECT`` with its own; the driver now knows the round trip;
3. the driver sends ``SYNC`` and waits half a round trip; the other side dials as soon as
   ``SYNC`` arrives, the driver when its wait ends: both sides' first packets cross the
   relay-free path at about the same time.

Candidates are what we learned about our public address: the mapped address of each TURN
allocation (STUN's XOR-MAPPED-ADDRESS) and the addresses peers reported through identify. When
those show one IP with different ports, our NAT maps per destination (symmetric): no port we
could name would be right, so we offer none (and still dial the other side's).

Message (varint-length-prefixed on the stream, at most `MAX_MESSAGE_SIZE` bytes)::

    HolePunch { 1: kind (varint: 1 CONNECT, 2 SYNC)
                2: addr (bytes, repeated: binary multiaddr /ip4|ip6/<ip>/udp/<port>/quic-v1) }

At most `MAX_CANDIDATES` addresses, SYNC carries none, unknown fields are skipped; anything
else raises `InvalidHolePunchMessage`.

What a stranger can make us do is bounded: we take part only over a relayed connection that is
still the one in use (no direct one yet), to a peer ``accept`` allows; at most one attempt per
peer at a time, at least ``min_interval`` apart, at most ``max_concurrent`` at once; we dial
at most `MAX_CANDIDATES` addresses, only public ones (or in ``allow_networks``, as the relay's
``--allow-peer``), never a relay's own address, and each dial must prove the expected peer ID.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import anyio

from teia.errors import (
    HolePunchError,
    InvalidHolePunchMessage,
    InvalidMultiaddr,
    InvalidProtobuf,
    MessageTooLarge,
    TransportError,
)
from teia.host.protobuf import encode_bytes_field, encode_uvarint, iter_fields
from teia.identity import Multiaddr, PeerId
from teia.relay.policy import RelayPolicy, parse_networks

if TYPE_CHECKING:
    from teia.host.host import Host
    from teia.host.streams import NegotiatedStream
    from teia.transport.quic import QuicConnectionHandle

__all__ = [
    "HOLEPUNCH_PROTOCOL",
    "MAX_CANDIDATES",
    "MAX_MESSAGE_SIZE",
    "HolePunchConfig",
    "HolePunchMessage",
    "HolePuncher",
    "MessageKind",
    "PunchResult",
]

_log = logging.getLogger(__name__)

HOLEPUNCH_PROTOCOL: Final = "/teia/holepunch/1.0.0"
MAX_CANDIDATES: Final = 8
"""Most candidate addresses one message may carry (and that we dial for one attempt)."""
MAX_MESSAGE_SIZE: Final = 1024
_MAX_RETRY_DELAY: Final = 600.0
_STREAM_ERRORS = (TransportError, anyio.EndOfStream, anyio.BrokenResourceError)

Address = tuple[str, int]


class MessageKind(enum.IntEnum):
    CONNECT = 1
    SYNC = 2


@dataclass(frozen=True)
class HolePunchMessage:
    """One signalling message: ``CONNECT`` with candidate addresses, or ``SYNC``."""

    kind: MessageKind
    addrs: tuple[Multiaddr, ...] = ()

    def encode(self) -> bytes:
        """The wire form; `InvalidHolePunchMessage` if it breaks the rules a reader checks."""
        if len(self.addrs) > MAX_CANDIDATES:
            raise InvalidHolePunchMessage(f"at most {MAX_CANDIDATES} candidate addresses")
        if self.kind is MessageKind.SYNC and self.addrs:
            raise InvalidHolePunchMessage("SYNC carries no addresses")
        for addr in self.addrs:
            _check_candidate(addr)
        data = encode_uvarint(1 << 3) + encode_uvarint(int(self.kind))
        data += b"".join(encode_bytes_field(2, addr.to_bytes()) for addr in self.addrs)
        if len(data) > MAX_MESSAGE_SIZE:
            raise InvalidHolePunchMessage("message over the size limit")
        return data

    @classmethod
    def decode(cls, data: bytes) -> HolePunchMessage:
        """Parse one message, strictly; raises `InvalidHolePunchMessage`."""
        if len(data) > MAX_MESSAGE_SIZE:
            raise InvalidHolePunchMessage(
                f"message of {len(data)} bytes is over the {MAX_MESSAGE_SIZE}-byte limit"
            )
        kind: MessageKind | None = None
        addrs: list[Multiaddr] = []
        try:
            for number, wire_type, value in iter_fields(data):
                if number == 1:
                    if wire_type != 0 or not isinstance(value, int):
                        raise InvalidHolePunchMessage("kind must be a varint")
                    if kind is not None:
                        raise InvalidHolePunchMessage("kind given twice")
                    try:
                        kind = MessageKind(value)
                    except ValueError:
                        raise InvalidHolePunchMessage(f"unknown message kind {value}") from None
                elif number == 2:
                    if wire_type != 2 or not isinstance(value, bytes):
                        raise InvalidHolePunchMessage("addr must be bytes")
                    if len(addrs) == MAX_CANDIDATES:
                        raise InvalidHolePunchMessage(
                            f"more than {MAX_CANDIDATES} candidate addresses"
                        )
                    try:
                        addr = Multiaddr.from_bytes(value)
                    except InvalidMultiaddr as exc:
                        raise InvalidHolePunchMessage(f"bad candidate address: {exc}") from None
                    _check_candidate(addr)
                    addrs.append(addr)
        except InvalidProtobuf as exc:
            raise InvalidHolePunchMessage(f"malformed message: {exc}") from None
        if kind is None:
            raise InvalidHolePunchMessage("message without a kind")
        if kind is MessageKind.SYNC and addrs:
            raise InvalidHolePunchMessage("SYNC carries no addresses")
        return cls(kind, tuple(addrs))


def _check_candidate(addr: Multiaddr) -> None:
    if not addr.is_quic_v1 or addr.peer_id is not None or addr.protocols[0] not in ("ip4", "ip6"):
        raise InvalidHolePunchMessage(
            f"candidate {addr} is not /ip4|ip6/<ip>/udp/<port>/quic-v1 (no names, no /p2p)"
        )
    if addr.to_udp_address()[1] == 0:
        raise InvalidHolePunchMessage(f"candidate {addr} has port 0")


@dataclass(frozen=True)
class HolePunchConfig:
    """When and how a host punches holes; see the module docstring for the rules."""

    allow_networks: tuple[str, ...] = ()
    """CIDRs dialed even though they are not public (e.g. a lab's 198.18.0.0/15), as the
    relay's ``--allow-peer``; public addresses always are."""
    punch_timeout: float = 5.0
    """Seconds one attempt may take, signalling included, before it counts as failed."""
    retry_interval: float = 10.0
    """Seconds before the first retry after a failure; each further retry waits twice as long."""
    max_attempts: int = 4
    """Attempts per relayed connection (the first one included)."""
    min_interval: float = 1.0
    """Least seconds between two attempts for one peer that the other side asks for."""
    max_concurrent: int = 4
    """Attempts running at once, both roles together; more are refused."""
    accept: Callable[[PeerId], bool] | None = field(default=None, compare=False)
    """Which peers we punch with (default: any peer with a relayed connection to us)."""

    def __post_init__(self) -> None:
        parse_networks(self.allow_networks)
        if min(self.punch_timeout, self.retry_interval) <= 0 or self.min_interval < 0:
            raise ValueError("punch_timeout and retry_interval must be positive")
        if self.max_attempts < 1 or self.max_concurrent < 1:
            raise ValueError("max_attempts and max_concurrent must be at least 1")


@dataclass(frozen=True)
class PunchResult:
    """How one attempt ended (kept in `HolePuncher.results`, for tests and benchmarks)."""

    peer: PeerId
    initiator: bool
    success: bool
    seconds: float
    """From the first message to a direct connection (or to giving up)."""
    rtt: float | None
    reason: str


class HolePuncher:
    """Upgrades relayed connections of one `Host` to direct ones; made by the host when it is
    given a `HolePunchConfig` (``Host(..., holepunch=HolePunchConfig(...))``)."""

    def __init__(self, host: Host, config: HolePunchConfig) -> None:
        self._host = host
        self.config = config
        self._policy = RelayPolicy(allow_peers=parse_networks(config.allow_networks))
        self._busy: set[PeerId] = set()
        self._last_attempt: dict[PeerId, float] = {}
        self._maintaining: set[PeerId] = set()
        self._direct: dict[PeerId, anyio.Event] = {}
        self.results: list[PunchResult] = []
        """Every attempt's outcome, oldest first (the last 256)."""
        self.stats: dict[str, int] = {"attempts": 0, "successes": 0, "failures": 0, "refused": 0}
        self._changed = anyio.Event()

    # --- public ---------------------------------------------------------------------------

    def candidates(self) -> list[Multiaddr]:
        """The addresses we offer: our public address as relays and peers see it. Empty when
        those disagree on the port for one IP (our NAT maps per destination)."""
        seen: dict[Multiaddr, None] = {}
        for endpoint in self._host._endpoints:
            for host, port in endpoint.mapped_addresses:
                seen[Multiaddr.from_udp(host, port)] = None
        for addr in self._host.observed_addrs():
            seen[addr] = None
        usable = [addr for addr in seen if self._dialable(addr) is not None]
        ports: dict[str, set[int]] = {}
        for addr in usable:
            host, port = addr.to_udp_address()
            ports.setdefault(host, set()).add(port)
        if any(len(p) > 1 for p in ports.values()):
            return []
        return usable[:MAX_CANDIDATES]

    async def upgrade(self, peer: PeerId) -> QuicConnectionHandle:
        """Punch a direct connection to ``peer`` over our relayed connection to it.

        Returns the direct connection (at once if there is one already). Raises
        `HolePunchError` if there is no relayed connection, an attempt is already running,
        or this one did not give a direct connection within ``punch_timeout``.
        """
        direct = self._direct_connection(peer)
        if direct is not None:
            return direct
        relayed = self._host.connection_to(peer)
        if relayed is None or not relayed.is_relayed:
            raise HolePunchError(f"no relayed connection to {peer} to upgrade")
        self._claim(peer)
        started = anyio.current_time()
        rtt: float | None = None
        reason = "no direct connection in time"
        try:
            with anyio.move_on_after(self.config.punch_timeout):
                stream = await self._host.open_stream(peer, HOLEPUNCH_PROTOCOL)
                offered = tuple(self.candidates())
                try:
                    sent = anyio.current_time()
                    await stream.send_message(
                        HolePunchMessage(MessageKind.CONNECT, offered).encode()
                    )
                    answer = await _receive(stream, MessageKind.CONNECT)
                    rtt = anyio.current_time() - sent
                    await stream.send_message(HolePunchMessage(MessageKind.SYNC).encode())
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                targets = self._targets(answer.addrs)
                if not targets and not offered:
                    reason = "no usable candidate on either side"
                else:
                    await anyio.sleep(rtt / 2)  # the other side dials on SYNC, half a trip later
                    if await self._punch(peer, targets):
                        reason = "direct"
        except (*_STREAM_ERRORS, InvalidHolePunchMessage) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._release(peer)
        direct = self._record(peer, True, started, rtt, reason)
        if direct is None:
            raise HolePunchError(f"hole punch to {peer} failed: {reason}")
        return direct

    async def wait_attempts(self, count: int) -> list[PunchResult]:
        """Wait until at least ``count`` attempts have ended; bound with ``anyio.fail_after``."""
        while len(self.results) < count:
            await self._changed.wait()
        return list(self.results)

    # --- hooks from the host ----------------------------------------------------------------

    def connection_started(self, connection: QuicConnectionHandle) -> None:
        """A connection was admitted: wake attempts waiting for a direct one, and keep trying
        to upgrade relayed connections we accepted."""
        peer = connection.remote_peer.peer_id
        if not connection.is_relayed:
            waiter = self._direct.pop(peer, None)
            if waiter is not None:
                waiter.set()
            return
        if connection.is_initiator or peer in self._maintaining or not self._wanted(peer):
            return
        self._maintaining.add(peer)
        self._host._spawn(self._maintain, peer, connection)

    async def serve(self, stream: NegotiatedStream) -> None:
        """The other side of `upgrade` (the host's handler for `HOLEPUNCH_PROTOCOL`)."""
        peer = stream.remote_peer_id
        if peer is None:
            return
        connection = self._host.connection_to(peer)
        if connection is None or not connection.is_relayed or not self._wanted(peer):
            self.stats["refused"] += 1
            return
        now = anyio.current_time()
        last = self._last_attempt.get(peer)
        if last is not None and now - last < self.config.min_interval:
            self.stats["refused"] += 1
            return
        try:
            self._claim(peer)
        except HolePunchError:
            self.stats["refused"] += 1
            return
        reason = "no direct connection in time"
        try:
            with anyio.move_on_after(self.config.punch_timeout):
                offer = await _receive(stream, MessageKind.CONNECT)
                offered = tuple(self.candidates())
                await stream.send_message(HolePunchMessage(MessageKind.CONNECT, offered).encode())
                await _receive(stream, MessageKind.SYNC)
                targets = self._targets(offer.addrs)
                if not targets and not offered:
                    reason = "no usable candidate on either side"
                elif await self._punch(peer, targets):
                    reason = "direct"
        except (*_STREAM_ERRORS, InvalidHolePunchMessage) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._release(peer)
        self._record(peer, False, now, None, reason)

    # --- internals ------------------------------------------------------------------------

    def _wanted(self, peer: PeerId) -> bool:
        accept = self.config.accept
        return accept is None or accept(peer)

    def _claim(self, peer: PeerId) -> None:
        if peer in self._busy:
            raise HolePunchError(f"a hole punch with {peer} is already running")
        if len(self._busy) >= self.config.max_concurrent:
            raise HolePunchError("too many hole punches running")
        self._busy.add(peer)
        self._last_attempt[peer] = anyio.current_time()
        self.stats["attempts"] += 1

    def _release(self, peer: PeerId) -> None:
        self._busy.discard(peer)
        self._direct.pop(peer, None)

    def _record(
        self, peer: PeerId, initiator: bool, started: float, rtt: float | None, reason: str
    ) -> QuicConnectionHandle | None:
        direct = self._direct_connection(peer)
        success = direct is not None
        self.stats["successes" if success else "failures"] += 1
        seconds = anyio.current_time() - started
        self.results.append(
            PunchResult(peer, initiator, success, seconds, rtt, "direct" if success else reason)
        )
        del self.results[:-256]
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        _log.info(
            "hole punch with %s (%s): %s after %.3f s",
            peer,
            "initiator" if initiator else "responder",
            "direct" if success else f"failed ({reason})",
            seconds,
        )
        return direct

    def _direct_connection(self, peer: PeerId) -> QuicConnectionHandle | None:
        connection = self._host.connection_to(peer)
        if connection is None or connection.is_relayed:
            return None
        return connection

    def _dialable(self, addr: Multiaddr) -> Address | None:
        """``addr`` as an IP and port we may punch towards, or None."""
        try:
            _check_candidate(addr)
        except InvalidHolePunchMessage:
            return None
        host, port = addr.to_udp_address()
        if host in self._host._relay_permissions or not self._policy.peer_allowed(host):
            return None
        return host, port

    def _targets(self, addrs: tuple[Multiaddr, ...]) -> list[Address]:
        versions = {
            ipaddress.ip_address(endpoint.local_address[0]).version
            for endpoint in self._host._endpoints
        }
        targets: dict[Address, None] = {}
        for addr in addrs:
            address = self._dialable(addr)
            if address is not None and ipaddress.ip_address(address[0]).version in versions:
                targets[address] = None
        return list(targets)[:MAX_CANDIDATES]

    async def _punch(self, peer: PeerId, targets: list[Address]) -> bool:
        """Dial every target at once and wait for a direct connection to ``peer``, ours or
        the one the other side dials at the same time; False if none comes (the caller's
        cancel scope bounds the wait)."""
        if self._direct_connection(peer) is not None:
            return True
        arrived = self._direct.setdefault(peer, anyio.Event())

        async def dial(address: Address) -> None:
            try:
                await self._host._dial(Multiaddr.from_udp(*address), peer, via_relay=False)
            except (TransportError, OSError, TimeoutError) as exc:
                _log.debug("punch dial to %s:%s failed: %s", *address, exc)

        async with anyio.create_task_group() as tg:
            for address in targets:
                tg.start_soon(dial, address)
            await arrived.wait()
            tg.cancel_scope.cancel()
        return self._direct_connection(peer) is not None

    async def _maintain(self, peer: PeerId, relayed: QuicConnectionHandle) -> None:
        """Try to upgrade a relayed connection we accepted, with backoff, while it lasts."""
        delay = self.config.retry_interval
        try:
            for _ in range(self.config.max_attempts):
                if relayed.is_closed or self._direct_connection(peer) is not None:
                    return
                try:
                    await self.upgrade(peer)
                    return
                except HolePunchError as exc:
                    _log.debug("upgrade of %s deferred: %s", peer, exc)
                with anyio.move_on_after(delay):
                    await relayed.wait_closed()
                delay = min(delay * 2, _MAX_RETRY_DELAY)
        finally:
            self._maintaining.discard(peer)


async def _receive(stream: NegotiatedStream, kind: MessageKind) -> HolePunchMessage:
    try:
        raw = await stream.receive_message(MAX_MESSAGE_SIZE)
    except MessageTooLarge as exc:
        raise InvalidHolePunchMessage(str(exc)) from None
    except anyio.IncompleteRead:
        raise InvalidHolePunchMessage("stream ended inside a message") from None
    message = HolePunchMessage.decode(raw)
    if message.kind is not kind:
        raise InvalidHolePunchMessage(f"expected {kind.name}, got {message.kind.name}")
    return message
