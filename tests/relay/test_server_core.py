"""The sans-IO TURN core, driven with explicit time: auth, allocation lifecycle, policy, quotas."""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.relay import stun
from teia.relay.auth import RelayAuthenticator, rest_password
from teia.relay.policy import RelayPolicy, parse_networks
from teia.relay.server import (
    Action,
    Address,
    CreateRelay,
    InstallChannel,
    InstallPermission,
    ReleaseRelay,
    SendToClient,
    SendToPeer,
    Transport,
    TurnServerCore,
)
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method, StunMessage

REALM = "teia.test"
NONCE_SECRET = b"n" * 32
REST_SECRET = b"rest-secret"
T0 = 1_800_000_000.0
PEER = ("93.184.216.34", 40000)
OTHER_PEER = ("93.184.216.35", 40001)
UDP_TRANSPORT = bytes([17, 0, 0, 0])


def make_core(**policy: object) -> TurnServerCore:
    auth = RelayAuthenticator(
        REALM,
        nonce_secret=NONCE_SECRET,
        users={"alice": "wonderland", "bob": "builder"},
        rest_secret=REST_SECRET,
    )
    return TurnServerCore(auth, RelayPolicy(**policy))  # type: ignore[arg-type]


@dataclass
class Client:
    """A TURN client talking to the core in memory, with a fake data plane behind it."""

    core: TurnServerCore
    address: Address = ("198.51.100.7", 50000)
    username: str = "alice"
    password: str = "wonderland"
    transport: Transport = "udp"
    nonce: str | None = None
    relayed: Address | None = None
    data_plane: list[Action] = field(default_factory=list)
    _next_port: int = 49152

    def build(
        self,
        method: int,
        attributes: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
        *,
        authenticate: bool = True,
        key: bytes | None = None,
        fingerprint: bool = False,
        tid: bytes | None = None,
        cls: MessageClass = MessageClass.REQUEST,
    ) -> bytes:
        builder = MessageBuilder(method, cls, tid or os.urandom(12))
        for attr, value in attributes:
            builder.add(attr, value)
        if authenticate and self.nonce is not None:
            builder.add_text(Attr.USERNAME, self.username)
            builder.add_text(Attr.REALM, REALM)
            builder.add_text(Attr.NONCE, self.nonce)
            key = key or stun.long_term_key(self.username, REALM, self.password)
            return builder.finish(key=key, fingerprint=fingerprint)
        return builder.finish(fingerprint=fingerprint)

    def send(self, data: bytes, now: float) -> list[StunMessage]:
        """Feed ``data`` to the core; run data-plane actions; return the answers."""
        actions = self.core.handle(data, self.address, self.transport, now)
        answers: list[StunMessage] = []
        while actions:
            action = actions.pop(0)
            if isinstance(action, SendToClient):
                assert action.client == self.address
                answers.append(stun.parse(action.data))
            elif isinstance(action, CreateRelay):
                self.relayed = ("192.0.2.10", self._next_port)
                self._next_port += 1
                actions += self.core.relay_created(self.address, self.relayed, now)
            else:
                self.data_plane.append(action)
        return answers

    def request(self, method: int, now: float, *args: object, **kwargs: object) -> StunMessage:
        (answer,) = self.send(self.build(method, *args, **kwargs), now)  # type: ignore[arg-type]
        return answer

    def login(self, now: float) -> StunMessage:
        """Allocate: the first try is challenged (401), the second succeeds."""
        challenge = self.request(Method.ALLOCATE, now, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])
        assert error_code(challenge) == 401
        assert challenge.get(Attr.REALM) == REALM.encode()
        nonce = challenge.get(Attr.NONCE)
        assert nonce is not None
        self.nonce = nonce.decode()
        return self.request(Method.ALLOCATE, now, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])

    def renew_nonce(self, now: float) -> None:
        """What a client does after a 438: take the fresh nonce (here, straight from the core)."""
        self.nonce = self.core.auth.new_nonce(self.address[0], now)

    def key(self) -> bytes:
        return stun.long_term_key(self.username, REALM, self.password)


def error_code(message: StunMessage) -> int | None:
    if message.cls == MessageClass.SUCCESS:
        return None
    assert message.cls == MessageClass.ERROR
    return stun.decode_error_code(message.get(Attr.ERROR_CODE) or b"")[0]


