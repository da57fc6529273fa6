"""The host: QUIC endpoints, connections under a connection manager, protocol handlers by name.

``async with Host(host_key, listen=[("127.0.0.1", 0)]) as host`` opens one `QuicEndpoint` per
listen address (each serves dialing and listening on one UDP socket). Every stream, in either
direction, starts with multistream-select; inbound streams go to the handler registered for the
agreed protocol (`set_handler`), outbound ones come from `open_stream`. ``/ipfs/ping/1.0.0``
and ``/ipfs/id/1.0.0`` are served by default, and every newly connected peer is identified
(`peer_info`, `wait_identified`).

Handlers run in the host's task group, one task per stream; the stream is closed when the
handler returns, and a failing handler is logged without touching the connection. Leaving the
block cancels every handler and closes every connection.

Provisional surface until `teia.identity` lands: peers are binary peer IDs and addresses are
``(ip, port)`` pairs; `connect` will take a multiaddr (``…/quic-v1/p2p/<id>``) and the host an
``Identity``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import (
    ConnectionClosed,
    ConnectionLimitExceeded,
    NotConnected,
    PeerIdMismatch,
    ProtocolNegotiationError,
    TransportError,
)
from teia.host.connmgr import ConnectionLimits, ConnectionManager, Direction
from teia.host.identify import (
    AGENT_VERSION,
    IDENTIFY_PROTOCOL,
    PROTOCOL_VERSION,
    IdentifyInfo,
    quic_v1_multiaddr,
    request_identify,
    serve_identify,
)
from teia.host.ping import PING_PROTOCOL, ping, serve_ping
from teia.host.streams import NegotiatedStream, accept_protocol, select_protocol
from teia.transport.quic import QuicConnectionHandle, QuicEndpoint, QuicStream
from teia.transport.tls import host_key_protobuf, peer_id_bytes

__all__ = ["Host", "StreamHandler"]

_log = logging.getLogger(__name__)

StreamHandler = Callable[[NegotiatedStream], Awaitable[None]]
"""Serves one inbound stream; ``stream.remote_peer_id`` says who opened it."""

Address = tuple[str, int]

# Identify results kept for peers, oldest dropped first (a peerstore proper comes later).
_MAX_PEER_INFO = 4096


class Host:
    """A libp2p-compatible host on QUIC; see the module docstring."""

    def __init__(
        self,
        host_key: ed25519.Ed25519PrivateKey,
        *,
        listen: Sequence[Address] = (("127.0.0.1", 0),),
        limits: ConnectionLimits | None = None,
        negotiation_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        keep_alive: float | None = 15.0,
    ) -> None:
        if not listen:
            raise ValueError("a host needs at least one listen address")
        self._host_key = host_key
        self._listen = list(listen)
        self._connections: ConnectionManager[QuicConnectionHandle] = ConnectionManager(limits)
        self._negotiation_timeout = negotiation_timeout
        self._idle_timeout = idle_timeout
        self._keep_alive = keep_alive
        self._handlers: dict[str, StreamHandler] = {
            PING_PROTOCOL: serve_ping,
            IDENTIFY_PROTOCOL: self._serve_identify,
        }
        self._endpoints: list[QuicEndpoint] = []
        self._peer_info: dict[bytes, IdentifyInfo] = {}
        self._identify_waiters: dict[bytes, anyio.Event] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            for host, port in self._listen:
                endpoint = QuicEndpoint(
                    self._host_key,
                    host=host,
                    port=port,
                    idle_timeout=self._idle_timeout,
                    keep_alive=self._keep_alive,
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
    def peer_id(self) -> bytes:
        return peer_id_bytes(self._host_key.public_key())

    @property
    def listen_addresses(self) -> list[Address]:
        return [endpoint.local_address for endpoint in self._endpoints]

    @property
    def connections(self) -> ConnectionManager[QuicConnectionHandle]:
        return self._connections

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
        self, address: Address, *, peer_id: bytes | None = None
    ) -> QuicConnectionHandle:
        """Connect to ``address``; with ``peer_id``, reuse an open connection or insist on it.

        Raises `PeerIdMismatch` if another peer answers, `ConnectionLimitExceeded` if the
        connection manager is full. Bound it with ``anyio.fail_after``.
        """
        if peer_id is not None:
            for connection in self._connections.connections_to(peer_id):
                if not connection.is_closed:
                    return connection
        endpoint = self._endpoint_for(address)
        connection = await endpoint.connect(address, expected_peer_id=peer_id)
        remote = connection.remote_peer.peer_id
        try:
            self._connections.add(remote, Direction.OUTBOUND, connection)
        except ConnectionLimitExceeded:
            await connection.aclose()
            raise
        self._start(connection)
        return connection

    async def open_stream(self, peer_id: bytes, protocols: str | Sequence[str]) -> NegotiatedStream:
        """Open a stream to a connected peer and agree on the first protocol it supports.

        Raises `NotConnected` without an open connection, `ProtocolNotSupported` if the peer
        declines every protocol.
        """
        proposals = [protocols] if isinstance(protocols, str) else list(protocols)
        connection = self._open_connection_to(peer_id)
        stream = await connection.open_stream()
        try:
            negotiated = await select_protocol(stream, proposals)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        negotiated.remote_peer_id = peer_id
        negotiated.remote_address = connection.remote_address
        return negotiated

    async def ping(self, peer_id: bytes, *, count: int = 1) -> list[float]:
        """Ping a connected peer ``count`` times on one stream; round trips in seconds."""
        stream = await self.open_stream(peer_id, PING_PROTOCOL)
        try:
            return [await ping(stream) for _ in range(count)]
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def identify(self, peer_id: bytes) -> IdentifyInfo:
        """Ask a connected peer who it is (``/ipfs/id/1.0.0``).

        A public key in the answer must be the one the peer proved in the handshake, else
        `PeerIdMismatch`.
        """
        stream = await self.open_stream(peer_id, IDENTIFY_PROTOCOL)
        try:
            info = await request_identify(stream)
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        if info.public_key is not None and (
            bytes([0x00, len(info.public_key)]) + info.public_key != peer_id
        ):
            raise PeerIdMismatch("identify carried a public key other than the peer's own")
        return info

    def peer_info(self, peer_id: bytes) -> IdentifyInfo | None:
        """What identify told us about ``peer_id``, if it has run (after each new peer)."""
        return self._peer_info.get(peer_id)

    async def wait_identified(self, peer_id: bytes) -> IdentifyInfo | None:
        """Wait for the identify exchange that follows a new connection; None if it failed."""
        if peer_id not in self._peer_info:
            waiter = self._identify_waiters.setdefault(peer_id, anyio.Event())
            await waiter.wait()
        return self._peer_info.get(peer_id)

    def identify_info(self, observed: Address | None = None) -> IdentifyInfo:
        """What this host says about itself; ``observed`` is the asking peer's address."""
        listen = [
            quic_v1_multiaddr(host, port)
            for host, port in self.listen_addresses
            if not ipaddress.ip_address(host).is_unspecified
        ]
        return IdentifyInfo(
            public_key=host_key_protobuf(self._host_key.public_key()),
            listen_addrs=tuple(listen),
            protocols=tuple(self.protocols),
            observed_addr=quic_v1_multiaddr(*observed) if observed is not None else None,
            protocol_version=PROTOCOL_VERSION,
            agent_version=AGENT_VERSION,
        )

    # --- internals ------------------------------------------------------------------------------

    async def _serve_identify(self, stream: NegotiatedStream) -> None:
        await serve_identify(stream, self.identify_info(stream.remote_address))

    def _open_connection_to(self, peer_id: bytes) -> QuicConnectionHandle:
        for connection in self._connections.connections_to(peer_id):
            if not connection.is_closed:
                return connection
        raise NotConnected("no open connection to that peer; connect to one of its addresses")

    def _endpoint_for(self, address: Address) -> QuicEndpoint:
        version = ipaddress.ip_address(address[0]).version
        for endpoint in self._endpoints:
            if ipaddress.ip_address(endpoint.local_address[0]).version == version:
                return endpoint
        raise TransportError(f"no listen address of IP version {version} to dial from")

    def _start(self, connection: QuicConnectionHandle) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(self._serve_connection, connection)
        self._task_group.start_soon(self._identify_new_peer, connection.remote_peer.peer_id)

    async def _identify_new_peer(self, peer_id: bytes) -> None:
        """Learn a newly connected peer's protocols and addresses, as libp2p hosts do."""
        if peer_id in self._peer_info:
            return
        info: IdentifyInfo | None = None
        try:
            with anyio.fail_after(self._negotiation_timeout):
                info = await self.identify(peer_id)
        except (TransportError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            _log.debug("identify of a new peer failed: %s", exc)
        if info is not None:
            self._peer_info[peer_id] = info
            while len(self._peer_info) > _MAX_PEER_INFO:
                del self._peer_info[next(iter(self._peer_info))]
        waiter = self._identify_waiters.pop(peer_id, None)
        if waiter is not None:
            waiter.set()

    async def _accept_loop(self, endpoint: QuicEndpoint) -> None:
        while True:
            connection = await endpoint.accept()
            try:
                self._connections.add(connection.remote_peer.peer_id, Direction.INBOUND, connection)
            except ConnectionLimitExceeded as exc:
                _log.info("refusing inbound connection: %s", exc)
                await connection.aclose()
                continue
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
