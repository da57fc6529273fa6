"""The sans-IO TURN client against the sans-IO server core, in memory with explicit time:
the 401 and 438 dances, refreshes, permissions, channels, peer data both ways, a relay that
restarts or goes silent, and answers that must be ignored."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from teia.errors import ConfigError
from teia.relay import stun
from teia.relay.auth import RelayAuthenticator
from teia.relay.client import (
    AllocationCreated,
    AllocationFailed,
    AllocationLost,
    ChannelBound,
    PermissionRefused,
    PermissionsInstalled,
    RelayClientConfig,
    TurnClient,
    TurnEvent,
    TurnState,
)
from teia.relay.policy import RelayPolicy, parse_networks
from teia.relay.server import (
    Action,
    Address,
    CreateRelay,
    SendToClient,
    SendToPeer,
    TurnServerCore,
)
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method

REALM = "teia.test"
T0 = 1_800_000_000.0
CLIENT: Address = ("198.51.100.7", 50000)
RELAYED: Address = ("203.0.113.1", 49152)
SERVER: Address = ("203.0.113.1", 3478)
PEER: Address = ("93.184.216.34", 40000)


def make_core(*, nonce_lifetime: float = 600.0, **policy: object) -> TurnServerCore:
    auth = RelayAuthenticator(
        REALM,
        nonce_secret=b"n" * 32,
        users={"alice": "wonderland"},
        rest_secret=b"rest-secret",
        nonce_lifetime=nonce_lifetime,
    )
    return TurnServerCore(auth, RelayPolicy(**policy))  # type: ignore[arg-type]


@dataclass
class Wire:
    """Client and server core connected in memory; ``drop`` loses whatever the client sends."""

    core: TurnServerCore
    client: TurnClient
    now: float = T0
    drop: bool = False
    sent: list[bytes] = field(default_factory=list)
    to_peer: list[tuple[Address, bytes]] = field(default_factory=list)
    events: list[TurnEvent] = field(default_factory=list)

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, CreateRelay):
                self.execute(self.core.relay_created(action.client, RELAYED, self.now))
            elif isinstance(action, SendToClient):
                assert self.client.receive_datagram(action.data, self.now) is None
            elif isinstance(action, SendToPeer):
                self.to_peer.append((action.peer, action.data))

    def pump(self) -> None:
        """Deliver until both sides are quiet."""
        while True:
            outgoing = self.client.datagrams_to_send()
            if not outgoing:
                break
            for data in outgoing:
                self.sent.append(data)
                if not self.drop:
                    self.execute(self.core.handle(data, CLIENT, "udp", self.now))
        while (event := self.client.next_event()) is not None:
            self.events.append(event)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every client timer on the way."""
        end = self.now + seconds
        while True:
            timer = self.client.get_timer()
            if timer is None or timer > end:
                break
            self.now = max(self.now, timer)
            self.client.handle_timer(self.now)
            self.pump()
        self.now = end

    def sent_methods(self) -> list[tuple[int, bool]]:
        """(method, signed) of every request the client sent."""
        out = []
        for data in self.sent:
            message = stun.parse(data)
            out.append((message.method, message.has_integrity))
        return out


def allocated(core: TurnServerCore | None = None, **kwargs: object) -> Wire:
    client = TurnClient(SERVER, "alice", "wonderland", random=_counter(), **kwargs)  # type: ignore[arg-type]
    wire = Wire(core or make_core(allow_peers=parse_networks(["93.184.216.0/24"])), client)
    client.add_permission(PEER[0], wire.now)
    client.allocate(wire.now)
    wire.pump()
    return wire


def _counter() -> object:
    count = 0

    def random(size: int) -> bytes:
        nonlocal count
        count += 1
        return count.to_bytes(size, "big")

    return random


def test_allocate_answers_the_challenge_then_installs_permissions() -> None:
    wire = allocated()
    assert wire.client.state is TurnState.ALLOCATED
    assert wire.client.relayed == RELAYED
    assert wire.client.mapped == CLIENT
    assert wire.events[0] == AllocationCreated(RELAYED, CLIENT, 600)
    assert wire.events[1] == PermissionsInstalled((PEER[0],))
    assert wire.client.permissions == {PEER[0]}
    # Unsigned Allocate, 401, signed Allocate, then a signed CreatePermission.
    assert wire.sent_methods() == [
        (Method.ALLOCATE, False),
        (Method.ALLOCATE, True),
        (Method.CREATE_PERMISSION, True),
    ]
    assert wire.core.allocations[CLIENT].permissions.keys() == {PEER[0]}