def peer_attr(peer: Address, tid: bytes) -> tuple[int, bytes]:
    return Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(*peer, tid)


def permission(client: Client, peer: Address, now: float) -> StunMessage:
    tid = os.urandom(12)
    return client.request(Method.CREATE_PERMISSION, now, [peer_attr(peer, tid)], tid=tid)


def channel_bind(client: Client, channel: int, peer: Address, now: float) -> StunMessage:
    tid = os.urandom(12)
    attrs = [(Attr.CHANNEL_NUMBER, struct.pack("!HH", channel, 0)), peer_attr(peer, tid)]
    return client.request(Method.CHANNEL_BIND, now, attrs, tid=tid)


def refresh(client: Client, now: float, lifetime: int | None = None) -> StunMessage:
    attrs = [] if lifetime is None else [(Attr.LIFETIME, struct.pack("!I", lifetime))]
    return client.request(Method.REFRESH, now, attrs)


# --- STUN Binding --------------------------------------------------------------------------------


def test_binding_needs_no_auth_and_echoes_fingerprint() -> None:
    client = Client(make_core())
    answer = client.request(Method.BINDING, T0, authenticate=False, fingerprint=True)
    assert answer.cls == MessageClass.SUCCESS
    mapped = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert mapped is not None
    assert stun.decode_xor_address(mapped, answer.transaction_id) == client.address
    assert answer.has_fingerprint
    assert not client.request(Method.BINDING, T0, authenticate=False).has_fingerprint


def test_binding_with_unknown_comprehension_required_attribute_gets_420() -> None:
    client = Client(make_core())
    answer = client.request(Method.BINDING, T0, [(0x0031, b"x"), (0x8031, b"ok")])
    assert error_code(answer) == 420
    unknown = stun.decode_unknown_attributes(answer.get(Attr.UNKNOWN_ATTRIBUTES) or b"")
    assert unknown == [0x0031]


def test_garbage_responses_and_indications_are_dropped() -> None:
    core = make_core()
    client = Client(core)
    assert client.send(b"\x00\x01\x00\x00garbage", T0) == []
    success = client.build(Method.BINDING, authenticate=False, cls=MessageClass.SUCCESS)
    assert client.send(success, T0) == []
    indication = client.build(Method.BINDING, authenticate=False, cls=MessageClass.INDICATION)
    assert client.send(indication, T0) == []
    assert core.dropped["malformed"] == 1


# --- authentication ------------------------------------------------------------------------------


def test_allocate_401_then_success_signed_with_the_users_key() -> None:
    client = Client(make_core())
    answer = client.login(T0)
    assert error_code(answer) is None
    assert answer.verify_integrity(client.key())
    relayed = answer.get(Attr.XOR_RELAYED_ADDRESS)
    assert relayed is not None
    assert stun.decode_xor_address(relayed, answer.transaction_id) == client.relayed
    mapped = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert mapped is not None
    assert stun.decode_xor_address(mapped, answer.transaction_id) == client.address
    assert stun.decode_lifetime(answer.get(Attr.LIFETIME) or b"") == 600


def test_wrong_password_unknown_user_and_wrong_realm_get_401() -> None:
    core = make_core()
    for username, password in (("alice", "guess"), ("mallory", "x")):
        client = Client(core, username=username, password=password)
        assert error_code(client.login(T0)) == 401
    client = Client(core)
    client.login(T0)
    tid = os.urandom(12)
    builder = MessageBuilder(Method.REFRESH, MessageClass.REQUEST, tid)
    builder.add_text(Attr.USERNAME, "alice").add_text(Attr.REALM, "elsewhere")
    builder.add_text(Attr.NONCE, client.nonce or "")
    answer = client.send(builder.finish(key=client.key()), T0)[0]
    assert error_code(answer) == 401
    assert not answer.has_integrity  # a challenge is never signed


def test_tampered_integrity_gets_401() -> None:
    client = Client(make_core())
    client.login(T0)
    data = bytearray(client.build(Method.REFRESH))
    data[-1] ^= 0xFF
    (answer,) = client.send(bytes(data), T0)
    assert error_code(answer) == 401


