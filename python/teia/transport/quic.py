"""QUIC endpoints for libp2p's ``/quic-v1``: aioquic's sans-IO core driven by one anyio UDP socket.

One `QuicEndpoint` owns one UDP socket and serves both directions on it (hole punching needs
dialing and listening on the same port). The shape:

- one receive task reads datagrams, finds the connection by destination connection ID, feeds
  ``receive_datagram`` and wakes that connection's driver (or makes a new server connection for
  an Initial packet);
- one driver task per connection does everything else for it: ``handle_timer`` when
  ``get_timer()`` falls due, turning aioquic events into stream/connection state, and sending
  ``datagrams_to_send``. It sleeps on a wakeup event with the timer as its deadline, so nothing
  polls and nothing sleeps as synchronisation;
- application calls (stream writes, close) change the aioquic state and wake the driver.

TLS is configured for libp2p: QUIC v1 only, ALPN ``libp2p``, our certificate from
`teia.transport.tls`, a client certificate required, no CA and no SNI. The peer's certificate is
verified inside the TLS handshake (see `_Libp2pQuicConnection`), so a bad certificate or a
peer ID other than the one dialed aborts the handshake with a TLS alert.

All clocks are ``anyio.current_time()``, except the wall clock that certificate validity is
checked against.

Peers through a relay: with ``relays`` the endpoint keeps a TURN allocation on each relay
(`teia.relay.client.TurnSession`) over the same UDP socket. Every datagram from a relay's
address is TURN: answers go to the session, and peer data comes out of its Send/Data
indication or ChannelData and is fed to QUIC *as if from the peer's relayed address*. Datagrams
to a peer reached through a relay are wrapped for it and sent to the relay. So a connection's
`remote_address` is the peer's relayed address, and QUIC, with its encryption, stays end to
end: the relay only ever holds opaque QUIC packets.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
import anyio.abc
import anyio.lowlevel
from aioquic import tls as aioquic_tls
from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioquicStream
from cryptography.hazmat.primitives.asymmetric import ed25519

from teia.errors import (
    ConnectionClosed,
    HandshakeFailed,
    InvalidCertificate,
    PeerIdMismatch,
    RelayUnavailable,
    StreamReset,
    TransportError,
)
from teia.identity import PeerId
from teia.relay.client import RelayClientConfig, TurnSession
from teia.transport.tls import (
    ALPN,
    CertifiedKey,
    VerifiedPeer,
    generate_certificate,
    peer_id_of,
)
from teia.transport.tls import verify_certificate_chain as _verify_chain

__all__ = ["QuicConnectionHandle", "QuicEndpoint", "QuicStream"]

_log = logging.getLogger(__name__)

_CONNECTION_ID_LENGTH = 8
_MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 §14.1: servers drop smaller Initial datagrams
_MAX_DATAGRAM = 65535
_RECEIVE_BATCH = 64
# Per-stream flow-control window: the most unread bytes a peer may have outstanding on one stream,
# and the most unacknowledged bytes one of our writers may queue before `send` waits.
STREAM_WINDOW = 512 * 1024
# Incoming streams not yet taken by accept_stream(); beyond this new streams are refused. QUIC
# stream credit already caps a peer at 128 concurrent streams of each kind (aioquic grants one
# more per finished stream), so a burst within that credit is always queued, never refused.
MAX_PENDING_STREAMS = 256
# Established inbound connections not yet taken by accept(); beyond this they are refused
# ("busy"). As large as the default cap on half-open handshakes, so that a burst of handshakes
# completing together fits.
MAX_PENDING_CONNECTIONS = 128
_STREAM_REFUSED = 0x100  # application error code for a refused/stopped stream
_CERTIFICATE_REQUIRED = 116  # TLS alert certificate_required (RFC 8446 §6.2)
_NO_APPLICATION_PROTOCOL = 120  # TLS alert no_application_protocol

Address = tuple[str, int]


class _BurstPacer(QuicPacketPacer):
    """aioquic's pacer, keeping the bursts it means to allow at very high pacing rates.

    aioquic lets a burst of up to 16 packets (at most a quarter of the congestion window) go
    back to back, as a bucket of *time* at the pacing rate, but it floors the time per packet at
    1 µs and not the bucket. Above about 1 GB/s — a loopback path once Reno, seeing no loss, has
    grown the window into the thousands of packets — the bucket then holds fewer and fewer
    packets (five, then one), and the connection's driver wakes for every few packets: the CPU
    per byte doubled and throughput halved as a connection aged. Here the bucket always holds
    the burst, counted in packets.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is not None:
            burst = max(2, min(congestion_window // 4 // self._max_datagram_size, 16))
            self.bucket_max = max(self.bucket_max, burst * self.packet_time)


def _wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Libp2pQuicConnection(QuicConnection):
    """aioquic's connection with libp2p peer authentication inside the TLS handshake.

    aioquic has no public hook for verifying a certificate without a CA, nor for a server to
    require client certificates. Both are done here, on its TLS context, and nowhere else; the
    private names touched are ``Context._set_peer_certificate``,
    ``Context._request_client_certificate`` and ``QuicConnection._close_event``.

    It also replaces aioquic's receive flow control, which grants the peer more credit as data
    *arrives* (doubling the window), with credit granted as the application *reads*
    (`note_consumed`), so a slow reader pushes back on the sender instead of buffering without
    bound. That touches ``_write_stream_limits``, ``_streams`` and the stream's
    ``max_stream_data_local*``/sender buffer fields, and ACKs owed ride in the next packet with
    data (`send_stream_data`: ``_spaces``, ``ack_at``). Its pacer is `_BurstPacer`
    (``_loss._pacer``). Tested against aioquic 1.x (the version range pinned in pyproject).
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        expected_peer_id: PeerId | None,
        clock: Callable[[], dt.datetime],
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        self.verified_peer: VerifiedPeer | None = None
        self.verification_error: TransportError | None = None
        self._expected_peer_id = expected_peer_id
        self._clock = clock
        self._consumed: dict[int, int] = {}
        self._window = configuration.max_stream_data
        self._loss._pacer = _BurstPacer(max_datagram_size=self._loss._pacer._max_datagram_size)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        context = self.tls
        if not self._is_client:
            context._request_client_certificate = True
        set_peer_certificate = context._set_peer_certificate

        def verify_then_set(certificate: aioquic_tls.Certificate) -> None:
            self._verify(certificate)
            set_peer_certificate(certificate)

        # Runs when the peer's Certificate message arrives, before CertificateVerify/Finished;
        # raising an Alert here makes aioquic abort the handshake with that alert.
        setattr(context, "_set_peer_certificate", verify_then_set)  # noqa: B010

    def _verify(self, certificate: aioquic_tls.Certificate) -> None:
        try:
            peer = _verify_chain([der for der, _ in certificate.certificates], now=self._clock())
        except InvalidCertificate as exc:
            self.verification_error = exc
            raise aioquic_tls.AlertBadCertificate(str(exc)) from exc
        if self._expected_peer_id is not None and peer.peer_id != self._expected_peer_id:
            self.verification_error = PeerIdMismatch(
                "the peer at this address proved a different peer ID from the one dialed"
            )
            raise aioquic_tls.AlertBadCertificate("peer ID mismatch")
        self.verified_peer = peer

    def note_consumed(self, stream_id: int, count: int) -> bool:
        """Record that the application read ``count`` bytes; True if new credit is due."""
        consumed = self._consumed.get(stream_id, 0) + count
        self._consumed[stream_id] = consumed
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        return consumed + self._window - stream.max_stream_data_local >= self._window // 2

    def forget_consumed(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """aioquic's, and an acknowledgement that is owed rides along now.

        aioquic sends an ACK only once its delay (1 ms) is up, even when a packet with data
        leaves before that: in a request/answer exchange each side then sends an extra ACK-only
        packet a millisecond later, which the other side must decrypt and process too, often
        in the middle of the next exchange. Making the owed ACK due now puts it in the packet
        that carries this data (RFC 9000 §13.2.1 lets an endpoint send ACKs whenever it
        sends). Touches ``_spaces`` and the space's ``ack_at``.
        """
        super().send_stream_data(stream_id, data, end_stream)
        space = self._spaces.get(aioquic_tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = 0.0

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes written to the stream that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
    ) -> None:
        stream_id = stream.stream_id
        if stream_id is None or not stream.max_stream_data_local:  # our own uni streams
            return
        # Credit follows what the application has read, in steps of half a window so that
        # MAX_STREAM_DATA frames stay rare.
        granted = self._consumed.get(stream_id, 0) + self._window
        if granted - stream.max_stream_data_local >= self._window // 2:
            stream.max_stream_data_local = granted
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=1 + 2 * 8,  # frame type + two varints
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local

    @property
    def closing_reason(self) -> str | None:
        """Why the connection is closing (set as soon as closing starts), or None if it is not."""
        close_event = self._close_event
        if close_event is None:
            return None
        return close_event.reason_phrase or f"error code {close_event.error_code:#x}"


@dataclass(eq=False)
class _StreamState:
    buffer: bytearray
    eof_received: bool = False
    reset_code: int | None = None
    eof_sent: bool = False
    send_stopped_code: int | None = None
    closed: bool = False


class QuicStream(anyio.abc.ByteStream):
    """A bidirectional QUIC stream as an anyio byte stream.

    `receive` raises `anyio.EndOfStream` after the peer's FIN, `StreamReset` if the peer reset
    it, `ConnectionClosed` if the connection went away; `send_eof` half-closes.
    """

    def __init__(self, connection: QuicConnectionHandle, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._state = _StreamState(buffer=bytearray())
        self._readable = anyio.Event()
        self._writable = anyio.Event()

    def _data_received(self, data: bytes, end_stream: bool) -> None:
        state = self._state
        if state.closed:
            return
        state.buffer += data
        state.eof_received = state.eof_received or end_stream
        self._readable.set()

    def _reset_received(self, error_code: int) -> None:
        self._state.reset_code = error_code
        self._readable.set()

    def _stop_sending_received(self, error_code: int) -> None:
        self._state.send_stopped_code = error_code
        self._writable.set()

    def _connection_lost(self) -> None:
        self._readable.set()
        self._writable.set()

    def _finish_sending(self) -> None:
        # A stream the peer stopped has nothing left to finish.
        with contextlib.suppress(StreamReset):
            self._connection._send_stream_data(self.stream_id, b"", end_stream=True)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        state = self._state
        while True:
            if state.closed:
                raise anyio.ClosedResourceError
            if state.buffer:
                return self.receive_nowait(max_bytes)
            if state.reset_code is not None:
                raise StreamReset(f"stream reset by the peer (code {state.reset_code:#x})")
            if state.eof_received:
                raise anyio.EndOfStream
            if self._connection.is_closed:
                raise ConnectionClosed(f"connection closed: {self._connection.close_reason}")
            self._readable = anyio.Event()
            await self._readable.wait()

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """What has arrived and not been read, up to ``max_bytes``, without waiting: ``b""``
        when nothing is buffered (an end, a reset or a closed connection is for `receive` to
        report)."""
        state = self._state
        if state.closed or not state.buffer:
            return b""
        data = bytes(state.buffer[:max_bytes])
        del state.buffer[:max_bytes]
        self._connection._consumed(self.stream_id, len(data))
        return data

    async def send(self, item: bytes) -> None:
        state = self._state
        if state.closed or state.eof_sent:
            raise anyio.ClosedResourceError
        if state.send_stopped_code is not None:
            raise StreamReset(f"peer stopped reading (code {state.send_stopped_code:#x})")
        self._connection._send_stream_data(self.stream_id, item, end_stream=False)
        # Backpressure: wait while more than a window of our data is unacknowledged.
        while self._connection._unacknowledged(self.stream_id) > STREAM_WINDOW:
            if state.send_stopped_code is not None or self._connection.is_closed:
                break
            self._writable = anyio.Event()
            self._connection._blocked_writers.add(self)
            await self._writable.wait()
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        state = self._state
        if state.eof_sent or state.closed:
            return
        state.eof_sent = True
        if not self._connection.is_closed:
            self._finish_sending()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Finish sending (FIN) and stop reading; unread data is discarded."""
        state = self._state
        if state.closed:
            return
        if not state.eof_sent and not self._connection.is_closed:
            state.eof_sent = True
            self._finish_sending()
        if not state.eof_received and state.reset_code is None:
            self._connection._stop_stream(self.stream_id)
        self._discard()
        await anyio.lowlevel.checkpoint()

    def reset(self, error_code: int = 0) -> None:
        """Abort the stream both ways (RESET_STREAM and STOP_SENDING); unread data is lost.

        The peer's reads and writes on it then raise `StreamReset`.
        """
        state = self._state
        if state.closed:
            return
        if not self._connection.is_closed:
            self._connection._reset_stream(
                self.stream_id,
                error_code,
                stop_receiving=not state.eof_received and state.reset_code is None,
            )
        state.eof_sent = True
        self._discard()

    def _discard(self) -> None:
        state = self._state
        state.closed = True
        state.buffer.clear()
        self._readable.set()
        self._writable.set()
        self._connection._forget_stream(self.stream_id)


class QuicConnectionHandle:
    """An authenticated QUIC connection to one peer; streams are opened and accepted here."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: _Libp2pQuicConnection,
        remote_address: Address,
        *,
        is_initiator: bool,
    ) -> None:
        self._endpoint = endpoint
        self._quic = quic
        self.remote_address = remote_address
        self.is_initiator = is_initiator
        self._streams: dict[int, QuicStream] = {}
        self._incoming_send, self._incoming_receive = anyio.create_memory_object_stream[QuicStream](
            MAX_PENDING_STREAMS
        )
        self._wakeup = anyio.Event()
        self._handshake_settled = anyio.Event()
        self._handshake_error: TransportError | None = None
        self._established = False
        self._terminated = anyio.Event()
        self._terminated_seen = False
        """aioquic reported the connection terminated (`_take_events`); the driver ends."""
        self._backlog: list[tuple[bytes, Address]] = []
        """Datagrams `_flush` built but the socket did not take at once: the driver sends them."""
        self._close_reason: str | None = None
        self._local_cids: set[bytes] = set()
        self._blocked_writers: set[QuicStream] = set()
        # Remote streams we closed: late frames for them must not look like new streams.
        self._finished_remote_streams: set[int] = set()

    # --- public ---------------------------------------------------------------------------

    @property
    def remote_peer(self) -> VerifiedPeer:
        """Who the peer proved to be during the handshake."""
        peer = self._quic.verified_peer
        if peer is None or not self._established:
            raise HandshakeFailed("the connection is not established")
        return peer

    @property
    def is_relayed(self) -> bool:
        """Whether the connection runs through a TURN relay: through one of our allocations, or
        from the peer's (its datagrams come from a configured relay's IP)."""
        endpoint = self._endpoint
        address = self.remote_address
        return address in endpoint._relay_routes or address[0] in endpoint._relay_ips

    @property
    def is_closed(self) -> bool:
        return self._terminated.is_set() or self._quic.closing_reason is not None

    @property
    def close_reason(self) -> str:
        return self._close_reason or self._quic.closing_reason or "open"

    async def open_stream(self) -> QuicStream:
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        stream_id = self._quic.get_next_available_stream_id()
        # An empty write creates the stream inside aioquic (nothing goes on the wire until data
        # does), so the next open_stream() gets the next ID.
        self._quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        await anyio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        """Wait for the peer to open a stream; `ConnectionClosed` once the connection ends."""
        try:
            return await self._incoming_receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise ConnectionClosed(f"connection closed: {self.close_reason}") from None

    def close(self, reason: str = "closed") -> None:
        """Start closing without waiting: CONNECTION_CLOSE goes out from the driver task."""
        self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=reason)
        self._wake()

    async def aclose(self) -> None:
        """Close the connection (CONNECTION_CLOSE is sent; draining continues in background)."""
        self.close()
        await anyio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        await self._terminated.wait()

    # --- used by streams --------------------------------------------------------------------

    def _send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        if self.is_closed:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)
        except (RuntimeError, ValueError) as exc:  # aioquic: stopped by the peer, or finished
            raise StreamReset(f"cannot write to the stream: {exc}") from exc
        self._flush()

    def _flush(self) -> None:
        """Send what is ready now, from the writer's own step, rather than one pass of the event
        loop later in the driver's: a request or an answer leaves at once. What the socket
        does not take at once waits for the driver, which is woken either way (to re-arm its
        timers for what is now in flight)."""
        datagrams = self._quic.datagrams_to_send(now=anyio.current_time())
        if datagrams:
            self._backlog += self._endpoint._send_datagrams_now(datagrams)
        self._wake()

    def _reset_stream(self, stream_id: int, error_code: int, *, stop_receiving: bool) -> None:
        self._quic.reset_stream(stream_id, error_code)
        if stop_receiving:
            with contextlib.suppress(ValueError):  # nothing received yet: nothing to stop
                self._quic.stop_stream(stream_id, error_code)
        self._wake()

    def _stop_stream(self, stream_id: int) -> None:
        if self.is_closed:
            return
        try:
            self._quic.stop_stream(stream_id, _STREAM_REFUSED)
        except ValueError:  # never received anything on it: nothing to stop
            return
        self._wake()

    def _consumed(self, stream_id: int, count: int) -> None:
        if self._quic.note_consumed(stream_id, count):
            self._wake()

    def _unacknowledged(self, stream_id: int) -> int:
        return self._quic.unacknowledged(stream_id)

    def _release_writers(self) -> None:
        for stream in list(self._blocked_writers):
            if self.is_closed or self._quic.unacknowledged(stream.stream_id) <= STREAM_WINDOW:
                self._blocked_writers.discard(stream)
                stream._writable.set()

    def _forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._quic.forget_consumed(stream_id)
        if self._stream_is_remote(stream_id):
            self._finished_remote_streams.add(stream_id)

    # --- driven by the endpoint -----------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def wait_established(self) -> None:
        """Wait for the handshake; raise why it failed (certificate, peer ID, refusal)."""
        await self._handshake_settled.wait()
        if self._handshake_error is not None:
            raise self._handshake_error

    def _fail_handshake(self, error: TransportError) -> None:
        if not self._handshake_settled.is_set():
            self._handshake_error = error
            self._handshake_settled.set()

    def _take_events(self) -> None:
        """Hand aioquic's pending events to the streams and the bookkeeping now.

        The endpoint calls it right after feeding a datagram, so a reader waiting for the data
        wakes in the same pass of the event loop as this connection's driver rather than one
        pass after it (the driver calls it too, for events its timers raise)."""
        quic = self._quic
        while (event := quic.next_event()) is not None:
            self._handle_event(event)
            if isinstance(event, events.ConnectionTerminated):
                self._terminated_seen = True

    def _handle_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                if (
                    not self._stream_is_remote(event.stream_id)
                    or event.stream_id in self._finished_remote_streams
                ):
                    return  # a stream we already closed and forgot
                stream = QuicStream(self, event.stream_id)
                try:
                    self._incoming_send.send_nowait(stream)
                except anyio.WouldBlock:
                    self._quic.reset_stream(event.stream_id, _STREAM_REFUSED)
                    self._stop_stream(event.stream_id)
                    self._finished_remote_streams.add(event.stream_id)
                    return
                except anyio.ClosedResourceError:  # closing: no new stream is taken any more
                    self._finished_remote_streams.add(event.stream_id)
                    return
                self._streams[event.stream_id] = stream
            stream._data_received(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._reset_received(event.error_code)
        elif isinstance(event, events.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._stop_sending_received(event.error_code)
        elif isinstance(event, events.ConnectionIdIssued):
            self._local_cids.add(event.connection_id)
            self._endpoint._register(event.connection_id, self)
        elif isinstance(event, events.ConnectionIdRetired):
            self._local_cids.discard(event.connection_id)
            self._endpoint._unregister(event.connection_id, self)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_completed(event)
        elif isinstance(event, events.ConnectionTerminated):
            self._close_reason = event.reason_phrase or f"error code {event.error_code:#x}"

    def _handshake_completed(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol != ALPN:
            self._quic.close(
                error_code=QuicErrorCode.CRYPTO_ERROR + _NO_APPLICATION_PROTOCOL,
                reason_phrase="ALPN libp2p required",
            )
            self._fail_handshake(HandshakeFailed("peer did not negotiate ALPN 'libp2p'"))
            return
        if self._quic.verified_peer is None:
            # A client may send an empty Certificate; libp2p requires mutual authentication.
            self._quic.close(
                error_code=QuicErrorCode.CRYPTO_ERROR + _CERTIFICATE_REQUIRED,
                reason_phrase="libp2p certificate required",
            )
            self._fail_handshake(HandshakeFailed("peer presented no certificate"))
            return
        self._established = True
        self._handshake_settled.set()
        if not self.is_initiator:
            self._endpoint._connection_established(self)

    def _check_closing(self) -> None:
        reason = self._quic.closing_reason
        if reason is None:
            return
        if self._quic.verification_error is not None:
            self._fail_handshake(self._quic.verification_error)
        else:
            self._fail_handshake(HandshakeFailed(f"handshake failed: {reason}"))
        for stream in self._streams.values():
            stream._connection_lost()
        self._incoming_send.close()

    def _stream_is_remote(self, stream_id: int) -> bool:
        # Bit 0 of a stream ID is the initiator: 0 client, 1 server.
        return bool(stream_id & 1) == self.is_initiator

    async def _drive(self) -> None:
        """This connection's driver: timers, events and sending, woken on demand."""
        quic = self._quic
        endpoint = self._endpoint
        keep_alive = endpoint._keep_alive
        keep_alive_at = math.inf if keep_alive is None else anyio.current_time() + keep_alive
        # Half-open connections (an Initial, then nothing) must not hold a slot for a whole idle
        # timeout; this bounds what spoofed Initials can occupy.
        handshake_deadline = anyio.current_time() + endpoint._handshake_timeout
        pings = 0
        try:
            while True:
                self._wakeup = anyio.Event()
                now = anyio.current_time()
                timer = quic.get_timer()
                if timer is not None and timer <= now:
                    quic.handle_timer(now)
                if not self._handshake_settled.is_set() and now >= handshake_deadline:
                    quic.close(
                        error_code=QuicErrorCode.CONNECTION_REFUSED,
                        reason_phrase="handshake timed out",
                    )
                    self._fail_handshake(HandshakeFailed("the handshake timed out"))
                if now >= keep_alive_at and keep_alive is not None:
                    # An ack-eliciting PING keeps the peer's idle timer (and NAT bindings) fresh.
                    pings += 1
                    quic.send_ping(pings)
                    keep_alive_at = now + keep_alive
                self._take_events()
                terminated = self._terminated_seen
                self._check_closing()
                backlog, self._backlog = self._backlog, []
                await endpoint._send_datagrams(
                    backlog + quic.datagrams_to_send(now=anyio.current_time())
                )
                self._release_writers()
                if terminated:
                    return
                timer = quic.get_timer()
                deadline = min(keep_alive_at, math.inf if timer is None else timer)
                if not self._handshake_settled.is_set():
                    deadline = min(deadline, handshake_deadline)
                with anyio.CancelScope(deadline=deadline):
                    await self._wakeup.wait()
                # The datagram that woke us woke its streams' readers too, and trio runs a
                # batch of woken tasks in either order: one more pass lets them go first, so
                # a reader answers before the driver spends ~50 µs finding (usually) nothing
                # to send; its answer leaves from its own step, the driver sends what remains.
                await anyio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._terminated.set()
            self._close_reason = self._close_reason or quic.closing_reason or "endpoint closed"
            self._fail_handshake(ConnectionClosed(f"connection closed: {self._close_reason}"))
            for stream in self._streams.values():
                stream._connection_lost()
            self._incoming_send.close()
            self._incoming_receive.close()
            endpoint._connection_ended(self)


class QuicEndpoint:
    """One UDP socket serving libp2p QUIC connections, inbound and outbound.

    Use as ``async with QuicEndpoint(host_key, host="127.0.0.1") as endpoint``; then
    ``await endpoint.connect(address, expected_peer_id=…)`` and ``await endpoint.accept()``.
    Leaving the block closes every connection and the socket.

    Connections silent for ``idle_timeout`` seconds close; every ``keep_alive`` seconds (None:
    never) each connection sends a PING so that a quiet but wanted connection stays up (the
    same 15 s go-libp2p uses, below the usual 30 s idle timeout and NAT binding lifetimes).

    With ``relays``, an allocation is kept on each (see the module docstring) with permissions
    for ``relay_permissions`` (default: the relays' own IPs, the addresses relayed peers'
    datagrams come from); ``on_relayed_change`` is called whenever `relayed_addresses`
    changes. When an allocation is lost, the connections that went through it are closed.
    """

    def __init__(
        self,
        host_key: ed25519.Ed25519PrivateKey,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout: float = 30.0,
        keep_alive: float | None = 15.0,
        max_connections: int = 1024,
        max_handshaking: int = 128,
        handshake_timeout: float = 10.0,
        clock: Callable[[], dt.datetime] = _wall_clock,
        relays: Sequence[RelayClientConfig] = (),
        relay_permissions: Iterable[str] | None = None,
        on_relayed_change: Callable[[], None] | None = None,
    ) -> None:
        self._host_key = host_key
        self._bind = (host, port)
        self._idle_timeout = idle_timeout
        self._keep_alive = keep_alive
        self._max_connections = max_connections
        self._max_handshaking = max_handshaking
        self._handshake_timeout = handshake_timeout
        self._clock = clock
        self._certified: CertifiedKey | None = None
        self._socket: anyio.abc.UDPSocket | None = None
        self._local_address: Address | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._by_cid: dict[bytes, QuicConnectionHandle] = {}
        self._send_lock = anyio.Lock()
        self._raw_socket: socket.socket | None = None
        self._connections: set[QuicConnectionHandle] = set()
        self._accept_send, self._accept_receive = anyio.create_memory_object_stream[
            QuicConnectionHandle
        ](MAX_PENDING_CONNECTIONS)
        version = ipaddress.ip_address(host).version
        for relay in relays:
            if ipaddress.ip_address(relay.server[0]).version != version:
                raise TransportError(
                    f"relay {relay.address} is not of the IP version of the socket ({host})"
                )
        self._relay_configs = list(relays)
        self._relay_ips = frozenset(relay.server[0] for relay in relays)
        self._relay_permissions = (
            set(self._relay_ips) if relay_permissions is None else set(relay_permissions)
        )
        self._on_relayed_change = on_relayed_change
        self._relay_sessions: dict[Address, TurnSession] = {}
        """By relay server address: where TURN datagrams come from."""
        self._relay_routes: dict[Address, TurnSession] = {}
        """Peers (their relayed addresses) reached through an allocation, and which."""
        self._relayed_seen: dict[TurnSession, Address | None] = {}
        self._relay_changed_event = anyio.Event()

    @property
    def peer_id(self) -> PeerId:
        """Our peer ID, as peers will derive it from our certificate."""
        return peer_id_of(self._host_key.public_key())

    @property
    def local_address(self) -> Address:
        """The bound address (the real port when 0 was asked for); kept after closing."""
        if self._local_address is None:
            raise TransportError("endpoint is not open")
        return self._local_address

    @property
    def relayed_addresses(self) -> list[Address]:
        """The relayed addresses of the allocations held now (empty without relays)."""
        return [
            relayed
            for session in self._relay_sessions.values()
            if (relayed := session.relayed) is not None
        ]

    @property
    def mapped_addresses(self) -> list[Address]:
        """Our address as each relay sees it (STUN's XOR-MAPPED-ADDRESS of the allocations):
        behind a NAT, the public address and port this socket is mapped to."""
        return [
            mapped
            for session in self._relay_sessions.values()
            if (mapped := session.mapped) is not None
        ]

    @property
    def relay_sessions(self) -> list[TurnSession]:
        return list(self._relay_sessions.values())

    async def __aenter__(self) -> Self:
        self._certified = generate_certificate(self._host_key, now=self._clock())
        host, port = self._bind
        if ipaddress.ip_address(host).version == 6:
            self._socket = await anyio.create_udp_socket(
                family=socket.AF_INET6, local_host=host, local_port=port
            )
        else:
            self._socket = await anyio.create_udp_socket(
                family=socket.AF_INET, local_host=host, local_port=port
            )
        address = self._socket.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
        self._local_address = (str(address[0]), int(address[1]))
        raw = self._socket.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
        # Only a plain non-blocking socket may be used beside the event loop (trio hands one
        # out; asyncio's transport wraps its socket, and keeps the event-loop path).
        if isinstance(raw, socket.socket) and raw.gettimeout() == 0.0:
            self._raw_socket = raw
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._receive_loop)
        for relay in self._relay_configs:
            session = TurnSession(
                relay,
                self._send_now,
                permissions=self._relay_permissions,
                on_change=self._relay_changed,
            )
            self._relay_sessions[session.server] = session
            self._task_group.start_soon(session.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        assert self._socket is not None
        suppress: bool | None = None
        try:
            with anyio.CancelScope(shield=True):
                # Tell every peer we are going, then stop; draining is not worth waiting for.
                for connection in list(self._connections):
                    connection._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="bye")
                    await self._send_datagrams(
                        connection._quic.datagrams_to_send(now=anyio.current_time())
                    )
        finally:
            self._task_group.cancel_scope.cancel()
        try:
            suppress = await self._task_group.__aexit__(exc_type, exc, traceback)
        finally:
            self._accept_send.close()
            self._accept_receive.close()
            with anyio.CancelScope(shield=True):
                await self._socket.aclose()
        return suppress

    async def connect(
        self,
        address: Address,
        *,
        expected_peer_id: PeerId | None = None,
        via_relay: bool | None = None,
    ) -> QuicConnectionHandle:
        """Dial ``address`` (an IP literal and port) and complete the libp2p handshake.

        With ``expected_peer_id`` (from ``/p2p/<id>``), a peer proving any
        other ID is refused with `PeerIdMismatch`. Bound the wait with ``anyio.fail_after``.

        ``via_relay``: True dials through one of our allocations (waiting for one if none is
        ready; `RelayUnavailable` without relays), False dials directly, None (the default)
        goes through a relay when ``address`` is on one of the configured relays' IPs (a
        relayed address). Dialing through an allocation first makes sure it has a permission
        for the target's IP (`RelayRefused` if the relay will not give one).
        """
        host, port = address
        ipaddress.ip_address(host)  # IP literals only; resolution belongs to the host layer
        session = await self._relay_for(address, via_relay)
        quic = _Libp2pQuicConnection(
            configuration=self._configuration(is_client=True),
            expected_peer_id=expected_peer_id,
            clock=self._clock,
        )
        connection = QuicConnectionHandle(self, quic, (host, port), is_initiator=True)
        if session is not None:
            self._relay_routes[(host, port)] = session
        quic.connect((host, port), now=anyio.current_time())
        self._start(connection, [quic.host_cid])
        try:
            await connection.wait_established()
        except BaseException:
            quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="dial abandoned")
            connection._wake()
            raise
        return connection

    async def accept(self) -> QuicConnectionHandle:
        """Wait for the next inbound connection whose handshake and verification succeeded."""
        try:
            return await self._accept_receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TransportError("endpoint closed") from None

    def accept_nowait(self) -> QuicConnectionHandle | None:
        """The next inbound connection if one is waiting, else None (never blocks).

        Handshakes can complete many per scheduling round; an accept loop that takes every
        waiting connection each time it wakes keeps the queue from filling up.
        """
        try:
            return self._accept_receive.receive_nowait()
        except anyio.WouldBlock:
            return None
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TransportError("endpoint closed") from None

    # --- internals: relays -----------------------------------------------------------------

    async def _relay_for(self, address: Address, via_relay: bool | None) -> TurnSession | None:
        if via_relay is False or (via_relay is None and address[0] not in self._relay_ips):
            return None
        if not self._relay_sessions:
            raise RelayUnavailable(
                f"cannot dial {address[0]}:{address[1]} through a relay: no relay is configured "
                "(give the host relays=[RelayClientConfig(address=…, username=…, password=…)])"
            )
        while True:
            for session in self._relay_sessions.values():
                if session.relayed is not None:
                    await session.ensure_permission(address[0])
                    return session
            errors = [session.last_error for session in self._relay_sessions.values()]
            if all(errors):
                raise RelayUnavailable(
                    f"cannot dial {address[0]}:{address[1]} through a relay: no allocation ("
                    + "; ".join(
                        f"{s.config.address}: {s.last_error}" for s in self._relay_sessions.values()
                    )
                    + ")"
                )
            await self._relay_changed_event.wait()

    def _relay_changed(self, session: TurnSession) -> None:
        relayed = session.relayed
        before = self._relayed_seen.get(session)
        self._relayed_seen[session] = relayed
        event, self._relay_changed_event = self._relay_changed_event, anyio.Event()
        event.set()
        if before == relayed:
            return
        if before is not None:
            # The peers knew us by the old relayed address: those connections cannot go on.
            routed = {peer for peer, via in self._relay_routes.items() if via is session}
            for connection in list(self._connections):
                if connection.remote_address in routed:
                    connection.close("relay allocation lost")
        if self._on_relayed_change is not None:
            self._on_relayed_change()

    def _relay_datagram(self, session: TurnSession, data: bytes) -> None:
        unwrapped = session.feed(data)
        if unwrapped is None:
            return
        peer, payload = unwrapped
        if self._quic_datagram_received(payload, peer):
            self._relay_routes[peer] = session

    # --- internals ------------------------------------------------------------------------

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        assert self._certified is not None
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            certificate=self._certified.certificate,
            private_key=self._certified.private_key,
            verify_mode=ssl.CERT_NONE,  # verified by _Libp2pQuicConnection instead of a CA
            supported_versions=[QuicProtocolVersion.VERSION_1],
            connection_id_length=_CONNECTION_ID_LENGTH,
            idle_timeout=self._idle_timeout,
            server_name=None,  # libp2p clients must not send SNI
            max_stream_data=STREAM_WINDOW,
        )

    def _start(self, connection: QuicConnectionHandle, cids: list[bytes]) -> None:
        assert self._task_group is not None
        self._connections.add(connection)
        for cid in cids:
            connection._local_cids.add(cid)
            self._register(cid, connection)
        self._task_group.start_soon(connection._drive)

    def _register(self, cid: bytes, connection: QuicConnectionHandle) -> None:
        self._by_cid[cid] = connection

    def _unregister(self, cid: bytes, connection: QuicConnectionHandle) -> None:
        if self._by_cid.get(cid) is connection:
            del self._by_cid[cid]

    def _connection_established(self, connection: QuicConnectionHandle) -> None:
        try:
            self._accept_send.send_nowait(connection)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            connection._quic.close(
                error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="busy"
            )
            connection._wake()

    def _connection_ended(self, connection: QuicConnectionHandle) -> None:
        self._connections.discard(connection)
        for cid in connection._local_cids:
            self._unregister(cid, connection)
        peer = connection.remote_address
        if peer in self._relay_routes and not any(
            other.remote_address == peer for other in self._connections
        ):
            del self._relay_routes[peer]

    def _send_now(self, data: bytes, address: Address) -> None:
        """Best-effort send from synchronous code (a full kernel buffer drops the datagram)."""
        raw = self._raw_socket
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.sendto(data, address)
        elif self._task_group is not None:
            self._task_group.start_soon(self._send_datagrams, [(data, address)])

    def _route(self, data: bytes, target: Address) -> tuple[bytes, Address] | None:
        """What to send where: through the relay allocation that reaches ``target``, if any
        (None while it has no allocation: as lost as any datagram), else as it is."""
        session = self._relay_routes.get(target) if self._relay_routes else None
        if session is None:
            return data, target
        wrapped = session.wrap(target, data)
        return None if wrapped is None else (wrapped, session.server)

    def _send_datagrams_now(
        self, datagrams: list[tuple[bytes, Address]]
    ) -> list[tuple[bytes, Address]]:
        """Send without waiting, in order, while the kernel takes them; the rest (all of them
        when another task is sending through the event loop) is returned for `_send_datagrams`.
        The socket is non-blocking, so trying the kernel directly and only going through the
        event loop when its buffer is full halves the CPU per packet."""
        raw = self._raw_socket
        if raw is None or self._send_lock.locked():
            return datagrams
        for index, (data, target) in enumerate(datagrams):
            routed = self._route(data, target)
            if routed is None:
                continue
            try:
                raw.sendto(*routed)
            except BlockingIOError:
                return datagrams[index:]
            except OSError as exc:  # unreachable and the like: QUIC's loss recovery copes
                _log.debug("sendto %s:%s failed: %s", routed[1][0], routed[1][1], exc)
        return []

    async def _send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """`_send_datagrams_now`, then what the kernel did not take through the event loop."""
        assert self._socket is not None
        for data, target in self._send_datagrams_now(datagrams):
            routed = self._route(data, target)
            if routed is None:
                continue
            payload, (host, port) = routed
            try:
                # anyio allows one sender per socket at a time; drivers take turns.
                async with self._send_lock:
                    await self._socket.sendto(payload, host, port)
            except OSError as exc:  # unreachable and the like: QUIC's loss recovery copes
                _log.debug("sendto %s:%s failed: %s", host, port, exc)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            try:
                data, address = await self._socket.receive()
            except ConnectionError as exc:  # an ICMP error surfacing on the socket
                _log.debug("UDP receive error ignored: %s", exc)
                continue
            except (anyio.ClosedResourceError, anyio.EndOfStream):
                return
            self._datagram_received(data, (str(address[0]), int(address[1])))
            # Drain what else is queued without a trip through the event loop per datagram;
            # the connections woken meanwhile then answer the whole batch at once.
            if self._raw_socket is not None:
                self._drain(self._raw_socket)

    def _drain(self, raw: socket.socket) -> None:
        for _ in range(_RECEIVE_BATCH):
            try:
                data, address = raw.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError as exc:
                _log.debug("UDP receive error ignored: %s", exc)
                continue
            except OSError:  # closed under us: the awaited receive will report it
                return
            self._datagram_received(data, (str(address[0]), int(address[1])))

    def _datagram_received(self, data: bytes, address: Address) -> None:
        if self._relay_sessions:
            session = self._relay_sessions.get(address)
            if session is not None:
                self._relay_datagram(session, data)
                return
        self._quic_datagram_received(data, address)

    def _quic_datagram_received(self, data: bytes, address: Address) -> bool:
        """Feed one QUIC datagram; whether a connection took it (or was made for it)."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=_CONNECTION_ID_LENGTH)
        except ValueError:
            return False
        connection = self._by_cid.get(header.destination_cid)
        if connection is not None:
            connection._quic.receive_datagram(data, address, now=anyio.current_time())
            connection._take_events()
            connection._wake()
            return True
        if (
            header.version is not None
            and header.version != QuicProtocolVersion.VERSION_1
            and header.version != QuicProtocolVersion.NEGOTIATION
            and len(data) >= _MIN_INITIAL_DATAGRAM
        ):
            # RFC 9000 §6.1: a client offering another version learns that we speak v1. Only
            # for full-size datagrams, so the answer (a few dozen bytes) never amplifies.
            self._send_now(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=[QuicProtocolVersion.VERSION_1],
                ),
                address,
            )
            return False
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version != QuicProtocolVersion.VERSION_1
            or len(data) < _MIN_INITIAL_DATAGRAM
        ):
            return False
        handshaking = sum(not c._handshake_settled.is_set() for c in self._connections)
        if len(self._connections) >= self._max_connections or handshaking >= self._max_handshaking:
            return False  # a hard ceiling; the connection manager enforces the real limits
        quic = _Libp2pQuicConnection(
            configuration=self._configuration(is_client=False),
            expected_peer_id=None,
            clock=self._clock,
            original_destination_connection_id=header.destination_cid,
        )
        connection = QuicConnectionHandle(self, quic, address, is_initiator=False)
        # The client addresses us by its chosen ID until it learns ours.
        self._start(connection, [header.destination_cid, quic.host_cid])
        quic.receive_datagram(data, address, now=anyio.current_time())
        connection._wake()
        return True
