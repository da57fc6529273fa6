"""The TURN server: a sans-IO core (`TurnServerCore`) and its I/O adapter (`RelayServer`).

The core takes bytes, the client's address, the transport and the time, and returns actions
(responses to send, data-plane commands); it reads no clock and touches no socket, so tests
drive it with an explicit ``now``. Its rules, in the order the RFCs apply them:

- Malformed input is dropped silently (RFC 8489 section 6.3); responses and unknown classes
  too. Indications never get an answer.
- Binding needs no authentication: the answer carries XOR-MAPPED-ADDRESS (and FINGERPRINT
  when the request had one). Unknown comprehension-required attributes → 420.
- Every TURN request is authenticated first (`teia.relay.auth`: 401 with REALM and NONCE,
  438 for a stale nonce, 400 for half-present credentials), then checked for unknown
  comprehension-required attributes (420 with UNKNOWN-ATTRIBUTES; DONT-FRAGMENT is one of
  them: this relay cannot promise it). Answers to authenticated requests are signed with
  the same key.
- Allocate: one allocation per client address (another transaction on it → 437, the same
  transaction again → the same answer); REQUESTED-TRANSPORT must be UDP (else 442);
  EVEN-PORT gets an even port, but reservations are not kept (RESERVATION-TOKEN or
  EVEN-PORT's R bit → 508; RESERVATION-TOKEN with either of the others → 400); a family
  the relay does not relay → 440; quotas → 486 (per user, per source IP) or 508 (the whole
  relay). Lifetime: the client's ask capped at
  3600 s, never below the 600 s default.
- Refresh, CreatePermission, ChannelBind need the allocation (437) and the user who made it
  (441). Refresh with lifetime 0 deletes. Permissions last 300 s, channels 600 s (and
  refresh their peer's permission); peers the policy forbids → 403, another family → 443.
  The relay's own addresses are forbidden too unless allow-listed, except at a port that is
  a live relayed allocation of this relay (two clients of one relay reach each other; the
  kernel delivers locally): a permission is per IP, so TCP clients' data to another port
  there is dropped here, and the data plane checks every UDP datagram the same way.
  A channel is bound to one peer and a peer to one channel, until 5 minutes after the
  binding expires (else 400); numbers outside 0x4000-0x4FFF → 400.
- Allocations, permissions and channels expire when ``expire(now)`` is called past their
  time; a TCP client's allocation ends with its connection.

Allocation is two-step because the data plane picks the relayed port: ``handle`` answers a
good Allocate with `CreateRelay`; the adapter asks the data plane and reports back with
``relay_created`` (→ the success response) or ``relay_failed`` (→ 508).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from teia.errors import InvalidStunMessage, RelayCapacityError, RelayError
from teia.relay import stun
from teia.relay.auth import AuthOutcome, RelayAuthenticator
from teia.relay.policy import RelayPolicy
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method, StunMessage
from teia.service.logs import fields

__all__ = [
    "Action",
    "Address",
    "CreateRelay",
    "DataPlane",
    "InstallChannel",
    "InstallPermission",
    "RelayAllocation",
    "RelayServer",
    "ReleaseRelay",
    "SendToClient",
    "SendToPeer",
    "Transport",
    "TurnServerCore",
    "TurnSettings",
]

log = logging.getLogger("teia.relay")

Transport = Literal["udp", "tcp"]
Address = tuple[str, int]

UDP_PROTOCOL = 17
CHANNEL_QUARANTINE = 300.0
"""Seconds after a channel binding expires before its number or peer may be paired anew."""
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

REASONS = {
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

_KNOWN_BINDING = frozenset(
    {Attr.USERNAME, Attr.REALM, Attr.NONCE, Attr.PRIORITY, Attr.USE_CANDIDATE}
)
_KNOWN_TURN = frozenset(
    {
        Attr.USERNAME,
        Attr.REALM,
        Attr.NONCE,
        Attr.LIFETIME,
        Attr.REQUESTED_TRANSPORT,
        Attr.XOR_PEER_ADDRESS,
        Attr.CHANNEL_NUMBER,
        Attr.DATA,
        Attr.EVEN_PORT,
        Attr.RESERVATION_TOKEN,
        Attr.REQUESTED_ADDRESS_FAMILY,
    }
)


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send ``data`` to the client (over UDP from the relay port, or on its TCP stream)."""

    data: bytes
    client: Address
    transport: Transport