def test_half_present_credentials_get_400() -> None:
    client = Client(make_core())
    builder = MessageBuilder(Method.ALLOCATE, MessageClass.REQUEST, os.urandom(12))
    builder.add(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT).add_text(Attr.USERNAME, "alice")
    (answer,) = client.send(builder.finish(key=client.key()), T0)
    assert error_code(answer) == 400


def test_stale_nonce_gets_438_with_a_fresh_nonce_then_works() -> None:
    client = Client(make_core())
    assert error_code(client.login(T0)) is None
    later = T0 + 601
    stale = refresh(client, later)
    assert error_code(stale) == 438
    assert not stale.has_integrity
    fresh = stale.get(Attr.NONCE)
    assert fresh is not None
    assert fresh.decode() != client.nonce
    client.nonce = fresh.decode()
    assert error_code(refresh(client, later)) is None


def test_nonce_from_another_address_or_forged_is_stale() -> None:
    core = make_core()
    client = Client(core)
    client.login(T0)
    thief = Client(core, address=("198.51.100.8", 50000), nonce=client.nonce)
    answer = thief.request(Method.ALLOCATE, T0, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])
    assert error_code(answer) == 438
    forger = Client(core, nonce="ffffffff-AAAAAAAAAAAAAAAA")
    answer = forger.request(Method.ALLOCATE, T0, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])
    assert error_code(answer) == 438


def test_rest_credentials_valid_then_expired() -> None:
    core = make_core()
    username = f"{int(T0) + 3600}:carol"
    client = Client(core, username=username, password=rest_password(REST_SECRET, username))
    assert error_code(client.login(T0)) is None
    assert error_code(refresh(client, T0 + 300)) is None
    # Past its expiry the same credential is refused, even with a fresh nonce.
    client.renew_nonce(T0 + 3601)
    assert error_code(refresh(client, T0 + 3601)) == 401
    expired = f"{int(T0) - 1}:carol"
    late = Client(
        core,
        address=("198.51.100.9", 1),
        username=expired,
        password=rest_password(REST_SECRET, expired),
    )
    assert error_code(late.login(T0)) == 401
    forged = f"{int(T0) + 3600}:mallory"
    wrong = Client(core, address=("198.51.100.9", 2), username=forged, password="AAAA")
    assert error_code(wrong.login(T0)) == 401


def test_rest_credentials_refused_without_a_secret() -> None:
    auth = RelayAuthenticator(REALM, nonce_secret=NONCE_SECRET, users={"alice": "wonderland"})
    username = f"{int(T0) + 3600}:carol"
    client = Client(
        TurnServerCore(auth), username=username, password=rest_password(REST_SECRET, username)
    )
    assert error_code(client.login(T0)) == 401
    assert "wonderland" not in repr(auth)


# --- Allocate rules ----------------------------------------------------------------------------


def test_allocate_retransmission_and_mismatch() -> None:
    client = Client(make_core())
    client.login(T0)
    tid = os.urandom(12)
    first = client.request(
        Method.ALLOCATE, T0, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)], tid=tid
    )
    assert error_code(first) == 437  # a second allocation on the same 5-tuple
    client2 = Client(make_core())
    client2.login(T0)
    # The same transaction again (a retransmission) gets the very same answer.
    core = client2.core
    allocation = core.allocations[client2.address]
    again = core.handle(
        client2.build(
            Method.ALLOCATE,
            [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)],
            tid=allocation.transaction_id,
        ),
        client2.address,
        "udp",
        T0,
    )
    assert again == [SendToClient(allocation.response, client2.address, "udp")]


