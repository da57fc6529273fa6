"""The TURN client (RFC 8656) a host uses to be reachable through a relay, and to dial through one.

`TurnClient` is sans-IO, like the server core: it takes datagrams from the relay and the time,
and hands back datagrams to send, a timer and events; it reads no clock and owns no socket.
`TurnSession` drives one on anyio over a socket someone else owns (the QUIC endpoint's: TURN
and QUIC share one UDP socket, and the endpoint hands every datagram from the relay's address
to the session).

The client's rules:

- Allocate goes out first without credentials; the 401 brings REALM and NONCE, and the request
  is repeated signed (MESSAGE-INTEGRITY with the long-term key). A 438 (stale nonce) brings a
  new NONCE and the request is repeated, at most twice in a row. Another 401 on a signed
  request is final: the credentials are wrong.
- An Allocate answered 437 (the relay still holds an allocation for our address, e.g. after we
  lost track of it) deletes that allocation (Refresh with lifetime 0) and asks again, once.
- Requests are retransmitted as RFC 8489 section 6.2.1 says: RTO 0.5 s doubling, 7 sends, then
  16 RTO of waiting (39.5 s in all); ``rto`` and ``max_transmissions`` make it shorter.
- Once allocated: a Refresh every ``keepalive`` seconds (at most half the lifetime). It keeps
  the allocation and the NAT binding alive, and it is how a lost allocation is noticed: a
  refresh answered 437 (a restarted relay) or not answered at all ends the allocation
  (`AllocationLost`). Any request timing out after the allocation is made ends it too.
- Permissions are kept for every IP asked for (`add_permission`; the relay's own IP is asked
  for at our relayed port, the one port a relay admits there), refreshed together every
  240 s (they last 300 s). ChannelBind is asked for a peer the first time data is sent to it;
  until the relay confirms, data goes in Send indications, after it as ChannelData (4 bytes of
  overhead instead of about 36). Channels used since their last refresh are refreshed every
  300 s (they last 600 s); idle ones are let go.
- Successful answers must carry a MESSAGE-INTEGRITY that verifies with our key; errors may
  lack one (401 and 438 always do) but if they carry one it must verify. Other answers, and
  answers to no outstanding transaction, are dropped.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from teia.errors import ConfigError, InvalidStunMessage, RelayRefused, RelayUnavailable
from teia.relay import stun
from teia.relay.auth import rest_password
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method, StunMessage

__all__ = [
    "AllocationCreated",
    "AllocationFailed",
    "AllocationLost",
    "ChannelBound",
    "PermissionRefused",
    "PermissionsInstalled",
    "RelayClientConfig",
    "TurnClient",
    "TurnEvent",
    "TurnSession",
    "TurnState",
]

Address = tuple[str, int]

_UDP_TRANSPORT = bytes([17, 0, 0, 0])
PERMISSION_REFRESH = 240.0
"""Seconds between permission refreshes (they last 300 s on the relay)."""
CHANNEL_REFRESH = 300.0
"""Seconds between channel refreshes (they last 600 s on the relay)."""
_MAX_STALE_RETRIES = 2
_REST_VALIDITY = 24 * 3600


_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?",
    re.IGNORECASE,
)
_resolved: dict[Address, Address] = {}
_resolved_lock = threading.Lock()


def _parse_address(text: str) -> Address:
    """``IP:PORT``, ``[V6]:PORT`` or ``NAME:PORT`` → ``(ip, port)``; a name is resolved (once
    per process, see `resolve_relay_name`)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(
            f"relay address {text!r} must be HOST:PORT (e.g. 203.0.113.7:3478 or "
            "relay.example.org:3478)"
        )
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"relay address {text!r}: {host!r} is neither an IP address nor a name")
    return resolve_relay_name(host, int(port))