@dataclass(frozen=True, slots=True)
class CreateRelay:
    """Ask the data plane for a relayed socket; report back with ``relay_created``/``_failed``."""

    client: Address
    transport: Transport
    bytes_per_second: int
    even_port: bool = False
    """EVEN-PORT asked for an even relayed port (without reserving the next one)."""


@dataclass(frozen=True, slots=True)
class ReleaseRelay:
    client: Address
    transport: Transport


@dataclass(frozen=True, slots=True)
class InstallPermission:
    client: Address
    peer_ip: str
    lifetime: float


@dataclass(frozen=True, slots=True)
class InstallChannel:
    client: Address
    channel: int
    peer: Address
    lifetime: float


@dataclass(frozen=True, slots=True)
class SendToPeer:
    """Relay ``data`` from the client's allocation to ``peer`` (TCP clients' Send and
    ChannelData; the data plane forwards UDP clients' itself)."""

    client: Address
    peer: Address
    data: bytes


Action = SendToClient | CreateRelay | ReleaseRelay | InstallPermission | InstallChannel | SendToPeer


@dataclass(frozen=True)
class TurnSettings:
    software: str = "teia"
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    relay_families: frozenset[int] = frozenset({FAMILY_IPV4})
    """Address families the data plane relays (REQUESTED-ADDRESS-FAMILY outside → 440)."""


@dataclass
class RelayAllocation:
    """One client's allocation, as the control plane sees it."""

    client: Address
    transport: Transport
    username: str
    key: bytes
    transaction_id: bytes
    expires: float
    fingerprint: bool = False
    relayed: Address | None = None
    """None while the data plane is being asked."""
    response: bytes = b""
    """The success answer, resent if the client retransmits its Allocate."""
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, tuple[Address, float]] = field(default_factory=dict)
    peer_channels: dict[Address, int] = field(default_factory=dict)

    @property
    def family(self) -> int:
        if self.relayed is None:
            return FAMILY_IPV4
        return FAMILY_IPV4 if ipaddress.ip_address(self.relayed[0]).version == 4 else FAMILY_IPV6


def _family(ip: str) -> int:
    return FAMILY_IPV4 if ipaddress.ip_address(ip).version == 4 else FAMILY_IPV6


class _Reply(Exception):  # control flow inside the core; never escapes it
    """An error answer decided deep in a handler."""

    def __init__(self, code: int, *, unknown: Iterable[int] = ()) -> None:
        super().__init__(code)
        self.code = code
        self.unknown = list(unknown)


_Handler = Callable[[StunMessage, Address, Transport, str, bytes, float], list[Action]]