@pytest.mark.parametrize(
    ("attributes", "code"),
    [
        ([], 400),
        ([(Attr.REQUESTED_TRANSPORT, bytes([6, 0, 0, 0]))], 442),
        ([(Attr.REQUESTED_TRANSPORT, b"\x11")], 400),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (Attr.DONT_FRAGMENT, b"")], 420),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (Attr.EVEN_PORT, b"\x80")], 508),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (Attr.EVEN_PORT, b"\x00")], None),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (Attr.EVEN_PORT, b"\x00\x00")], 400),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (Attr.RESERVATION_TOKEN, bytes(8))], 508),
        (
            [
                (Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT),
                (Attr.RESERVATION_TOKEN, bytes(8)),
                (Attr.EVEN_PORT, b"\x00"),
            ],
            400,
        ),
        (
            [
                (Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT),
                (Attr.REQUESTED_ADDRESS_FAMILY, bytes([2, 0, 0, 0])),
            ],
            440,
        ),
        (
            [
                (Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT),
                (Attr.REQUESTED_ADDRESS_FAMILY, bytes([1, 0, 0, 0])),
            ],
            None,
        ),
        ([(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT), (0x7777, b"?")], 420),
    ],
)
def test_allocate_attribute_rules(attributes: list[tuple[int, bytes]], code: int | None) -> None:
    client = Client(make_core())
    client.login(T0)
    refresh(client, T0, 0)  # delete the first allocation; try again with the attributes
    answer = client.request(Method.ALLOCATE, T0, attributes)
    assert error_code(answer) == code
    assert answer.verify_integrity(client.key())  # errors after auth are signed
    if code == 420:
        unknown = stun.decode_unknown_attributes(answer.get(Attr.UNKNOWN_ATTRIBUTES) or b"")
        assert unknown == [attributes[-1][0]]


@pytest.mark.parametrize(("asked", "granted"), [(1, 600), (900, 900), (100_000, 3600)])
def test_lifetimes(asked: int, granted: int) -> None:
    client = Client(make_core())
    client.login(T0)
    answer = refresh(client, T0, asked)
    assert stun.decode_lifetime(answer.get(Attr.LIFETIME) or b"") == granted
    assert client.core.expire(T0 + granted - 1) == []
    assert client.core.expire(T0 + granted) == [ReleaseRelay(client.address, "udp")]
    client.renew_nonce(T0 + granted)
    assert error_code(refresh(client, T0 + granted)) == 437


def test_refresh_zero_deletes_and_other_users_get_441() -> None:
    core = make_core()
    client = Client(core)
    client.login(T0)
    intruder = Client(
        core, address=client.address, username="bob", password="builder", nonce=client.nonce
    )
    assert error_code(refresh(intruder, T0)) == 441
    answer = refresh(client, T0, 0)
    assert error_code(answer) is None
    assert stun.decode_lifetime(answer.get(Attr.LIFETIME) or b"") == 0
    assert client.data_plane == [ReleaseRelay(client.address, "udp")]
    assert core.allocations == {}
    assert error_code(refresh(client, T0, 0)) == 437


def test_refresh_family_mismatch_gets_443() -> None:
    client = Client(make_core())
    client.login(T0)
    answer = client.request(
        Method.REFRESH, T0, [(Attr.REQUESTED_ADDRESS_FAMILY, bytes([2, 0, 0, 0]))]
    )
    assert error_code(answer) == 443


def test_quotas_per_user_per_ip_and_total() -> None:
    core = make_core(max_allocations_per_user=2, max_allocations_per_ip=3, max_allocations=5)
    for port in (1, 2):
        assert error_code(Client(core, address=("198.51.100.1", port)).login(T0)) is None
    third = Client(core, address=("198.51.100.1", 3))
    assert error_code(third.login(T0)) == 486  # alice has 2
    bob = Client(core, address=("198.51.100.1", 4), username="bob", password="builder")
    assert error_code(bob.login(T0)) is None
    bob2 = Client(core, address=("198.51.100.1", 5), username="bob", password="builder")
    assert error_code(bob2.login(T0)) == 486  # the IP has 3
    bob3 = Client(core, address=("198.51.100.2", 6), username="bob", password="builder")
    assert error_code(bob3.login(T0)) is None  # another IP: bob's second
    bob4 = Client(core, address=("198.51.100.2", 7), username="bob", password="builder")
    assert error_code(bob4.login(T0)) == 486  # bob has 2
    rest_name = f"{int(T0) + 60}:carol"
    carol = Client(
        core,
        address=("198.51.100.3", 8),
        username=rest_name,
        password=rest_password(REST_SECRET, rest_name),
    )
    assert error_code(carol.login(T0)) is None  # the fifth
    rest_name = f"{int(T0) + 60}:dave"
    dave = Client(
        core,
        address=("198.51.100.4", 9),
        username=rest_name,
        password=rest_password(REST_SECRET, rest_name),
    )
    assert error_code(dave.login(T0)) == 508  # the relay is full


