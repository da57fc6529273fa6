"""The host: QUIC endpoints, connections under a connection manager, protocol handlers by name.

``async with Host(identity, listen=["/ip4/127.0.0.1/udp/0/quic-v1"]) as host`` opens one
`QuicEndpoint` per listen address (each serves dialing and listening on one UDP socket). Every
stream, in either direction, starts with multistream-select; inbound streams go to the handler
registered for the agreed protocol (`set_handler`), outbound ones come from `open_stream`.
``/ipfs/ping/1.0.0`` and ``/ipfs/id/1.0.0`` are served by default, and every newly connected
peer is identified (`peer_info`, `wait_identified`); what it announces lands in the address
book (`peerstore`), and the address it saw us at is remembered (`observed_addrs`: by how many
distinct peers reported it in the last `OBSERVED_TTL` seconds).

One connection per peer: concurrent dials to a peer share one attempt, and when both sides
dial each other at once, both keep the connection initiated by the peer with the smaller
peer ID; the other stops taking new streams and closes after a grace period.

Handlers run in the host's task group, one task per stream; the stream is closed when the
handler returns, and a failing handler is logged without touching the connection. Leaving the
block cancels every handler and closes every connection.

Peers through a relay: ``Host(identity, relays=[RelayClientConfig(address=…, …)])`` keeps a TURN
allocation on each relay, on the listen socket of the same IP version (see
`teia.transport.quic`); `relayed_addrs` are the allocations' addresses with ``/p2p/<our id>``
(also part of `addrs`), kept fresh in the background and re-made when a relay restarts or an
allocation is lost. `on_relayed_addrs_change` callbacks run (and `wait_relayed_addrs` wakes)
whenever they change, so the peer layer can publish its record anew. Dialing an address on a
configured relay's IP goes through our own allocation; each allocation holds permissions for
every configured relay's IP, which is what lets peers on those relays reach us.

Hole punching: with ``holepunch=HolePunchConfig(...)`` the host serves
``/teia/holepunch/1.0.0`` and tries to upgrade every relayed connection it accepts to a direct
one (`teia.host.holepunch`). A direct connection to a peer is always preferred over a relayed
one: when both exist, the relayed one is drained like any duplicate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from teia.errors import (
    ConfigError,
    ConnectionClosed,
    ConnectionLimitExceeded,
    InvalidMultiaddr,
    InvalidPeerId,
    NotConnected,
    PeerIdMismatch,
    ProtocolNegotiationError,
    TransportError,
)
from teia.host.connmgr import ConnectionLimits, ConnectionManager, Direction
from teia.host.holepunch import HOLEPUNCH_PROTOCOL, HolePunchConfig, HolePuncher
from teia.host.identify import (
    AGENT_VERSION,
    IDENTIFY_PROTOCOL,
    PROTOCOL_VERSION,
    IdentifyInfo,
    request_identify,
    serve_identify,
)
from teia.host.peerstore import ANNOUNCED_TTL, CONNECTED_TTL, AddressBook
from teia.host.ping import PING_PROTOCOL, ping, serve_ping
from teia.host.streams import NegotiatedStream, accept_protocol, select_protocol
from teia.identity import Identity, Multiaddr, PeerId
from teia.relay.client import RelayClientConfig
from teia.transport.quic import QuicConnectionHandle, QuicEndpoint, QuicStream

__all__ = ["DEFAULT_LISTEN", "Host", "StreamHandler"]

_log = logging.getLogger(__name__)

StreamHandler = Callable[[NegotiatedStream], Awaitable[None]]
"""Serves one inbound stream; ``stream.remote_peer_id`` says who opened it."""

Address = tuple[str, int]

DEFAULT_LISTEN = ("/ip4/127.0.0.1/udp/0/quic-v1",)

# Identify results kept for peers, oldest dropped first.
_MAX_PEER_INFO = 4096
# Distinct observed addresses remembered (a stranger chooses what it reports), and the peers
# remembered as having reported each.
_MAX_OBSERVED = 32
_MAX_REPORTERS = 64
OBSERVED_TTL = 30 * 60.0
"""Seconds a peer's report of our address counts (a NAT rebinding moves the address)."""