class TurnServerCore:
    """The sans-IO TURN server. Not thread-safe: one task drives it."""

    def __init__(
        self,
        authenticator: RelayAuthenticator,
        policy: RelayPolicy | None = None,
        settings: TurnSettings | None = None,
    ) -> None:
        self.auth = authenticator
        self.policy = policy or RelayPolicy()
        self.settings = settings or TurnSettings()
        self.allocations: dict[Address, RelayAllocation] = {}
        self._relayed: dict[Address, Address] = {}
        """Live relayed address → its client (for peers on the relay's own addresses)."""
        self._guarded = frozenset(self.policy.guarded_own_ips())
        self.responses: Counter[tuple[str, int]] = Counter()
        """Answers sent, by (method name, code); 200 is success."""
        self.dropped: Counter[str] = Counter()
        """Input dropped without an answer, by reason (a small fixed set)."""

    # --- entry points -------------------------------------------------------------------------

    def handle(
        self, data: bytes, client: Address, transport: Transport, now: float
    ) -> list[Action]:
        """Process one STUN message or ChannelData frame from ``client``."""
        if stun.is_channel_data(data):
            return self._channel_data(data, client, now)
        try:
            message = stun.parse(data)
        except InvalidStunMessage:
            self.dropped["malformed"] += 1
            return []
        if message.cls == MessageClass.INDICATION:
            if message.method == Method.SEND:
                return self._send_indication(message, client, now)
            self.dropped["unexpected-indication"] += 1
            return []
        if message.cls != MessageClass.REQUEST:
            self.dropped["not-a-request"] += 1
            return []
        if message.method == Method.BINDING:
            return self._binding(message, client, transport)
        handlers: dict[int, _Handler] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
        }
        handler = handlers.get(message.method)
        if handler is None:
            return [self._error(message, client, transport, 400, key=None)]
        auth = self.auth.authenticate(message, client[0], now)
        if auth.outcome is AuthOutcome.BAD_REQUEST:
            return [self._error(message, client, transport, 400, key=None)]
        if auth.outcome is AuthOutcome.STALE_NONCE:
            return [self._challenge(message, client, transport, 438, now)]
        if auth.outcome is AuthOutcome.CHALLENGE:
            return [self._challenge(message, client, transport, 401, now)]
        unknown = message.unknown_comprehension_required(_KNOWN_TURN)
        if unknown:
            return [self._error(message, client, transport, 420, key=auth.key, unknown=unknown)]
        try:
            return handler(message, client, transport, auth.username, auth.key, now)
        except _Reply as reply:
            return [
                self._error(
                    message, client, transport, reply.code, key=auth.key, unknown=reply.unknown
                )
            ]
        except InvalidStunMessage:  # an attribute that does not decode
            return [self._error(message, client, transport, 400, key=auth.key)]

    def relay_created(self, client: Address, relayed: Address, now: float) -> list[Action]:
        """The data plane made ``client``'s relayed socket: answer the Allocate."""
        allocation = self.allocations.get(client)
        if allocation is None or allocation.relayed is not None:
            return [ReleaseRelay(client, "udp" if allocation is None else allocation.transport)]
        relayed = (str(ipaddress.ip_address(relayed[0])), relayed[1])
        allocation.relayed = relayed
        self._relayed[relayed] = client
        builder = self._builder(Method.ALLOCATE, MessageClass.SUCCESS, allocation.transaction_id)
        builder.add_xor_address(Attr.XOR_RELAYED_ADDRESS, *relayed)
        builder.add_u32(Attr.LIFETIME, max(0, round(allocation.expires - now)))
        builder.add_xor_address(Attr.XOR_MAPPED_ADDRESS, *client)
        allocation.response = builder.finish(key=allocation.key, fingerprint=allocation.fingerprint)
        self.responses[("allocate", 200)] += 1
        log.info(
            "allocation created",
            extra=fields(
                client=_show(client), relayed=_show(relayed), transport=allocation.transport
            ),
        )
        return [SendToClient(allocation.response, client, allocation.transport)]

    def relay_failed(self, client: Address, now: float) -> list[Action]:
        """The data plane could not make a relayed socket: answer 508."""
        allocation = self.allocations.pop(client, None)
        if allocation is None:
            return []
        builder = self._builder(Method.ALLOCATE, MessageClass.ERROR, allocation.transaction_id)
        builder.add_error(508, REASONS[508])
        self.responses[("allocate", 508)] += 1
        data = builder.finish(key=allocation.key, fingerprint=allocation.fingerprint)
        return [SendToClient(data, client, allocation.transport)]

    def expire(self, now: float) -> list[Action]:
        """Drop what has expired by ``now``; returns the releases for the data plane."""
        actions: list[Action] = []
        for client, allocation in list(self.allocations.items()):
            if allocation.expires <= now:
                self._remove(client)
                actions.append(ReleaseRelay(client, allocation.transport))
                log.info("allocation expired", extra=fields(client=_show(client)))
                continue
            for peer_ip, until in list(allocation.permissions.items()):
                if until <= now:
                    del allocation.permissions[peer_ip]
            for channel, (peer, until) in list(allocation.channels.items()):
                if until + CHANNEL_QUARANTINE <= now:
                    del allocation.channels[channel]
                    allocation.peer_channels.pop(peer, None)
        return actions

    def client_closed(self, client: Address, transport: Transport) -> list[Action]:
        """A TCP client's connection ended: its allocation ends with it (RFC 8656 §5)."""
        allocation = self.allocations.get(client)
        if allocation is None or allocation.transport != transport:
            return []
        self._remove(client)
        return [ReleaseRelay(client, transport)]

    def next_deadline(self) -> float | None:
        return min((a.expires for a in self.allocations.values()), default=None)

    def relayed_here(self, peer: Address) -> bool:
        """Whether ``peer`` is the relayed address of a live allocation on this relay."""
        client = self._relayed.get(peer)
        if client is None:
            return False
        allocation = self.allocations.get(client)
        return allocation is not None and allocation.relayed == peer

    def _remove(self, client: Address) -> None:
        allocation = self.allocations.pop(client, None)
        relayed = allocation.relayed if allocation is not None else None
        if relayed is not None and self._relayed.get(relayed) == client:
            del self._relayed[relayed]

    # --- answers ------------------------------------------------------------------------------

    def _builder(self, method: int, cls: MessageClass, transaction_id: bytes) -> MessageBuilder:
        builder = MessageBuilder(method, cls, transaction_id)
        if self.settings.software:
            builder.add_text(Attr.SOFTWARE, self.settings.software)
        return builder

    def _count(self, message: StunMessage, code: int) -> None:
        try:
            name = Method(message.method).name.lower()
        except ValueError:
            name = "other"
        self.responses[(name, code)] += 1

    def _success(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        key: bytes | None,
        attributes: Iterable[tuple[int, bytes]] = (),
    ) -> SendToClient:
        builder = self._builder(message.method, MessageClass.SUCCESS, message.transaction_id)
        for attr, value in attributes:
            builder.add(attr, value)
        self._count(message, 200)
        data = builder.finish(key=key, fingerprint=message.has_fingerprint)
        return SendToClient(data, client, transport)

    def _error(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        code: int,
        *,
        key: bytes | None,
        unknown: Iterable[int] = (),
    ) -> SendToClient:
        builder = self._builder(message.method, MessageClass.ERROR, message.transaction_id)
        builder.add_error(code, REASONS[code])
        unknown = list(unknown)
        if unknown:
            builder.add_unknown_attributes(unknown)
        self._count(message, code)
        log.debug(
            "error answer",
            extra=fields(client=_show(client), method=message.method, code=code, unknown=unknown),
        )
        data = builder.finish(key=key, fingerprint=message.has_fingerprint)
        return SendToClient(data, client, transport)

    def _challenge(
        self, message: StunMessage, client: Address, transport: Transport, code: int, now: float
    ) -> SendToClient:
        builder = self._builder(message.method, MessageClass.ERROR, message.transaction_id)
        builder.add_error(code, REASONS[code])
        builder.add_text(Attr.REALM, self.auth.realm)
        builder.add_text(Attr.NONCE, self.auth.new_nonce(client[0], now))
        self._count(message, code)
        return SendToClient(builder.finish(fingerprint=message.has_fingerprint), client, transport)

    # --- STUN ---------------------------------------------------------------------------------

    def _binding(self, message: StunMessage, client: Address, transport: Transport) -> list[Action]:
        unknown = message.unknown_comprehension_required(_KNOWN_BINDING)
        if unknown:
            return [self._error(message, client, transport, 420, key=None, unknown=unknown)]
        mapped = stun.encode_xor_address(client[0], client[1], message.transaction_id)
        return [
            self._success(message, client, transport, None, [(Attr.XOR_MAPPED_ADDRESS, mapped)])
        ]

    # --- TURN requests ------------------------------------------------------------------------

    def _lifetime(self, message: StunMessage) -> int:
        raw = message.get(Attr.LIFETIME)
        if raw is None:
            return self.settings.default_lifetime
        requested = stun.decode_lifetime(raw)
        if requested == 0:
            return 0
        return max(self.settings.default_lifetime, min(requested, self.settings.max_lifetime))

    def _owned(self, client: Address, transport: Transport, username: str) -> RelayAllocation:
        allocation = self.allocations.get(client)
        if allocation is None or allocation.transport != transport or allocation.relayed is None:
            raise _Reply(437)
        if allocation.username != username:
            raise _Reply(441)
        return allocation

    def _allocate(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        username: str,
        key: bytes,
        now: float,
    ) -> list[Action]:
        existing = self.allocations.get(client)
        if existing is not None:
            if existing.transaction_id == message.transaction_id and existing.response:
                return [SendToClient(existing.response, client, transport)]
            if existing.transaction_id == message.transaction_id:
                return []  # still being created
            raise _Reply(437)
        raw_transport = message.get(Attr.REQUESTED_TRANSPORT)
        if raw_transport is None:
            raise _Reply(400)
        if stun.decode_requested_transport(raw_transport) != UDP_PROTOCOL:
            raise _Reply(442)
        token = message.has(Attr.RESERVATION_TOKEN)
        raw_even_port = message.get(Attr.EVEN_PORT)
        raw_family = message.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if token and (raw_even_port is not None or raw_family is not None):
            raise _Reply(400)
        if raw_even_port is not None and len(raw_even_port) != 1:
            raise _Reply(400)
        if token or (raw_even_port is not None and raw_even_port[0] & 0x80):
            raise _Reply(508)  # no reservations are kept (RESERVATION-TOKEN, EVEN-PORT's R bit)
        if raw_family is not None:
            family = stun.decode_requested_family(raw_family)
            if family not in (FAMILY_IPV4, FAMILY_IPV6):
                raise _Reply(440)
            if family not in self.settings.relay_families:
                raise _Reply(440)
        lifetime = self._lifetime(message)
        if lifetime == 0:
            lifetime = self.settings.default_lifetime
        policy = self.policy
        if policy.max_allocations and len(self.allocations) >= policy.max_allocations:
            raise _Reply(508)
        if policy.max_allocations_per_user and (
            sum(a.username == username for a in self.allocations.values())
            >= policy.max_allocations_per_user
        ):
            raise _Reply(486)
        if policy.max_allocations_per_ip and (
            sum(c[0] == client[0] for c in self.allocations) >= policy.max_allocations_per_ip
        ):
            raise _Reply(486)
        self.allocations[client] = RelayAllocation(
            client=client,
            transport=transport,
            username=username,
            key=key,
            transaction_id=message.transaction_id,
            expires=now + lifetime,
            fingerprint=message.has_fingerprint,
        )
        return [
            CreateRelay(
                client, transport, policy.bandwidth_per_allocation, raw_even_port is not None
            )
        ]

    def _refresh(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        username: str,
        key: bytes,
        now: float,
    ) -> list[Action]:
        allocation = self._owned(client, transport, username)
        raw_family = message.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if raw_family is not None and stun.decode_requested_family(raw_family) != allocation.family:
            raise _Reply(443)
        lifetime = self._lifetime(message)
        lifetime_attr = [(int(Attr.LIFETIME), lifetime.to_bytes(4, "big"))]
        if lifetime == 0:
            self._remove(client)
            log.info("allocation deleted", extra=fields(client=_show(client)))
            return [
                ReleaseRelay(client, transport),
                self._success(message, client, transport, key, lifetime_attr),
            ]
        allocation.expires = now + lifetime
        return [self._success(message, client, transport, key, lifetime_attr)]

    def _peers(self, message: StunMessage, allocation: RelayAllocation) -> list[Address]:
        values = message.get_all(Attr.XOR_PEER_ADDRESS)
        if not values:
            raise _Reply(400)
        peers = [stun.decode_xor_address(value, message.transaction_id) for value in values]
        for ip, _ in peers:
            if _family(ip) != allocation.family:
                raise _Reply(443)
        for ip, port in peers:
            if not self.policy.peer_allowed(ip, relayed_here=self.relayed_here((ip, port))):
                self.dropped["forbidden-peer"] += 1
                log.info(
                    "forbidden peer refused",
                    extra=fields(client=_show(allocation.client)),
                )
                raise _Reply(403)
        return peers

    def _create_permission(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        username: str,
        key: bytes,
        now: float,
    ) -> list[Action]:
        allocation = self._owned(client, transport, username)
        peers = self._peers(message, allocation)
        new = {ip for ip, _ in peers} - allocation.permissions.keys()
        limit = self.policy.max_permissions_per_allocation
        if limit and len(allocation.permissions) + len(new) > limit:
            raise _Reply(508)
        lifetime = self.settings.permission_lifetime
        actions: list[Action] = []
        for ip in dict.fromkeys(ip for ip, _ in peers):
            allocation.permissions[ip] = now + lifetime
            actions.append(InstallPermission(client, ip, lifetime))
        actions.append(self._success(message, client, transport, key))
        return actions

    def _channel_bind(
        self,
        message: StunMessage,
        client: Address,
        transport: Transport,
        username: str,
        key: bytes,
        now: float,
    ) -> list[Action]:
        allocation = self._owned(client, transport, username)
        raw_channel = message.get(Attr.CHANNEL_NUMBER)
        if raw_channel is None or len(message.get_all(Attr.XOR_PEER_ADDRESS)) != 1:
            raise _Reply(400)
        channel = stun.decode_channel_number(raw_channel)
        if not stun.CHANNEL_MIN <= channel <= stun.CHANNEL_MAX:
            log.debug("channel number out of range", extra=fields(channel=f"0x{channel:04x}"))
            raise _Reply(400)
        (peer,) = self._peers(message, allocation)
        # A number and a peer stay paired while bound and for 5 minutes after (RFC 8656 §12).
        bound = allocation.channels.get(channel)
        if bound is not None and bound[0] != peer and bound[1] + CHANNEL_QUARANTINE > now:
            raise _Reply(400)
        other = allocation.peer_channels.get(peer, channel)
        if other != channel and allocation.channels[other][1] + CHANNEL_QUARANTINE > now:
            raise _Reply(400)
        if bound is not None and bound[0] != peer:
            allocation.peer_channels.pop(bound[0], None)
        if other != channel:
            del allocation.channels[other]
        limit = self.policy.max_channels_per_allocation
        if bound is None and limit and len(allocation.channels) >= limit:
            raise _Reply(508)
        if peer[0] not in allocation.permissions:
            limit = self.policy.max_permissions_per_allocation
            if limit and len(allocation.permissions) >= limit:
                raise _Reply(508)
        allocation.channels[channel] = (peer, now + self.settings.channel_lifetime)
        allocation.peer_channels[peer] = channel
        allocation.permissions[peer[0]] = now + self.settings.permission_lifetime
        return [
            InstallPermission(client, peer[0], self.settings.permission_lifetime),
            InstallChannel(client, channel, peer, self.settings.channel_lifetime),
            self._success(message, client, transport, key),
        ]

    # --- data from TCP clients ----------------------------------------------------------------

    def _permitted(self, client: Address, peer: Address, now: float) -> RelayAllocation | None:
        allocation = self.allocations.get(client)
        if allocation is None or allocation.relayed is None:
            self.dropped["no-allocation"] += 1
            return None
        until = allocation.permissions.get(peer[0])
        if until is None or until <= now:
            self.dropped["no-permission"] += 1
            return None
        if peer[0] in self._guarded and not self.relayed_here(peer):
            self.dropped["forbidden-peer"] += 1  # the permission's IP is ours: not this port
            return None
        return allocation

    def _send_indication(self, message: StunMessage, client: Address, now: float) -> list[Action]:
        raw_peer = message.get(Attr.XOR_PEER_ADDRESS)
        data = message.get(Attr.DATA)
        if raw_peer is None or data is None:
            self.dropped["malformed"] += 1
            return []
        try:
            peer = stun.decode_xor_address(raw_peer, message.transaction_id)
        except InvalidStunMessage:
            self.dropped["malformed"] += 1
            return []
        if self._permitted(client, peer, now) is None:
            return []
        return [SendToPeer(client, peer, data)]

    def _channel_data(self, data: bytes, client: Address, now: float) -> list[Action]:
        try:
            channel, payload = stun.parse_channel_data(data)
        except InvalidStunMessage:
            self.dropped["malformed"] += 1
            return []
        allocation = self.allocations.get(client)
        bound = allocation.channels.get(channel) if allocation is not None else None
        if bound is None or bound[1] <= now:
            self.dropped["unbound-channel"] += 1
            return []
        peer = bound[0]
        if self._permitted(client, peer, now) is None:
            return []
        return [SendToPeer(client, peer, payload)]


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wall_clock() -> float:
    """The core's clock: Unix time (nonces and REST credentials are wall-clock by nature)."""
    return time.time()