def test_total_capacity_and_data_plane_failure_get_508() -> None:
    core = make_core(max_allocations=1)
    assert error_code(Client(core, address=("198.51.100.1", 1)).login(T0)) is None
    other = Client(core, address=("198.51.100.2", 1), username="bob", password="builder")
    assert error_code(other.login(T0)) == 508
    core = make_core()
    client = Client(core)
    client.nonce = core.auth.new_nonce(client.address[0], T0)
    actions = core.handle(
        client.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)]),
        client.address,
        "udp",
        T0,
    )
    assert actions == [CreateRelay(client.address, "udp", 0)]
    (failure,) = core.relay_failed(client.address, T0)
    assert isinstance(failure, SendToClient)
    assert error_code(stun.parse(failure.data)) == 508
    assert core.allocations == {}


def test_bandwidth_quota_reaches_the_data_plane() -> None:
    core = make_core(bandwidth_per_allocation=125_000)
    client = Client(core)
    client.nonce = core.auth.new_nonce(client.address[0], T0)
    actions = core.handle(
        client.build(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)]),
        client.address,
        "udp",
        T0,
    )
    assert actions == [CreateRelay(client.address, "udp", 125_000)]


# --- permissions and channels --------------------------------------------------------------------


def test_permissions_install_expire_and_forbidden_peers_get_403() -> None:
    client = Client(make_core())
    client.login(T0)
    assert error_code(permission(client, PEER, T0)) is None
    assert client.data_plane == [InstallPermission(client.address, PEER[0], 300)]
    for forbidden in (
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "224.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
        "240.0.0.1",
    ):
        if ":" in forbidden:
            continue  # an IPv4 allocation: IPv6 peers are refused earlier, with 443
        answer = permission(client, (forbidden, 1), T0)
        assert error_code(answer) == 403, forbidden
    assert error_code(permission(client, ("2001:4860::8888", 1), T0)) == 443
    assert client.core.dropped["forbidden-peer"] >= 1
    allocation = client.core.allocations[client.address]
    assert set(allocation.permissions) == {PEER[0]}
    client.core.expire(T0 + 300)
    assert allocation.permissions == {}


def test_policy_rules_for_ipv6_and_allow_lists() -> None:
    policy = RelayPolicy()
    for forbidden in (
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::",
        "::ffff:10.0.0.1",
        "2002:c0a8:0101::1",
        "64:ff9b::7f00:1",
        "2001:db8::1",
        "not an ip",
    ):
        assert not policy.peer_allowed(forbidden), forbidden
    for allowed in ("2001:4860:4860::8888", "93.184.216.34", "2002:5db8:d822::1"):
        assert policy.peer_allowed(allowed), allowed
    own = RelayPolicy(relay_addresses=frozenset(parse_networks(["93.184.216.34"])[0].hosts()))
    assert not own.peer_allowed("93.184.216.34")
    loopback = RelayPolicy(allow_peers=parse_networks(["127.0.0.0/8", "::1"]))
    assert loopback.peer_allowed("127.0.0.1")
    assert loopback.peer_allowed("::1")
    assert not loopback.peer_allowed("10.0.0.1")
    denied = RelayPolicy(deny_peers=parse_networks(["93.184.216.0/24"]))
    assert not denied.peer_allowed("93.184.216.34")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["10.0.0.0/33"])


def test_allow_listed_loopback_can_be_relayed_to() -> None:
    client = Client(make_core(allow_peers=parse_networks(["127.0.0.0/8"])))
    client.login(T0)
    assert error_code(permission(client, ("127.0.0.1", 9), T0)) is None