def test_rest_credentials_from_a_shared_secret() -> None:
    config = RelayClientConfig(address="203.0.113.1:3478", rest_secret="rest-secret", rest_user="b")
    username, password = config.credentials(T0)
    assert username == f"{int(T0) + 86400}:b"
    client = TurnClient(SERVER, username, password)
    wire = Wire(make_core(), client)
    client.allocate(T0)
    wire.pump()
    assert client.state is TurnState.ALLOCATED
    assert wire.core.allocations[CLIENT].username == username


def test_config_needs_an_address_and_credentials() -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a name"):
        RelayClientConfig(address="relay_example:3478", username="a", password="b")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        RelayClientConfig(address="203.0.113.1", username="a", password="b")
    with pytest.raises(ConfigError, match="operator"):
        RelayClientConfig(address="203.0.113.1:3478")
    assert "secret" not in repr(RelayClientConfig(address="[2001:db8::1]:3478", rest_secret="s"))


def test_wrong_password_fails_after_one_signed_try() -> None:
    client = TurnClient(SERVER, "alice", "not-her-password")
    wire = Wire(make_core(), client)
    client.allocate(T0)
    wire.pump()
    assert client.state is TurnState.FAILED
    assert wire.events == [AllocationFailed(401, "Unauthenticated")]
    assert len(wire.sent) <= 3
    assert client.get_timer() is None


def test_refresh_keeps_the_allocation_and_a_stale_nonce_is_renewed() -> None:
    wire = allocated(make_core(nonce_lifetime=30, allow_peers=parse_networks(["93.0.0.0/8"])))
    wire.advance(25)  # the first keepalive Refresh: nonce still fresh
    assert wire.sent_methods()[-1] == (Method.REFRESH, True)
    before = len(wire.sent)
    wire.advance(25)  # the nonce is now 50 s old: 438, then the same Refresh with a new nonce
    refreshes = [m for m in wire.sent_methods()[before:] if m[0] == Method.REFRESH]
    assert len(refreshes) == 2
    assert wire.core.responses[("refresh", 438)] == 1
    assert wire.client.state is TurnState.ALLOCATED
    assert wire.core.allocations[CLIENT].expires == pytest.approx(wire.now + 600, abs=1)


def test_permissions_and_channels_are_refreshed_while_used() -> None:
    wire = allocated(keepalive=1000)
    wire.client.wrap(PEER, b"x", wire.now)
    wire.pump()
    assert ChannelBound(PEER, 0x4000) in wire.events
    wire.advance(240)
    assert wire.sent_methods()[-1][0] == Method.CREATE_PERMISSION
    wire.client.wrap(PEER, b"still in use", wire.now)
    wire.advance(60)  # 300 s: the used channel is bound again
    assert wire.sent_methods()[-1][0] == Method.CHANNEL_BIND
    wire.advance(300)  # unused since: let go, data falls back to Send indications
    assert stun.is_stun(wire.client.wrap(PEER, b"y", wire.now) or b"")


def test_peer_data_both_ways_indications_then_channels() -> None:
    wire = allocated()
    first = wire.client.wrap(PEER, b"hello", wire.now)
    assert first is not None
    assert stun.is_stun(first)
    wire.execute(wire.core.handle(first, CLIENT, "udp", wire.now))
    assert wire.to_peer == [(PEER, b"hello")]
    wire.pump()  # the ChannelBind started by the first send
    assert wire.events[-1] == ChannelBound(PEER, 0x4000)
    second = wire.client.wrap(PEER, b"again", wire.now)
    assert second is not None
    assert stun.is_channel_data(second)
    wire.execute(wire.core.handle(second, CLIENT, "udp", wire.now))
    assert wire.to_peer[-1] == (PEER, b"again")
    # From the peer: a Data indication (as the data plane builds it) and ChannelData.
    indication = MessageBuilder(Method.DATA, MessageClass.INDICATION, b"t" * 12)
    indication.add_xor_address(Attr.XOR_PEER_ADDRESS, *PEER).add(Attr.DATA, b"pong")
    assert wire.client.receive_datagram(indication.finish(), wire.now) == (PEER, b"pong")
    channel_data = stun.encode_channel_data(0x4000, b"pong2")
    assert wire.client.receive_datagram(channel_data, wire.now) == (PEER, b"pong2")
    assert wire.client.receive_datagram(stun.encode_channel_data(0x4001, b"?"), wire.now) is None
    assert wire.client.receive_datagram(b"\x40\x00\x00\x09abc", wire.now) is None