# --- the I/O adapter --------------------------------------------------------------------------


class DataPlane(Protocol):
    """What `RelayServer` needs of ``teia._native.RelayDataPlane`` (tests may fake it)."""

    @property
    def port(self) -> int: ...

    def recv_control(self, timeout_ms: int) -> list[tuple[bytes, str, int]]: ...

    def recv_relayed_for_tcp(self, timeout_ms: int) -> list[tuple[bytes, str, int]]: ...

    def send_to_client(self, data: bytes, host: str, port: int) -> None: ...

    def allocate(
        self, client_host: str, client_port: int, *, bytes_per_second: int = 0, tcp: bool = False
    ) -> tuple[str, int]: ...

    def release(self, client_host: str, client_port: int) -> bool: ...

    def add_permission(
        self, client_host: str, client_port: int, peer_ip: str, lifetime_ms: int
    ) -> None: ...

    def bind_channel(
        self,
        client_host: str,
        client_port: int,
        channel: int,
        peer_host: str,
        peer_port: int,
        lifetime_ms: int,
    ) -> None: ...

    def send_from_relay(
        self, client_host: str, client_port: int, peer_host: str, peer_port: int, data: bytes
    ) -> bool: ...

    def close(self) -> None: ...


_POLL_MS = 100
"""How long one blocking wait on the data plane lasts: the bound on how late a stop is."""
_EXPIRY_EVERY = 1.0
_EVEN_PORT_TRIES = 16
_TCP_MAX_BUFFER = 2 * (stun.MAX_MESSAGE_SIZE + 4)
_TCP_QUEUE = 256
_DATA_PLANE_ERRORS = (RelayError, OSError, ValueError, RuntimeError)