def resolve_relay_name(name: str, port: int) -> Address:
    """The address a relay's DNS name stands for, from the system resolver (``getaddrinfo``:
    /etc/hosts, DNS …): its first IPv4 address, else its first IPv6 one (a host talks to a
    relay from the listen socket of the relay's IP version, and most listen on IPv4; write
    ``[V6]:PORT`` to choose IPv6). Resolved once per process, when the first configuration
    naming it is made (at start), then reused: every part of a peer sees the same relay IP,
    which is what its permissions and relayed addresses are about. A name that does not
    resolve is a `ConfigError`."""
    key = (name.lower().rstrip("."), port)
    with _resolved_lock:
        known = _resolved.get(key)
    if known is not None:
        return known
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"relay address {name}:{port}: cannot resolve {name!r}: {reason}"
        ) from None
    ips = [
        ipaddress.ip_address(info[4][0])
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)
    ]
    if not ips:
        raise ConfigError(f"relay address {name}:{port}: {name!r} has no IP address")
    ip = next((ip for ip in ips if ip.version == 4), ips[0])
    with _resolved_lock:
        return _resolved.setdefault(key, (str(ip), port))


@dataclass(frozen=True)
class RelayClientConfig:
    """A relay this host allocates on, and how it logs in.

    Production peers get credentials from the relay's operator: a static ``username`` and
    ``password``, or time-limited REST credentials minted by the operator's backend (then
    ``username`` is ``EXPIRY:USER`` and ``password`` the backend's answer). ``rest_secret`` mints
    such credentials locally from the relay's shared secret: only for deployments where the
    host is trusted with that secret (tests, an operator's own nodes), since whoever holds it
    can mint credentials for anyone.
    """

    address: str
    """``IP:PORT`` of the relay's STUN/TURN port (``[V6]:PORT`` for IPv6), or ``NAME:PORT``
    with a DNS name, resolved when the configuration is made (`resolve_relay_name`)."""
    username: str = ""
    password: str = field(default="", repr=False)
    rest_secret: str = field(default="", repr=False)
    rest_user: str = "teia"
    """The USER part of locally minted REST usernames (``EXPIRY:USER``)."""
    lifetime: int = 600
    """Seconds of allocation lifetime asked for (the relay caps it)."""
    keepalive: float = 25.0
    """Seconds between Refreshes: keeps NAT bindings open and notices a lost allocation."""
    rto: float = 0.5
    """Initial retransmission timeout of a request (RFC 8489: 0.5 s)."""
    max_transmissions: int = 7

    _server: Address = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_server", _parse_address(self.address))
        if not self.rest_secret and not (self.username and self.password):
            raise ConfigError(
                f"relay {self.address}: give username and password (from the relay's operator), "
                "or rest_secret"
            )
        if self.keepalive <= 0 or self.rto <= 0 or self.max_transmissions < 1:
            raise ConfigError(
                f"relay {self.address}: keepalive, rto and max_transmissions must be positive"
            )

    @property
    def server(self) -> Address:
        """``(ip, port)`` of the relay (a name already resolved)."""
        return self._server

    def credentials(self, wall_clock: float) -> tuple[str, str]:
        """``(username, password)`` for a new allocation (REST ones minted now, valid 24 h)."""
        if self.rest_secret:
            username = f"{int(wall_clock) + _REST_VALIDITY}:{self.rest_user}"
            return username, rest_password(self.rest_secret.encode(), username)
        return self.username, self.password


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocationCreated:
    relayed: Address
    """The relayed transport address peers send to."""
    mapped: Address | None
    """Our address as the relay saw it (server-reflexive)."""
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """Allocate was refused (``code``) or never answered (``code`` 0)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class AllocationLost:
    """A made allocation ended: a refresh refused (437 after a relay restart) or unanswered."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PermissionsInstalled:
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PermissionRefused:
    ips: tuple[str, ...]
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelBound:
    peer: Address
    channel: int


TurnEvent = (
    AllocationCreated
    | AllocationFailed
    | AllocationLost
    | PermissionsInstalled
    | PermissionRefused
    | ChannelBound
)


class TurnState(enum.Enum):
    IDLE = "idle"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    FAILED = "failed"
    """Terminal: the allocation failed or was lost; make a new client to try again."""
    CLOSED = "closed"