def test_the_relays_own_address_is_a_peer_only_at_live_allocations() -> None:
    """Two clients of one relay reach each other's relayed addresses without the relay's IP
    being allow-listed; any other port there, and a freed allocation's, is refused (403), and
    a TCP client's data to one is dropped although its permission (per IP) holds."""
    own = "192.0.2.10"  # the fake data plane's relayed IP
    core = make_core(relay_addresses=frozenset({ipaddress.ip_address(own)}))
    a = Client(core)
    b = Client(core, address=("198.51.100.8", 50000), _next_port=50000)
    tcp = Client(core, address=("198.51.100.9", 50000), transport="tcp", _next_port=51000)
    for client in (a, b, tcp):
        assert error_code(client.login(T0)) is None
    assert a.relayed is not None
    assert b.relayed is not None
    assert error_code(permission(a, b.relayed, T0)) is None
    assert error_code(channel_bind(b, 0x4000, a.relayed, T0)) is None
    assert error_code(permission(tcp, b.relayed, T0)) is None
    for port in (3478, 9, a.relayed[1] + 100):
        assert error_code(permission(a, (own, port), T0)) == 403
        assert error_code(channel_bind(a, 0x4001, (own, port), T0)) == 403

    def send(peer: Address) -> list[Action]:
        tid = os.urandom(12)
        data = (
            MessageBuilder(Method.SEND, MessageClass.INDICATION, tid)
            .add(*peer_attr(peer, tid))
            .add(Attr.DATA, b"x")
            .finish()
        )
        return core.handle(data, tcp.address, "tcp", T0 + 1)

    assert send(b.relayed) == [SendToPeer(tcp.address, b.relayed, b"x")]
    assert send((own, 3478)) == []
    assert core.dropped["forbidden-peer"] == 7

    assert error_code(refresh(b, T0 + 2, lifetime=0)) is None  # B's allocation is freed
    assert error_code(permission(a, b.relayed, T0 + 2)) == 403
    assert send(b.relayed) == []
    assert core.dropped["forbidden-peer"] == 9
    # Deny-listed, even a live allocation is refused; allow-listed, any port is fine.
    denied = make_core(
        relay_addresses=frozenset({ipaddress.ip_address(own)}), deny_peers=parse_networks([own])
    )
    c, d = Client(denied), Client(denied, address=("198.51.100.8", 50000), _next_port=50000)
    assert error_code(c.login(T0)) is None
    assert error_code(d.login(T0)) is None
    assert d.relayed is not None
    assert error_code(permission(c, d.relayed, T0)) == 403
    allowed = make_core(
        relay_addresses=frozenset({ipaddress.ip_address(own)}), allow_peers=parse_networks([own])
    )
    e = Client(allowed)
    assert error_code(e.login(T0)) is None
    assert error_code(permission(e, (own, 3478), T0)) is None
    assert allowed.policy.guarded_own_ips() == []
    assert core.policy.guarded_own_ips() == [own]


def test_permission_request_rules() -> None:
    core = make_core(max_permissions_per_allocation=2)
    client = Client(core)
    client.login(T0)
    assert error_code(client.request(Method.CREATE_PERMISSION, T0)) == 400
    bad = client.request(Method.CREATE_PERMISSION, T0, [(Attr.XOR_PEER_ADDRESS, b"\x00\x01")])
    assert error_code(bad) == 400
    assert error_code(permission(client, PEER, T0)) is None
    assert error_code(permission(client, OTHER_PEER, T0)) is None
    assert error_code(permission(client, ("93.184.216.36", 1), T0)) == 508
    assert error_code(permission(client, PEER, T0 + 10)) is None  # refreshing is fine
    stranger = Client(core, address=("198.51.100.99", 1), nonce=client.nonce)
    stranger.nonce = core.auth.new_nonce(stranger.address[0], T0)
    assert error_code(permission(stranger, PEER, T0)) == 437