def test_a_restarted_relay_answers_437_and_the_allocation_is_lost() -> None:
    wire = allocated()
    wire.core = make_core()  # same nonce secret, no allocations: what a restart looks like
    wire.advance(25)
    assert wire.client.state is TurnState.FAILED
    assert wire.events[-1] == AllocationLost(437, "Allocation Mismatch")
    assert wire.client.relayed is None
    assert wire.client.wrap(PEER, b"x", wire.now) is None


def test_a_silent_relay_times_out_allocate_and_refresh_as_rfc_8489_says() -> None:
    client = TurnClient(SERVER, "alice", "wonderland")
    wire = Wire(make_core(), client, drop=True)
    client.allocate(T0)
    wire.pump()
    wire.advance(39.4)
    assert client.state is TurnState.ALLOCATING
    assert len(wire.sent) == 7  # at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5
    wire.advance(0.2)
    assert wire.events == [AllocationFailed(0, "the relay did not answer Allocate")]

    wire = allocated(rto=0.1, max_transmissions=3)
    wire.drop = True
    wire.advance(25 + 0.1 + 0.2 + 1.6 + 0.01)
    assert isinstance(wire.events[-1], AllocationLost)


def test_allocate_answered_437_deletes_the_old_allocation_and_asks_again() -> None:
    core = make_core()
    first = allocated(core)
    assert first.client.state is TurnState.ALLOCATED
    client = TurnClient(SERVER, "alice", "wonderland")  # forgot the first allocation
    wire = Wire(core, client)
    client.allocate(T0)
    wire.pump()
    assert client.state is TurnState.ALLOCATED
    assert core.responses[("allocate", 437)] == 1
    assert core.responses[("refresh", 200)] == 1


def test_a_forbidden_peer_is_refused_and_the_allocation_stays() -> None:
    wire = allocated(make_core())  # no allow-list: 127.0.0.1 is forbidden
    wire.client.add_permission("127.0.0.1", wire.now)
    wire.pump()
    assert wire.events[-1] == PermissionRefused(("127.0.0.1",), 403, "Forbidden")
    assert wire.client.state is TurnState.ALLOCATED


def test_answers_that_do_not_verify_or_match_are_ignored() -> None:
    client = TurnClient(SERVER, "alice", "wonderland", random=_counter())  # type: ignore[arg-type]
    wire = Wire(make_core(), client)
    client.allocate(T0)
    wire.pump()
    signed_tid = stun.parse(wire.sent[-1]).transaction_id
    assert client.state is TurnState.ALLOCATED
    client2 = TurnClient(SERVER, "alice", "wonderland", random=_counter())  # type: ignore[arg-type]
    client2.allocate(T0)
    client2._key = stun.long_term_key("alice", REALM, "wonderland")  # as if challenged already
    forged = MessageBuilder(
        Method.ALLOCATE,
        MessageClass.SUCCESS,
        stun.parse(client2.datagrams_to_send()[0]).transaction_id,
    )
    forged.add_xor_address(Attr.XOR_RELAYED_ADDRESS, "6.6.6.6", 6666)
    client2.receive_datagram(forged.finish(key=b"wrong key"), T0)  # bad integrity
    client2.receive_datagram(forged.finish(), T0)  # no integrity
    assert client2.state is TurnState.ALLOCATING
    other = MessageBuilder(Method.ALLOCATE, MessageClass.SUCCESS, b"z" * 12).finish()
    assert client.receive_datagram(other, T0) is None  # no such transaction
    assert client.receive_datagram(b"garbage", T0) is None
    assert signed_tid not in client._transactions