# --- the sans-IO client -------------------------------------------------------------------------


@dataclass(eq=False)
class _Transaction:
    kind: str  # "allocate", "refresh", "permission", "channel", "release"
    method: Method
    attributes: list[tuple[int, bytes]]
    peers: tuple[Address, ...]
    tid: bytes = b""
    data: bytes = b""
    sends: int = 0
    next_at: float = 0.0
    interval: float = 0.0
    auth_retried: bool = False
    stale_retries: int = 0
    channel: int = 0
    signed: bool = False


class TurnClient:
    """One allocation on one relay, sans-IO. Not thread-safe: one task drives it."""

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        *,
        lifetime: int = 600,
        keepalive: float = 25.0,
        rto: float = 0.5,
        max_transmissions: int = 7,
        channels: bool = True,
        software: str = "teia",
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.server = server
        self._username = username
        self._password = password
        self._lifetime = lifetime
        self._keepalive = keepalive
        self._rto = rto
        self._max_transmissions = max_transmissions
        self._use_channels = channels
        self._software = software
        self._random = random
        self.state = TurnState.IDLE
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self._realm = ""
        self._nonce = ""
        self._key: bytes | None = None
        self._transactions: dict[bytes, _Transaction] = {}
        self._outgoing: list[bytes] = []
        self._events: deque[TurnEvent] = deque()
        self._expires = math.inf
        self._refresh_at = math.inf
        self._wanted: set[str] = set()
        self._installed: set[str] = set()
        self._permission_refresh_at = math.inf
        self._channels: dict[int, Address] = {}
        self._channel_of: dict[Address, int] = {}
        self._channel_used: set[int] = set()
        self._channel_pending: set[Address] = set()
        self._no_channel: set[Address] = set()
        self._next_channel = stun.CHANNEL_MIN
        self._channel_refresh_at = math.inf
        self._reallocate_after_release = False

    # --- API ------------------------------------------------------------------------------

    @property
    def permissions(self) -> frozenset[str]:
        """Peer IPs with an installed permission."""
        return frozenset(self._installed)

    def allocate(self, now: float) -> None:
        if self.state is not TurnState.IDLE:
            raise RuntimeError(f"allocate in state {self.state.value}")
        self.state = TurnState.ALLOCATING
        self._start_allocate(now)

    def add_permission(self, ip: str, now: float) -> None:
        """Keep a permission for ``ip`` (installed once allocated, then refreshed)."""
        ipaddress.ip_address(ip)
        if ip in self._wanted:
            return
        self._wanted.add(ip)
        if self.state is TurnState.ALLOCATED:
            self._request_permissions([ip], now)

    def close(self, now: float) -> None:
        """Delete the allocation (a Refresh with lifetime 0, sent once, not retransmitted)."""
        if self.state is TurnState.ALLOCATED and self._key is not None:
            transaction = _Transaction(
                "release", Method.REFRESH, [(Attr.LIFETIME, (0).to_bytes(4, "big"))], ()
            )
            self._send(transaction, now, retransmit=False)
        self.state = TurnState.CLOSED
        self._transactions.clear()
        self.relayed = None

    def wrap(self, peer: Address, data: bytes, now: float) -> bytes | None:
        """``data`` for ``peer`` as the relay wants it (ChannelData or a Send indication);
        None when there is no allocation to send through."""
        if self.state is not TurnState.ALLOCATED:
            return None
        channel = self._channel_of.get(peer)
        if channel is not None:
            self._channel_used.add(channel)
            return stun.encode_channel_data(channel, data)
        if (
            self._use_channels
            and peer not in self._channel_pending
            and peer not in self._no_channel
            and peer[0] in self._installed
        ):
            self._request_channel(peer, now)
        builder = MessageBuilder(Method.SEND, MessageClass.INDICATION, self._random(12))
        builder.add_xor_address(Attr.XOR_PEER_ADDRESS, *peer)
        builder.add(Attr.DATA, data)
        return builder.finish()

    def receive_datagram(self, data: bytes, now: float) -> tuple[Address, bytes] | None:
        """A datagram from the relay: peer data comes back as ``(peer, payload)``; responses
        update the state (then look at ``datagrams_to_send`` and ``next_event``)."""
        if stun.is_channel_data(data):
            try:
                channel, payload = stun.parse_channel_data(data)
            except InvalidStunMessage:
                return None
            peer = self._channels.get(channel)
            return None if peer is None else (peer, payload)
        try:
            message = stun.parse(data)
        except InvalidStunMessage:
            return None
        if message.cls is MessageClass.INDICATION:
            if message.method != Method.DATA or self.state is not TurnState.ALLOCATED:
                return None
            raw_peer = message.get(Attr.XOR_PEER_ADDRESS)
            data_value = message.get(Attr.DATA)
            if raw_peer is None or data_value is None:
                return None
            try:
                peer = stun.decode_xor_address(raw_peer, message.transaction_id)
            except InvalidStunMessage:
                return None
            return peer, data_value
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            transaction = self._transactions.get(message.transaction_id)
            if transaction is not None and message.method == transaction.method:
                self._answer(transaction, message, now)
        return None

    def handle_timer(self, now: float) -> None:
        if self.state in (TurnState.FAILED, TurnState.CLOSED):
            return
        for transaction in list(self._transactions.values()):
            if transaction.next_at <= now and transaction.tid in self._transactions:
                self._retransmit(transaction, now)
                if self._ended():
                    return
        if self.state is not TurnState.ALLOCATED:
            return
        if now >= self._expires:
            self._fail(AllocationLost(0, "the allocation expired unrefreshed"))
            return
        if now >= self._refresh_at:
            self._refresh_at = math.inf
            self._request_refresh(now)
        if now >= self._permission_refresh_at:
            self._permission_refresh_at = now + PERMISSION_REFRESH
            if self._installed:
                self._request_permissions(sorted(self._installed), now)
        if now >= self._channel_refresh_at:
            self._channel_refresh_at = now + CHANNEL_REFRESH
            self._refresh_channels(now)

    def get_timer(self) -> float | None:
        if self.state in (TurnState.FAILED, TurnState.CLOSED, TurnState.IDLE):
            return None
        deadline = min((t.next_at for t in self._transactions.values()), default=math.inf)
        if self.state is TurnState.ALLOCATED:
            deadline = min(
                deadline,
                self._expires,
                self._refresh_at,
                self._permission_refresh_at,
                self._channel_refresh_at,
            )
        return None if deadline == math.inf else deadline

    def datagrams_to_send(self) -> list[bytes]:
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def next_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    # --- requests -------------------------------------------------------------------------

    def _start_allocate(self, now: float) -> None:
        attributes: list[tuple[int, bytes]] = [(Attr.REQUESTED_TRANSPORT, _UDP_TRANSPORT)]
        attributes.append((Attr.LIFETIME, self._lifetime.to_bytes(4, "big")))
        self._send(_Transaction("allocate", Method.ALLOCATE, attributes, ()), now)

    def _request_refresh(self, now: float) -> None:
        attributes: list[tuple[int, bytes]] = [(Attr.LIFETIME, self._lifetime.to_bytes(4, "big"))]
        self._send(_Transaction("refresh", Method.REFRESH, attributes, ()), now)

    def _request_permissions(self, ips: Iterable[str], now: float) -> None:
        # A permission is per IP, so the port is 0, except on the relay's own address: a relay
        # admits that only at a live allocation of its own (no other port there), so we name
        # ours (the permission then covers every allocation on it, as any permission would).
        relayed = self.relayed
        peers = tuple(
            (ip, relayed[1])
            if relayed is not None and str(ipaddress.ip_address(ip)) == relayed[0]
            else (ip, 0)
            for ip in ips
        )
        self._send(_Transaction("permission", Method.CREATE_PERMISSION, [], peers), now)

    def _request_channel(self, peer: Address, now: float, channel: int | None = None) -> None:
        if channel is None:
            if len(self._channels) >= stun.CHANNEL_MAX - stun.CHANNEL_MIN + 1:
                self._no_channel.add(peer)
                return
            channel = self._next_channel
            while channel in self._channels:
                channel = channel + 1 if channel < stun.CHANNEL_MAX else stun.CHANNEL_MIN
            self._next_channel = channel + 1 if channel < stun.CHANNEL_MAX else stun.CHANNEL_MIN
            self._channel_pending.add(peer)
        number = channel.to_bytes(2, "big") + b"\x00\x00"
        transaction = _Transaction(
            "channel", Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number)], (peer,)
        )
        transaction.channel = channel
        self._send(transaction, now)

    def _refresh_channels(self, now: float) -> None:
        for channel, peer in list(self._channels.items()):
            if channel in self._channel_used:
                self._request_channel(peer, now, channel)
            else:  # idle: let the relay's binding expire, and stop using it now
                del self._channels[channel]
                self._channel_of.pop(peer, None)
        self._channel_used.clear()

    def _build(self, transaction: _Transaction) -> bytes:
        builder = MessageBuilder(transaction.method, MessageClass.REQUEST, transaction.tid)
        for attr, value in transaction.attributes:
            builder.add(attr, value)
        for peer in transaction.peers:
            builder.add_xor_address(Attr.XOR_PEER_ADDRESS, *peer)
        if self._software:
            builder.add_text(Attr.SOFTWARE, self._software)
        if self._key is None:
            return builder.finish(fingerprint=True)
        builder.add_text(Attr.USERNAME, self._username)
        builder.add_text(Attr.REALM, self._realm)
        builder.add_text(Attr.NONCE, self._nonce)
        return builder.finish(key=self._key, fingerprint=True)

    def _send(self, transaction: _Transaction, now: float, *, retransmit: bool = True) -> None:
        self._transactions.pop(transaction.tid, None)
        transaction.tid = self._random(12)
        transaction.signed = self._key is not None
        transaction.data = self._build(transaction)
        transaction.sends = 1
        transaction.interval = self._rto
        transaction.next_at = now + self._rto
        if self._max_transmissions == 1:
            transaction.next_at = now + 16 * self._rto
        self._outgoing.append(transaction.data)
        if retransmit:
            self._transactions[transaction.tid] = transaction

    def _retransmit(self, transaction: _Transaction, now: float) -> None:
        if transaction.sends >= self._max_transmissions:
            del self._transactions[transaction.tid]
            self._timed_out(transaction)
            return
        transaction.sends += 1
        transaction.interval *= 2
        self._outgoing.append(transaction.data)
        if transaction.sends >= self._max_transmissions:
            transaction.next_at = now + 16 * self._rto
        else:
            transaction.next_at = now + transaction.interval

    def _timed_out(self, transaction: _Transaction) -> None:
        if transaction.kind == "allocate":
            self._fail(AllocationFailed(0, "the relay did not answer Allocate"))
        elif self.state is TurnState.ALLOCATED:
            self._fail(AllocationLost(0, f"the relay did not answer {transaction.kind}"))

    # --- answers --------------------------------------------------------------------------

    def _answer(self, transaction: _Transaction, message: StunMessage, now: float) -> None:
        code, reason = 0, ""
        if message.cls is MessageClass.ERROR:
            raw = message.get(Attr.ERROR_CODE)
            try:
                code, reason = stun.decode_error_code(raw or b"")
            except InvalidStunMessage:
                code, reason = 400, "malformed error answer"
        if code in (401, 438):
            if not self._challenge(transaction, message, code, now):
                self._refused(transaction, code, reason or "credentials refused", now)
            return
        checked = message.has_integrity or message.cls is MessageClass.SUCCESS
        if self._key is not None and checked and not message.verify_integrity(self._key):
            return  # not from our relay, or tampered with: keep waiting
        del self._transactions[transaction.tid]
        if code:
            self._refused(transaction, code, reason, now)
            return
        try:
            self._succeeded(transaction, message, now)
        except InvalidStunMessage as exc:
            self._refused(transaction, 400, f"malformed answer: {exc}", now)

    def _challenge(
        self, transaction: _Transaction, message: StunMessage, code: int, now: float
    ) -> bool:
        """Repeat a request answered 401/438 with the realm and nonce it brought; False when
        it must not be repeated (wrong credentials, too many stale nonces, no nonce)."""
        try:
            realm = stun.decode_text(Attr.REALM, message.get(Attr.REALM) or b"")
            nonce = stun.decode_text(Attr.NONCE, message.get(Attr.NONCE) or b"")
        except InvalidStunMessage:
            return False
        if not nonce or not (realm or self._realm):
            return False
        if code == 401:
            if transaction.signed:  # a signed request refused: one more try, for a new realm
                if transaction.auth_retried:
                    return False
                transaction.auth_retried = True
        else:
            if transaction.stale_retries >= _MAX_STALE_RETRIES or self._key is None:
                return False
            transaction.stale_retries += 1
        if realm and realm != self._realm:
            self._realm = realm
            try:
                self._key = stun.long_term_key(self._username, realm, self._password)
            except ValueError:
                return False
        elif self._key is None:
            self._key = stun.long_term_key(self._username, self._realm, self._password)
        self._nonce = nonce
        self._send(transaction, now)
        return True

    def _refused(self, transaction: _Transaction, code: int, reason: str, now: float) -> None:
        self._transactions.pop(transaction.tid, None)
        kind = transaction.kind
        if kind == "allocate":
            if code == 437 and not self._reallocate_after_release and self._key is not None:
                # The relay holds an allocation for our address that we no longer track.
                self._reallocate_after_release = True
                release = _Transaction(
                    "release-then-allocate",
                    Method.REFRESH,
                    [(Attr.LIFETIME, (0).to_bytes(4, "big"))],
                    (),
                )
                self._send(release, now)
                return
            self._fail(AllocationFailed(code, reason))
        elif kind == "release-then-allocate":
            self._start_allocate(now)
        elif kind == "permission":
            ips = tuple(ip for ip, _ in transaction.peers)
            if code == 437 or code == 401:
                self._fail(AllocationLost(code, reason))
                return
            for ip in ips:
                self._wanted.discard(ip)
                self._installed.discard(ip)
            self._events.append(PermissionRefused(ips, code, reason))
        elif kind == "channel":
            peer = transaction.peers[0]
            self._channel_pending.discard(peer)
            if code in (437, 401):
                self._fail(AllocationLost(code, reason))
                return
            self._no_channel.add(peer)
            bound = self._channels.get(transaction.channel)
            if bound == peer:
                del self._channels[transaction.channel]
                self._channel_of.pop(peer, None)
        elif kind == "refresh" and self.state is TurnState.ALLOCATED:
            self._fail(AllocationLost(code, reason))

    def _succeeded(self, transaction: _Transaction, message: StunMessage, now: float) -> None:
        kind = transaction.kind
        if kind == "allocate":
            raw_relayed = message.get(Attr.XOR_RELAYED_ADDRESS)
            if raw_relayed is None:
                raise InvalidStunMessage("Allocate success without XOR-RELAYED-ADDRESS")
            self.relayed = stun.decode_xor_address(raw_relayed, message.transaction_id)
            raw_mapped = message.get(Attr.XOR_MAPPED_ADDRESS)
            if raw_mapped is not None:
                self.mapped = stun.decode_xor_address(raw_mapped, message.transaction_id)
            lifetime = self._lifetime_of(message)
            self.state = TurnState.ALLOCATED
            self._schedule_refresh(lifetime, now)
            self._permission_refresh_at = now + PERMISSION_REFRESH
            self._channel_refresh_at = now + CHANNEL_REFRESH
            self._events.append(AllocationCreated(self.relayed, self.mapped, lifetime))
            if self._wanted:
                self._request_permissions(sorted(self._wanted), now)
        elif kind == "release-then-allocate":
            self._start_allocate(now)
        elif kind == "refresh":
            if self.state is TurnState.ALLOCATED:
                self._schedule_refresh(self._lifetime_of(message), now)
        elif kind == "permission":
            ips = tuple(ip for ip, _ in transaction.peers if ip in self._wanted)
            self._installed.update(ips)
            self._events.append(PermissionsInstalled(ips))
        elif kind == "channel":
            peer = transaction.peers[0]
            self._channel_pending.discard(peer)
            if peer not in self._channel_of:
                self._channels[transaction.channel] = peer
                self._channel_of[peer] = transaction.channel
                self._events.append(ChannelBound(peer, transaction.channel))

    def _lifetime_of(self, message: StunMessage) -> int:
        raw = message.get(Attr.LIFETIME)
        return self._lifetime if raw is None else stun.decode_lifetime(raw)

    def _schedule_refresh(self, lifetime: int, now: float) -> None:
        self._expires = now + lifetime
        self._refresh_at = now + min(self._keepalive, lifetime / 2)

    def _ended(self) -> bool:
        return self.state in (TurnState.FAILED, TurnState.CLOSED)

    def _fail(self, event: AllocationFailed | AllocationLost) -> None:
        self.state = TurnState.FAILED
        self.relayed = None
        self._transactions.clear()
        self._installed.clear()
        self._channels.clear()
        self._channel_of.clear()
        self._events.append(event)