def test_channel_bind_rules() -> None:
    client = Client(make_core())
    client.login(T0)
    assert error_code(channel_bind(client, 0x4000, PEER, T0)) is None
    assert client.data_plane == [
        InstallPermission(client.address, PEER[0], 300),
        InstallChannel(client.address, 0x4000, PEER, 600),
    ]
    assert error_code(channel_bind(client, 0x4000, PEER, T0 + 1)) is None  # refresh
    assert error_code(channel_bind(client, 0x4000, OTHER_PEER, T0)) == 400  # channel taken
    assert error_code(channel_bind(client, 0x4001, PEER, T0)) == 400  # peer has a channel
    for number in (0x3FFF, 0x5000, 0x7FFF, 0xFFFF):
        assert error_code(channel_bind(client, number, OTHER_PEER, T0)) == 400
    assert error_code(channel_bind(client, 0x4001, ("10.0.0.1", 1), T0)) == 403
    missing = client.request(Method.CHANNEL_BIND, T0, [(Attr.CHANNEL_NUMBER, b"\x40\x02\x00\x00")])
    assert error_code(missing) == 400
    # After it expires, the channel goes to another peer only once 5 more minutes passed.
    refresh(client, T0 + 500, 3600)
    client.core.expire(T0 + 601)
    client.renew_nonce(T0 + 601)
    assert error_code(channel_bind(client, 0x4000, OTHER_PEER, T0 + 601)) == 400
    assert error_code(channel_bind(client, 0x4001, PEER, T0 + 601)) == 400
    assert (
        client.core.handle(
            stun.encode_channel_data(0x4000, b"late"), client.address, "udp", T0 + 601
        )
        == []
    )
    client.core.expire(T0 + 901)
    client.renew_nonce(T0 + 901)
    assert error_code(channel_bind(client, 0x4000, OTHER_PEER, T0 + 901)) is None
    assert error_code(channel_bind(client, 0x4001, PEER, T0 + 901)) is None


def test_unknown_method_gets_400() -> None:
    client = Client(make_core())
    client.login(T0)
    assert error_code(client.request(0x00A, T0)) == 400  # Connect (RFC 6062): TCP relaying


# --- data from TCP clients ----------------------------------------------------------------------


def test_tcp_client_send_and_channel_data_need_permission_and_binding() -> None:
    core = make_core()
    client = Client(core, transport="tcp")
    client.login(T0)

    def send_indication(peer: Address, payload: bytes) -> list[Action]:
        tid = os.urandom(12)
        data = (
            MessageBuilder(Method.SEND, MessageClass.INDICATION, tid)
            .add(*peer_attr(peer, tid))
            .add(Attr.DATA, payload)
            .finish()
        )
        return core.handle(data, client.address, "tcp", T0 + 1)

    assert send_indication(PEER, b"early") == []
    assert core.dropped["no-permission"] == 1
    permission(client, PEER, T0)
    assert send_indication(PEER, b"hi") == [SendToPeer(client.address, PEER, b"hi")]
    frame = stun.encode_channel_data(0x4000, b"chan", pad=True)
    assert core.handle(frame, client.address, "tcp", T0) == []
    assert core.dropped["unbound-channel"] == 1
    channel_bind(client, 0x4000, OTHER_PEER, T0)
    assert core.handle(frame, client.address, "tcp", T0) == [
        SendToPeer(client.address, OTHER_PEER, b"chan")
    ]
    assert core.handle(frame[:6], client.address, "tcp", T0) == []  # truncated
    assert core.client_closed(client.address, "tcp") == [ReleaseRelay(client.address, "tcp")]
    assert core.allocations == {}


_attr_types = st.sampled_from([int(a) for a in Attr] + [0x0031, 0x8031])


@given(
    method=st.sampled_from([int(m) for m in Method] + [0x00A, 0xFFF]),
    cls=st.sampled_from(MessageClass),
    attributes=st.lists(st.tuples(_attr_types, st.binary(max_size=24)), max_size=8),
    sign=st.booleans(),
    raw=st.binary(max_size=64),
)
def test_core_never_raises_on_hostile_messages(
    method: int,
    cls: MessageClass,
    attributes: list[tuple[int, bytes]],
    sign: bool,
    raw: bytes,
) -> None:
    core = make_core()
    client = Client(core)
    client.login(T0)
    builder = MessageBuilder(method, cls, os.urandom(12))
    for attr, value in attributes:
        if attr not in (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT):
            builder.add(attr, value)
    if sign:
        builder.add_text(Attr.USERNAME, "alice").add_text(Attr.REALM, REALM)
        builder.add_text(Attr.NONCE, client.nonce or "")
    data = builder.finish(key=client.key() if sign else None)
    for transport in ("udp", "tcp"):
        for payload in (data, raw, b"\x40\x00" + raw, data[: len(raw) % (len(data) + 1)]):
            actions = core.handle(payload, client.address, transport, T0)  # type: ignore[arg-type]
            for action in actions:
                if isinstance(action, SendToClient):
                    stun.parse(action.data)  # every answer is well-formed