class _PendingDial:
    """A dial in progress to a known peer, shared by every caller that wants that peer."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.connection: QuicConnectionHandle | None = None
        self.error: BaseException | None = None


class Host:
    """A libp2p-compatible host on QUIC; see the module docstring."""

    def __init__(
        self,
        identity: Identity,
        *,
        listen: Sequence[Multiaddr | str] = DEFAULT_LISTEN,
        limits: ConnectionLimits | None = None,
        negotiation_timeout: float = 10.0,
        dial_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        keep_alive: float | None = 15.0,
        close_grace: float = 10.0,
        peerstore: AddressBook | None = None,
        relays: Sequence[RelayClientConfig] = (),
        holepunch: HolePunchConfig | None = None,
    ) -> None:
        if not listen:
            raise ValueError("a host needs at least one listen address")
        self._identity = identity
        self._listen: list[Address] = []
        for item in listen:
            addr = Multiaddr(item) if isinstance(item, str) else item
            if not addr.is_quic_v1 or addr.peer_id is not None:
                raise InvalidMultiaddr(f"listen address {addr} is not /ip4|ip6/…/udp/…/quic-v1")
            host, port = addr.to_udp_address()
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise InvalidMultiaddr(f"listen address {addr} must be an IP literal") from None
            self._listen.append((host, port))
        versions = [ipaddress.ip_address(host).version for host, _ in self._listen]
        self._relays: dict[int, list[RelayClientConfig]] = {}
        for relay in relays:
            version = ipaddress.ip_address(relay.server[0]).version
            if version not in versions:
                raise ConfigError(
                    f"relay {relay.address} is IPv{version} but no listen address is: listen on "
                    f"an IPv{version} address to use it"
                )
            self._relays.setdefault(versions.index(version), []).append(relay)
        self._relay_permissions = {relay.server[0] for relay in relays}
        self._relayed_callbacks: list[Callable[[list[Multiaddr]], None]] = []
        self._relayed_changed = anyio.Event()
        if limits is None and holepunch is not None:
            # A relayed connection, and the two a simultaneous dial makes, for a moment.
            limits = ConnectionLimits(max_per_peer=3)
        self._connections: ConnectionManager[QuicConnectionHandle] = ConnectionManager(limits)
        self._negotiation_timeout = negotiation_timeout
        self._dial_timeout = dial_timeout
        self._idle_timeout = idle_timeout
        self._keep_alive = keep_alive
        self._close_grace = close_grace
        self._handlers: dict[str, StreamHandler] = {
            PING_PROTOCOL: serve_ping,
            IDENTIFY_PROTOCOL: self._serve_identify,
        }
        self.peerstore = peerstore if peerstore is not None else AddressBook()
        """Where known peers can be dialed (see `teia.host.peerstore`)."""
        self._endpoints: list[QuicEndpoint] = []
        self._peer_info: dict[PeerId, IdentifyInfo] = {}
        self._identify_waiters: dict[PeerId, anyio.Event] = {}
        self._dialing: dict[PeerId, _PendingDial] = {}
        self._draining: set[QuicConnectionHandle] = set()
        self._observed: dict[Multiaddr, dict[PeerId, float]] = {}
        """Observed address → the peers that reported it → when they last did."""
        self._stack: contextlib.AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self.holepunch: HolePuncher | None = None
        """Upgrades relayed connections to direct ones; None without ``holepunch``."""
        if holepunch is not None:
            self.holepunch = HolePuncher(self, holepunch)
            self._handlers[HOLEPUNCH_PROTOCOL] = self.holepunch.serve

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            for index, (host, port) in enumerate(self._listen):
                endpoint = QuicEndpoint(
                    self._identity.private_key,
                    host=host,
                    port=port,
                    idle_timeout=self._idle_timeout,
                    keep_alive=self._keep_alive,
                    relays=self._relays.get(index, ()),
                    relay_permissions=self._relay_permissions,
                    on_relayed_change=self._relayed_addrs_changed,
                )
                self._endpoints.append(await stack.enter_async_context(endpoint))
            # Entered last so it exits first: handlers stop before the endpoints close.
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            for endpoint in self._endpoints:
                self._task_group.start_soon(self._accept_loop, endpoint)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        return await self._stack.__aexit__(exc_type, exc, traceback)

    # --- who and where --------------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def peer_id(self) -> PeerId:
        return self._identity.peer_id

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """The bound addresses (the real port when 0 was asked for), without ``/p2p``."""
        return [Multiaddr.from_udp(*endpoint.local_address) for endpoint in self._endpoints]

    @property
    def addrs(self) -> list[Multiaddr]:
        """What this host tells others to dial: the bound addresses with ``/p2p/<our id>``.

        Wildcard binds (``0.0.0.0``, ``::``) are left out: they are not dialable as such.
        """
        direct = [
            Multiaddr.from_udp(host, port, peer_id=self.peer_id)
            for host, port in (endpoint.local_address for endpoint in self._endpoints)
            if not ipaddress.ip_address(host).is_unspecified
        ]
        return direct + self.relayed_addrs

    @property
    def relayed_addrs(self) -> list[Multiaddr]:
        """Where peers reach us through our relays: each allocation's relayed address with
        ``/p2p/<our id>``. Empty without relays, and while no allocation is held."""
        return [
            Multiaddr.from_udp(host, port, peer_id=self.peer_id)
            for endpoint in self._endpoints
            for host, port in endpoint.relayed_addresses
        ]

    def on_relayed_addrs_change(self, callback: Callable[[list[Multiaddr]], None]) -> None:
        """Call ``callback(relayed_addrs)`` whenever they change (an allocation made, lost or
        re-made); it runs in the host's receive path, so it must not block."""
        self._relayed_callbacks.append(callback)

    async def wait_relayed_addrs(
        self, predicate: Callable[[list[Multiaddr]], bool] = bool
    ) -> list[Multiaddr]:
        """Wait until ``predicate(relayed_addrs)`` holds (by default: there is one); bound the
        wait with ``anyio.fail_after``."""
        while True:
            addrs = self.relayed_addrs
            if predicate(addrs):
                return addrs
            await self._relayed_changed.wait()

    def _relayed_addrs_changed(self) -> None:
        changed, self._relayed_changed = self._relayed_changed, anyio.Event()
        changed.set()
        addrs = self.relayed_addrs
        for callback in list(self._relayed_callbacks):
            try:
                callback(addrs)
            except Exception:
                _log.exception("a relayed-address callback failed")

    def observed_addrs(self, *, min_peers: int = 1, now: float | None = None) -> list[Multiaddr]:
        """Addresses peers saw us at (identify) in the last `OBSERVED_TTL` seconds, reported by
        the most distinct peers first (the most recent report breaks ties).

        Behind NAT this is how a host learns its public address; ask for ``min_peers`` > 1
        before trusting one, since any single peer can report anything (and a peer that
        reports again still counts once). ``now`` is ``anyio.current_time()`` by default.
        """
        self._expire_observed(anyio.current_time() if now is None else now)
        ranked = sorted(self._observed, key=self._observed_rank, reverse=True)
        return [addr for addr in ranked if len(self._observed[addr]) >= min_peers]

    def _observed_rank(self, addr: Multiaddr) -> tuple[int, float]:
        """Distinct peers that reported ``addr``, then the time of the latest report."""
        reporters = self._observed[addr]
        return len(reporters), max(reporters.values())

    def _note_observed(self, addr: Multiaddr | None, reporter: PeerId, now: float) -> None:
        if addr is None or not addr.is_quic_v1 or addr.peer_id is not None:
            return
        self._expire_observed(now)
        reporters = self._observed.get(addr)
        if reporters is None:
            if len(self._observed) >= _MAX_OBSERVED:
                del self._observed[min(self._observed, key=self._observed_rank)]
            reporters = self._observed[addr] = {}
        reporters.pop(reporter, None)
        reporters[reporter] = now
        while len(reporters) > _MAX_REPORTERS:
            del reporters[next(iter(reporters))]

    def _expire_observed(self, now: float) -> None:
        horizon = now - OBSERVED_TTL
        for addr in list(self._observed):
            reporters = self._observed[addr]
            for peer in [p for p, seen in reporters.items() if seen < horizon]:
                del reporters[peer]
            if not reporters:
                del self._observed[addr]

    @property
    def connections(self) -> ConnectionManager[QuicConnectionHandle]:
        return self._connections

    def is_connected(self, peer: PeerId) -> bool:
        return self._usable_connection(peer) is not None

    def connection_to(self, peer: PeerId) -> QuicConnectionHandle | None:
        """The connection new streams to ``peer`` go on (a direct one before a relayed one),
        or None when there is none open."""
        return self._usable_connection(peer)

    # --- protocols ----------------------------------------------------------------------------

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams that negotiate ``protocol`` with ``handler``."""
        self._handlers[protocol] = handler

    def remove_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    # --- connections and streams ----------------------------------------------------------------

    async def connect(
        self, target: Multiaddr | str | PeerId, *, via_relay: bool | None = None
    ) -> QuicConnectionHandle:
        """Connect to a peer, reusing an open connection to it when there is one.

        ``target`` is a multiaddr (``/ip4|ip6|dns/…/udp/…/quic-v1[/p2p/<id>]``; with ``/p2p``
        the remote must prove that peer ID, else `PeerIdMismatch`), or a `PeerId`, dialed at
        the addresses in `peerstore`. Each address gets ``dial_timeout`` seconds. Raises
        `NotConnected` when a peer has no known address, `ConnectionLimitExceeded` when the
        connection manager is full, and the last dial's error when every address failed.

        ``via_relay``: None (the default) dials an address on a configured relay's IP through
        our own allocation and others directly; True sends every dial through an allocation
        (`RelayUnavailable` at once when no relay is configured); False never does.
        """
        if isinstance(target, PeerId):
            return await self._connect_peer(target, via_relay)
        addr = Multiaddr(target) if isinstance(target, str) else target
        if not addr.is_quic_v1:
            raise InvalidMultiaddr(f"{addr} is not a QUIC-v1 address (…/udp/<port>/quic-v1)")
        peer = addr.peer_id
        if peer is None:
            return await self._dial(addr, None, via_relay)
        existing = self._usable_connection(peer)
        if existing is not None:
            return existing
        return await self._shared_dial(peer, [addr], via_relay)

    async def open_stream(self, peer: PeerId, protocols: str | Sequence[str]) -> NegotiatedStream:
        """Open a stream to a connected peer and agree on the first protocol it supports.

        Raises `NotConnected` without an open connection, `ProtocolNotSupported` if the peer
        declines every protocol.
        """
        proposals = [protocols] if isinstance(protocols, str) else list(protocols)
        connection = self._usable_connection(peer)
        if connection is None:
            raise NotConnected(f"no open connection to {peer}; connect to one of its addresses")
        stream = await connection.open_stream()
        try:
            negotiated = await select_protocol(stream, proposals)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        negotiated.remote_peer_id = peer
        negotiated.remote_address = connection.remote_address
        return negotiated

    async def ping(self, peer: PeerId, *, count: int = 1) -> list[float]:
        """Ping a connected peer ``count`` times on one stream; round trips in seconds."""
        stream = await self.open_stream(peer, PING_PROTOCOL)
        try:
            return [await ping(stream) for _ in range(count)]
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def identify(self, peer: PeerId) -> IdentifyInfo:
        """Ask a connected peer who it is (``/ipfs/id/1.0.0``).

        A public key in the answer must be the one the peer proved in the handshake, else
        `PeerIdMismatch`.
        """
        stream = await self.open_stream(peer, IDENTIFY_PROTOCOL)
        try:
            info = await request_identify(stream)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        if info.public_key is not None:
            try:
                announced = PeerId.from_public_key_protobuf(info.public_key)
            except InvalidPeerId as exc:
                raise PeerIdMismatch(f"identify carried an unusable public key: {exc}") from None
            if announced != peer:
                raise PeerIdMismatch("identify carried a public key other than the peer's own")
        return info

    def peer_info(self, peer: PeerId) -> IdentifyInfo | None:
        """What identify told us about ``peer``, if it has run (after each new peer)."""
        return self._peer_info.get(peer)

    async def wait_identified(self, peer: PeerId) -> IdentifyInfo | None:
        """Wait for the identify exchange that follows a new connection; None if it failed."""
        if peer not in self._peer_info:
            waiter = self._identify_waiters.setdefault(peer, anyio.Event())
            await waiter.wait()
        return self._peer_info.get(peer)

    def identify_info(self, observed: Address | None = None) -> IdentifyInfo:
        """What this host says about itself; ``observed`` is the asking peer's address."""
        return IdentifyInfo(
            public_key=self._identity.public_key_protobuf,
            listen_addrs=tuple(addr.without_peer_id().to_bytes() for addr in self.addrs),
            protocols=tuple(self.protocols),
            observed_addr=Multiaddr.from_udp(*observed).to_bytes() if observed else None,
            protocol_version=PROTOCOL_VERSION,
            agent_version=AGENT_VERSION,
        )

    # --- internals: dialing ---------------------------------------------------------------------

    async def _connect_peer(
        self, peer: PeerId, via_relay: bool | None = None
    ) -> QuicConnectionHandle:
        existing = self._usable_connection(peer)
        if existing is not None:
            return existing
        addrs = self.peerstore.addrs(peer, now=anyio.current_time())
        if not addrs:
            raise NotConnected(f"no known address for {peer}")
        return await self._shared_dial(peer, addrs, via_relay)

    async def _shared_dial(
        self, peer: PeerId, addrs: list[Multiaddr], via_relay: bool | None = None
    ) -> QuicConnectionHandle:
        """Dial ``peer`` unless a dial to it is already running; then share that one."""
        pending = self._dialing.get(peer)
        if pending is not None:
            await pending.done.wait()
            if pending.connection is not None and not pending.connection.is_closed:
                return pending.connection
            existing = self._usable_connection(peer)
            if existing is not None:
                return existing
            if pending.error is not None:
                raise TransportError(f"the shared dial to {peer} failed: {pending.error}")
            raise NotConnected(f"the shared dial to {peer} was abandoned")
        pending = self._dialing[peer] = _PendingDial()
        try:
            error: BaseException | None = None
            for addr in addrs:
                try:
                    pending.connection = await self._dial(addr.without_peer_id(), peer, via_relay)
                    return pending.connection
                except (TransportError, OSError, TimeoutError) as exc:
                    _log.debug("dial to %s at %s failed: %s", peer, addr, exc)
                    error = exc
            assert error is not None
            pending.error = error
            raise error
        except BaseException as exc:
            pending.error = pending.error or exc
            raise
        finally:
            del self._dialing[peer]
            pending.done.set()

    async def _dial(
        self, addr: Multiaddr, peer: PeerId | None, via_relay: bool | None = None
    ) -> QuicConnectionHandle:
        host, port = addr.to_udp_address()
        address = await self._resolve(addr, host, port)
        endpoint = self._endpoint_for(address)
        with anyio.fail_after(self._dial_timeout):
            connection = await endpoint.connect(address, expected_peer_id=peer, via_relay=via_relay)
        remote = connection.remote_peer.peer_id
        try:
            self._connections.add(remote, Direction.OUTBOUND, connection)
        except ConnectionLimitExceeded:
            await connection.aclose()
            raise
        now = anyio.current_time()
        self.peerstore.add(remote, [Multiaddr.from_udp(*address)], ttl=CONNECTED_TTL, now=now)
        self._start(connection)
        return connection

    async def _resolve(self, addr: Multiaddr, host: str, port: int) -> Address:
        try:
            ipaddress.ip_address(host)
            return host, port
        except ValueError:
            pass
        kind = addr.protocols[0]
        family = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}.get(kind, socket.AF_UNSPEC)
        usable = {
            ipaddress.ip_address(endpoint.local_address[0]).version for endpoint in self._endpoints
        }
        try:
            infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {host}: {exc}") from None
        for info in infos:
            ip = str(info[4][0])
            if ipaddress.ip_address(ip).version in usable:
                return ip, port
        raise TransportError(f"{host} has no address of an IP version this host listens on")

    def _endpoint_for(self, address: Address) -> QuicEndpoint:
        version = ipaddress.ip_address(address[0]).version
        for endpoint in self._endpoints:
            if ipaddress.ip_address(endpoint.local_address[0]).version == version:
                return endpoint
        raise TransportError(f"no listen address of IP version {version} to dial from")

    # --- internals: one connection per peer -------------------------------------------------

    def _usable_connection(self, peer: PeerId) -> QuicConnectionHandle | None:
        fallback = None
        for connection in self._connections.connections_to(peer):
            if connection.is_closed:
                continue
            if connection not in self._draining:
                return connection
            fallback = connection
        return fallback

    def _initiator(self, connection: QuicConnectionHandle) -> PeerId:
        return self.peer_id if connection.is_initiator else connection.remote_peer.peer_id

    def _resolve_duplicates(self, connection: QuicConnectionHandle) -> None:
        """With two live connections to one peer, both sides drain the same one."""
        peer = connection.remote_peer.peer_id
        others = [
            c
            for c in self._connections.connections_to(peer)
            if c is not connection and not c.is_closed and c not in self._draining
        ]
        for other in others:
            a, b = self._initiator(other), self._initiator(connection)
            if other.is_relayed != connection.is_relayed:
                loser = other if other.is_relayed else connection  # direct beats relayed
            elif a == b:
                loser = connection  # the same side dialed twice: keep the older one
            else:
                keep_other = a.to_bytes() < b.to_bytes()
                loser = connection if keep_other else other
            self._drain(loser)
            if loser is connection:
                return

    def _drain(self, connection: QuicConnectionHandle) -> None:
        assert self._task_group is not None
        self._draining.add(connection)
        self._task_group.start_soon(self._close_after_grace, connection)

    async def _close_after_grace(self, connection: QuicConnectionHandle) -> None:
        try:
            with anyio.move_on_after(self._close_grace):
                await connection.wait_closed()
            await connection.aclose()
        finally:
            self._draining.discard(connection)

    # --- internals: serving ---------------------------------------------------------------------

    async def _serve_identify(self, stream: NegotiatedStream) -> None:
        await serve_identify(stream, self.identify_info(stream.remote_address))

    def _start(self, connection: QuicConnectionHandle) -> None:
        assert self._task_group is not None
        self._resolve_duplicates(connection)
        self._task_group.start_soon(self._serve_connection, connection)
        self._task_group.start_soon(self._identify_new_peer, connection.remote_peer.peer_id)
        if self.holepunch is not None:
            self.holepunch.connection_started(connection)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        """Run ``fn(*args)`` in the host's task group (cancelled when the host closes)."""
        if self._task_group is not None:
            self._task_group.start_soon(fn, *args)

    async def _identify_new_peer(self, peer: PeerId) -> None:
        """Learn a newly connected peer's protocols and addresses, as libp2p hosts do."""
        if peer in self._peer_info:
            return
        info: IdentifyInfo | None = None
        try:
            with anyio.fail_after(self._negotiation_timeout):
                info = await self.identify(peer)
        except (TransportError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            _log.debug("identify of a new peer failed: %s", exc)
        if info is not None:
            self._peer_info[peer] = info
            while len(self._peer_info) > _MAX_PEER_INFO:
                del self._peer_info[next(iter(self._peer_info))]
            now = anyio.current_time()
            self.peerstore.add(peer, info.listen_multiaddrs, ttl=ANNOUNCED_TTL, now=now)
            self._note_observed(info.observed_multiaddr, peer, now)
        waiter = self._identify_waiters.pop(peer, None)
        if waiter is not None:
            waiter.set()

    async def _accept_loop(self, endpoint: QuicEndpoint) -> None:
        while True:
            connection: QuicConnectionHandle | None = await endpoint.accept()
            # Take every connection already waiting, not one per wake-up.
            while connection is not None:
                self._admit(connection)
                connection = endpoint.accept_nowait()

    def _admit(self, connection: QuicConnectionHandle) -> None:
        try:
            self._connections.add(connection.remote_peer.peer_id, Direction.INBOUND, connection)
        except ConnectionLimitExceeded as exc:
            _log.info("refusing inbound connection: %s", exc)
            connection.close()
            return
        self._start(connection)

    async def _serve_connection(self, connection: QuicConnectionHandle) -> None:
        assert self._task_group is not None
        try:
            while True:
                stream = await connection.accept_stream()
                self._task_group.start_soon(self._serve_stream, connection, stream)
        except ConnectionClosed:
            pass
        finally:
            self._connections.remove(connection)

    async def _serve_stream(self, connection: QuicConnectionHandle, stream: QuicStream) -> None:
        try:
            with anyio.fail_after(self._negotiation_timeout):
                negotiated = await accept_protocol(stream, self._handlers.__contains__)
            handler = self._handlers.get(negotiated.protocol)
            if handler is None:  # removed while negotiating
                return
            negotiated.remote_peer_id = connection.remote_peer.peer_id
            negotiated.remote_address = connection.remote_address
            await handler(negotiated)
        except (ProtocolNegotiationError, TimeoutError) as exc:
            _log.debug("inbound stream negotiation failed: %s", exc)
        except (TransportError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            _log.debug("inbound stream ended: %s", exc)
        except Exception:
            _log.exception("handler for an inbound stream failed")
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