# --- the anyio session --------------------------------------------------------------------------

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0


class TurnSession:
    """Keeps an allocation on one relay, over a UDP socket the caller owns.

    ``send(datagram, address)`` sends from that socket (best effort); the socket's owner hands
    every datagram from `server` to `feed`. `run` allocates, keeps the allocation (refreshes,
    permissions for ``permissions``), and when it is lost or refused allocates anew, with
    backoff while the relay is unreachable; ``on_change`` is called whenever `relayed`
    changes (None while there is no allocation).
    """

    def __init__(
        self,
        config: RelayClientConfig,
        send: Callable[[bytes, Address], None],
        *,
        permissions: Iterable[str] = (),
        on_change: Callable[[TurnSession], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.server = config.server
        self._send_datagram = send
        self._permissions = set(permissions)
        self._on_change = on_change
        self._wall_clock = wall_clock
        self._client: TurnClient | None = None
        self._ready = False
        """The allocation is made and its first permissions answered: peers can reach us."""
        self._wakeup = anyio.Event()
        self._changed = anyio.Event()
        self._permission_waiters: dict[str, anyio.Event] = {}
        self._permission_errors: dict[str, BaseException] = {}
        self.last_error: str | None = None
        """Why the last allocation failed or ended (for logs and errors)."""

    def __repr__(self) -> str:
        return f"TurnSession(server={self.config.address!r}, relayed={self.relayed!r})"

    @property
    def relayed(self) -> Address | None:
        client = self._client
        if client is None or not self._ready or client.state is not TurnState.ALLOCATED:
            return None
        return client.relayed

    @property
    def mapped(self) -> Address | None:
        """Where the relay saw us come from (the allocation's XOR-MAPPED-ADDRESS): our public
        address behind a NAT. None while there is no allocation."""
        client = self._client
        if self.relayed is None or client is None:
            return None
        return client.mapped

    def wrap(self, peer: Address, data: bytes) -> bytes | None:
        """``data`` for ``peer`` through the allocation; None while there is none."""
        client = self._client
        if client is None:
            return None
        wrapped = client.wrap(peer, data, anyio.current_time())
        if client._outgoing:  # a ChannelBind was started
            self._wakeup.set()
        return wrapped

    def feed(self, data: bytes) -> tuple[Address, bytes] | None:
        """A datagram from the relay: peer data is returned, the rest is handled."""
        client = self._client
        if client is None:
            return None
        result = client.receive_datagram(data, anyio.current_time())
        if result is None:
            self._wakeup.set()
        return result

    async def wait_relayed(self) -> Address:
        """Wait until there is an allocation; its relayed address."""
        while True:
            relayed = self.relayed
            if relayed is not None:
                return relayed
            await self._changed.wait()

    async def ensure_permission(self, ip: str) -> None:
        """Make sure the allocation has a permission for ``ip``; `RelayRefused` if the relay
        will not give one, `RelayUnavailable` if the allocation ends meanwhile."""
        self._permissions.add(ip)
        while True:
            client = self._client
            relayed = self.relayed
            if client is not None and relayed is not None:
                if ip in client.permissions:
                    return
                waiter = self._permission_waiters.setdefault(ip, anyio.Event())
                client.add_permission(ip, anyio.current_time())
                self._wakeup.set()
                changed = self._changed
                async with anyio.create_task_group() as tg:

                    async def _either(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(_either, waiter)
                    tg.start_soon(_either, changed)
                error = self._permission_errors.pop(ip, None)
                if error is not None:
                    self._permissions.discard(ip)
                    raise error
                if self.relayed != relayed:
                    raise RelayUnavailable(
                        f"the allocation on relay {self.config.address} ended while asking for "
                        f"a permission ({self.last_error})"
                    )
            else:
                await self.wait_relayed()

    async def run(self) -> None:
        """Allocate and keep allocating until cancelled; closes the allocation on the way out."""
        backoff = _BACKOFF_FIRST
        try:
            while True:
                username, password = self.config.credentials(self._wall_clock())
                client = TurnClient(
                    self.server,
                    username,
                    password,
                    lifetime=self.config.lifetime,
                    keepalive=self.config.keepalive,
                    rto=self.config.rto,
                    max_transmissions=self.config.max_transmissions,
                )
                self._client = client
                now = anyio.current_time()
                for ip in sorted(self._permissions):
                    client.add_permission(ip, now)
                client.allocate(now)
                made = await self._drive(client)
                if made:
                    backoff = _BACKOFF_FIRST
                    continue  # lost after working: try again at once (a restarted relay)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            last = self._client
            if last is not None:
                last.close(anyio.current_time())
                for data in last.datagrams_to_send():
                    self._send_datagram(data, self.server)
                self._client = None

    async def _drive(self, client: TurnClient) -> bool:
        """Run ``client`` until it fails; whether it had an allocation."""
        made = False
        while True:
            self._wakeup = anyio.Event()
            now = anyio.current_time()
            timer = client.get_timer()
            if timer is not None and timer <= now:
                client.handle_timer(now)
            for data in client.datagrams_to_send():
                self._send_datagram(data, self.server)
            while (event := client.next_event()) is not None:
                if isinstance(event, AllocationCreated):
                    made = True
                    self.last_error = None
                    if not self._permissions:
                        self._ready = True
                        self._notify()
                elif isinstance(event, AllocationFailed | AllocationLost):
                    code = f" ({event.code})" if event.code else ""
                    self.last_error = event.reason + code
                    self._ready = False
                    self._notify()
                    for waiter in self._permission_waiters.values():
                        waiter.set()
                    self._permission_waiters.clear()
                    return made
                elif (
                    isinstance(event, PermissionsInstalled | PermissionRefused) and not self._ready
                ):
                    # Reachable once the first permissions (for the relays) are answered.
                    self._ready = True
                    self._notify()
                if isinstance(event, PermissionsInstalled):
                    for ip in event.ips:
                        done = self._permission_waiters.pop(ip, None)
                        if done is not None:
                            done.set()
                elif isinstance(event, PermissionRefused):
                    for ip in event.ips:
                        self._permissions.discard(ip)
                        self._permission_errors[ip] = RelayRefused(
                            f"relay {self.config.address} refused a permission for {ip}: "
                            f"{event.code} {event.reason}",
                            code=event.code,
                        )
                        done = self._permission_waiters.pop(ip, None)
                        if done is not None:
                            done.set()
            timer = client.get_timer()
            with anyio.CancelScope(deadline=math.inf if timer is None else timer):
                await self._wakeup.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        if self._on_change is not None:
            self._on_change(self)