@dataclass
class _TcpClient:
    outgoing: MemoryObjectSendStream[bytes]


class RelayServer:
    """Runs a `TurnServerCore` over a data plane: UDP control messages from the data plane,
    TURN over TCP on the same port, expiry. Owns the data plane (closes it on exit).

    ``async with RelayServer(core, data_plane, host) as server:`` serves until the block
    ends; ``server.port`` is the UDP and TCP port.
    """

    def __init__(
        self,
        core: TurnServerCore,
        data_plane: DataPlane,
        host: str,
        *,
        tcp: bool = True,
        max_tcp_clients: int = 1024,
        clock: Callable[[], float] = wall_clock,
    ) -> None:
        self.core = core
        self.data_plane = data_plane
        self.host = host
        self.tcp = tcp
        self._clock = clock
        self._tcp_clients: dict[Address, _TcpClient] = {}
        self._tcp_slots = anyio.Semaphore(max_tcp_clients)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None

    @property
    def port(self) -> int:
        return self.data_plane.port

    async def __aenter__(self) -> RelayServer:
        try:
            if self.tcp:
                self._listener = await anyio.create_tcp_listener(
                    local_host=self.host, local_port=self.port
                )
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
        except BaseException:
            self.data_plane.close()
            raise
        self._task_group.start_soon(self._control_loop)
        self._task_group.start_soon(self._expiry_loop)
        if self._listener is not None:
            self._task_group.start_soon(self._tcp_data_loop)
            self._task_group.start_soon(self._accept_loop, self._listener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task_group is not None
        try:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
        finally:
            if self._listener is not None:
                with anyio.CancelScope(shield=True):
                    await self._listener.aclose()
            self.data_plane.close()

    # --- loops --------------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        limiter = anyio.CapacityLimiter(1)
        while True:
            batch = await anyio.to_thread.run_sync(
                self.data_plane.recv_control, _POLL_MS, limiter=limiter
            )
            if batch:
                now = self._clock()
                for data, host, port in batch:
                    self.execute(self.core.handle(data, (host, port), "udp", now))
            await anyio.lowlevel.checkpoint()

    async def _tcp_data_loop(self) -> None:
        limiter = anyio.CapacityLimiter(1)
        while True:
            batch = await anyio.to_thread.run_sync(
                self.data_plane.recv_relayed_for_tcp, _POLL_MS, limiter=limiter
            )
            for data, host, port in batch:
                self._to_tcp_client((host, port), data)
            await anyio.lowlevel.checkpoint()

    async def _expiry_loop(self) -> None:
        while True:
            await anyio.sleep(_EXPIRY_EVERY)
            self.execute(self.core.expire(self._clock()))

    async def _accept_loop(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        await listener.serve(self._admit_tcp_client)

    async def _admit_tcp_client(self, stream: anyio.abc.SocketStream) -> None:
        if self._tcp_slots.value == 0:
            await anyio.aclose_forcefully(stream)  # too many connections: refuse this one
            return
        await self._serve_tcp_client(stream)

    async def _serve_tcp_client(self, stream: anyio.abc.SocketStream) -> None:
        async with self._tcp_slots:
            try:
                remote = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
                client: Address = (str(remote[0]), int(remote[1]))
            except (anyio.TypedAttributeLookupError, IndexError, TypeError):
                await anyio.aclose_forcefully(stream)
                return
            send, receive = anyio.create_memory_object_stream[bytes](_TCP_QUEUE)
            self._tcp_clients[client] = _TcpClient(send)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._tcp_writer, stream, receive)
                    await self._tcp_reader(stream, client)
                    tg.cancel_scope.cancel()
            finally:
                self._tcp_clients.pop(client, None)
                send.close()
                self.execute(self.core.client_closed(client, "tcp"))
                await anyio.aclose_forcefully(stream)

    async def _tcp_reader(self, stream: anyio.abc.SocketStream, client: Address) -> None:
        buffer = bytearray()
        while True:
            try:
                chunk = await stream.receive(65_536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            buffer += chunk
            try:
                frames = list(stun.iter_frames(buffer))
            except InvalidStunMessage:
                self.core.dropped["malformed"] += 1
                return  # the framing is lost: close the connection
            if len(buffer) > _TCP_MAX_BUFFER:
                return
            if frames:
                now = self._clock()
                for frame in frames:
                    self.execute(self.core.handle(frame, client, "tcp", now))

    @staticmethod
    async def _tcp_writer(
        stream: anyio.abc.SocketStream, outgoing: anyio.abc.ObjectReceiveStream[bytes]
    ) -> None:
        async with outgoing:
            async for data in outgoing:
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return

    def _to_tcp_client(self, client: Address, data: bytes) -> None:
        connection = self._tcp_clients.get(client)
        if connection is None:
            return
        try:
            connection.outgoing.send_nowait(data)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.core.dropped["tcp-backlog"] += 1  # like a full socket buffer: UDP semantics

    # --- actions ------------------------------------------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        """Carry out the core's actions on the data plane and the TCP connections."""
        data_plane = self.data_plane
        for action in actions:
            try:
                if isinstance(action, SendToClient):
                    if action.transport == "tcp":
                        self._to_tcp_client(action.client, action.data)
                    else:
                        data_plane.send_to_client(action.data, *action.client)
                elif isinstance(action, CreateRelay):
                    self._create_relay(action)
                elif isinstance(action, ReleaseRelay):
                    data_plane.release(*action.client)
                elif isinstance(action, InstallPermission):
                    data_plane.add_permission(
                        *action.client, action.peer_ip, round(action.lifetime * 1000)
                    )
                elif isinstance(action, InstallChannel):
                    data_plane.bind_channel(
                        *action.client, action.channel, *action.peer, round(action.lifetime * 1000)
                    )
                else:
                    data_plane.send_from_relay(*action.client, *action.peer, action.data)
            except _DATA_PLANE_ERRORS as exc:
                log.warning(
                    "data plane refused an action",
                    extra=fields(action=type(action).__name__, error=type(exc).__name__),
                )

    def _create_relay(self, action: CreateRelay) -> None:
        try:
            for _ in range(_EVEN_PORT_TRIES):
                relayed = self.data_plane.allocate(
                    *action.client,
                    bytes_per_second=action.bytes_per_second,
                    tcp=action.transport == "tcp",
                )
                if not action.even_port or relayed[1] % 2 == 0:
                    break
                self.data_plane.release(*action.client)  # odd: ports are random, try again
            else:
                raise RelayCapacityError("no even relayed port found")
        except _DATA_PLANE_ERRORS as exc:
            log.warning(
                "could not create a relayed socket",
                extra=fields(client=_show(action.client), error=str(exc)),
            )
            self.execute(self.core.relay_failed(action.client, self._clock()))
            return
        self.execute(self.core.relay_created(action.client, relayed, self._clock()))
