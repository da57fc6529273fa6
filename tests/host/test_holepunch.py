"""Hole-punch signalling (`teia.host.holepunch`): the wire format under garbage, and what a
peer on the other end of a relayed connection can and cannot make us do (loopback relay on
127.0.0.2, hosts on 127.0.0.1). Punching across real NATs is in tests/nat."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import HolePunchError, InvalidHolePunchMessage, TransportError
from teia.host.holepunch import (
    HOLEPUNCH_PROTOCOL,
    MAX_CANDIDATES,
    MAX_MESSAGE_SIZE,
    HolePunchConfig,
    HolePunchMessage,
    MessageKind,
)
from teia.host.host import Host
from teia.host.protobuf import encode_bytes_field, encode_uvarint
from teia.identity import Identity, Multiaddr
from teia.relay.client import RelayClientConfig
from teia.relay.service import RelayConfig, build_server

TIMEOUT = 30
# How a refusal looks to the one refused: the stream ends or is reset without an answer.
REFUSED = (anyio.EndOfStream, anyio.IncompleteRead, TransportError)
SECRET = "holepunch-tests-secret"
LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"

# --- the wire format -------------------------------------------------------------------------

ip4 = st.ip_addresses(v=4).map(str)
ip6 = st.ip_addresses(v=6).map(lambda a: str(a).partition("%")[0])
ports = st.integers(min_value=1, max_value=65535)
candidates = st.builds(Multiaddr.from_udp, st.one_of(ip4, ip6), ports)
messages = st.one_of(
    st.builds(
        HolePunchMessage,
        st.just(MessageKind.CONNECT),
        st.lists(candidates, max_size=MAX_CANDIDATES).map(tuple),
    ),
    st.just(HolePunchMessage(MessageKind.SYNC)),
)


@given(messages)
def test_messages_round_trip(message: HolePunchMessage) -> None:
    data = message.encode()
    assert len(data) <= MAX_MESSAGE_SIZE
    assert HolePunchMessage.decode(data) == message


@given(st.binary(max_size=2 * MAX_MESSAGE_SIZE))
def test_garbage_decodes_or_raises_the_typed_error(data: bytes) -> None:
    try:
        message = HolePunchMessage.decode(data)
    except InvalidHolePunchMessage:
        return
    assert len(message.addrs) <= MAX_CANDIDATES
    assert HolePunchMessage.decode(message.encode()) == message


@given(messages, st.data())
def test_truncated_messages_raise_or_decode_to_less(
    message: HolePunchMessage, data: st.DataObject
) -> None:
    encoded = message.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    try:
        shorter = HolePunchMessage.decode(encoded[:cut])
    except InvalidHolePunchMessage:
        return
    assert len(shorter.addrs) < len(message.addrs)  # cut between two whole addresses


@given(st.binary(min_size=MAX_MESSAGE_SIZE + 1, max_size=4 * MAX_MESSAGE_SIZE))
def test_oversize_messages_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidHolePunchMessage, match="limit"):
        HolePunchMessage.decode(data)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return encode_uvarint(number << 3) + encode_uvarint(value)
    return encode_bytes_field(number, value)


ADDR = Multiaddr("/ip4/198.51.100.7/udp/4001/quic-v1")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "without a kind"),
        (_field(2, ADDR.to_bytes()), "without a kind"),
        (_field(1, 1) + _field(1, 1), "twice"),
        (_field(1, 9), "unknown message kind"),
        (_field(1, b"\x01"), "varint"),
        (_field(1, 1) + _field(2, 5), "bytes"),
        (_field(1, 2) + _field(2, ADDR.to_bytes()), "SYNC carries no addresses"),
        (_field(1, 1) + _field(2, ADDR.to_bytes()) * (MAX_CANDIDATES + 1), "more than"),
        (_field(1, 1) + _field(2, b"\xff\xff"), "bad candidate"),
        (
            _field(1, 1) + _field(2, Multiaddr("/dns4/example.test/udp/1/quic-v1").to_bytes()),
            "no names",
        ),
        (
            _field(1, 1) + _field(2, ADDR.with_peer_id(Identity.generate().peer_id).to_bytes()),
            "/p2p",
        ),
        (
            _field(1, 1) + _field(2, Multiaddr("/ip4/198.51.100.7/udp/0/quic-v1").to_bytes()),
            "port 0",
        ),
        (_field(1, 1) + _field(2, Multiaddr("/ip4/198.51.100.7/udp/9").to_bytes()), "quic-v1"),
        (_field(1, 1) + b"\x12\x05ab", "malformed"),
    ],
)
def test_rule_breaking_messages_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(InvalidHolePunchMessage, match=why):
        HolePunchMessage.decode(data)


def test_unknown_fields_are_skipped() -> None:
    data = _field(1, 1) + _field(7, b"later") + _field(2, ADDR.to_bytes())
    assert HolePunchMessage.decode(data) == HolePunchMessage(MessageKind.CONNECT, (ADDR,))


def test_encode_refuses_what_decode_would() -> None:
    with pytest.raises(InvalidHolePunchMessage):
        HolePunchMessage(MessageKind.CONNECT, (ADDR,) * (MAX_CANDIDATES + 1)).encode()
    with pytest.raises(InvalidHolePunchMessage):
        HolePunchMessage(MessageKind.SYNC, (ADDR,)).encode()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="CIDR"):
        HolePunchConfig(allow_networks=("not a network",))
    with pytest.raises(ValueError, match="positive"):
        HolePunchConfig(punch_timeout=0)
    with pytest.raises(ValueError, match="at least 1"):
        HolePunchConfig(max_attempts=0)


# --- what the other side of a relayed connection can make us do --------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@asynccontextmanager
async def relay(tmp_path: Path) -> AsyncIterator[RelayClientConfig]:
    config = RelayConfig(
        listen="127.0.0.2:0",
        realm="teia.test",
        auth_secret=SECRET,
        allow_peer=["127.0.0.0/8"],
        data_dir=tmp_path / "relay",
        tcp=False,
    )
    async with build_server(config) as server:
        yield RelayClientConfig(
            address=f"127.0.0.2:{server.port}", rest_secret=SECRET, keepalive=0.5, rto=0.2
        )


@asynccontextmanager
async def relayed_pair(
    tmp_path: Path, victim_config: HolePunchConfig
) -> AsyncIterator[tuple[Host, Host]]:
    """``victim`` dials ``other`` through the relay (so the victim wants that connection);
    ``other`` has no hole puncher of its own: the test speaks the protocol for it."""
    async with (
        relay(tmp_path) as relay_config,
        Host(Identity.generate(), relays=[relay_config], holepunch=victim_config) as victim,
        Host(Identity.generate(), relays=[relay_config]) as other,
    ):
        with anyio.fail_after(TIMEOUT):
            await victim.wait_relayed_addrs()
            target = (await other.wait_relayed_addrs())[0]
            connection = await victim.connect(target)
            await other.wait_identified(victim.peer_id)  # its side of the connection is up
        assert connection.is_relayed
        yield victim, other


@pytest.fixture
def watched() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.3 that a stranger names as a candidate."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.3", 0))
        sock.setblocking(False)
        yield sock


def _received(sock: socket.socket) -> int:
    count = 0
    for _ in range(1000):
        try:
            sock.recv(65535)
        except BlockingIOError:
            return count
        count += 1
    return count


async def _play_initiator(other: Host, victim: Host, addrs: list[Multiaddr]) -> HolePunchMessage:
    """Run the driver's side of the exchange by hand; the victim's CONNECT."""
    stream = await other.open_stream(victim.peer_id, HOLEPUNCH_PROTOCOL)
    try:
        await stream.send_message(HolePunchMessage(MessageKind.CONNECT, tuple(addrs)).encode())
        answer = HolePunchMessage.decode(await stream.receive_message(MAX_MESSAGE_SIZE))
        await stream.send_message(HolePunchMessage(MessageKind.SYNC).encode())
        return answer
    finally:
        await stream.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("allowed", [False, True])
async def test_a_peer_only_makes_us_dial_addresses_the_policy_allows(
    tmp_path: Path, watched: socket.socket, allowed: bool
) -> None:
    config = HolePunchConfig(allow_networks=("127.0.0.3/32",) if allowed else (), punch_timeout=1.0)
    async with relayed_pair(tmp_path, config) as (victim, other):
        host, port = watched.getsockname()
        # Only loopback bait on the wire (a policy bug must not send anything elsewhere); the
        # private, multicast and other loopback addresses are checked without sockets below.
        bait = [Multiaddr.from_udp(host, port)] + [
            Multiaddr.from_udp(ip, 4001) for ip in ("127.0.0.2", "127.0.0.4")
        ]
        with anyio.fail_after(TIMEOUT):
            await _play_initiator(other, victim, bait)
            assert victim.holepunch is not None
            (result,) = await victim.holepunch.wait_attempts(1)
        assert not result.success
        # The attempt is over, so no dial of it is still in flight: what came, came.
        assert (_received(watched) > 0) is allowed
        for ip in ("10.0.0.1", "192.168.1.1", "224.0.0.1", "169.254.1.1", "127.0.0.2"):
            assert victim.holepunch._dialable(Multiaddr.from_udp(ip, 4001)) is None, ip


@pytest.mark.anyio
async def test_unwanted_peers_and_direct_connections_are_refused(tmp_path: Path) -> None:
    config = HolePunchConfig(accept=lambda peer: False)
    async with relayed_pair(tmp_path, config) as (victim, other):
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(REFUSED):
                await _play_initiator(other, victim, [])
        assert victim.holepunch is not None
        assert victim.holepunch.stats["refused"] == 1
        assert victim.holepunch.stats["attempts"] == 0
    # Over a direct connection there is nothing to upgrade.
    async with (
        Host(Identity.generate(), holepunch=HolePunchConfig()) as victim,
        Host(Identity.generate()) as other,
    ):
        with anyio.fail_after(TIMEOUT):
            await other.connect(victim.addrs[0])
            with pytest.raises(REFUSED):
                await _play_initiator(other, victim, [])
            assert victim.holepunch is not None
            assert victim.holepunch.stats["refused"] == 1
            # Asked to upgrade it, the host has nothing to do.
            direct = await victim.holepunch.upgrade(other.peer_id)
            assert direct is victim.connection_to(other.peer_id)
            assert victim.holepunch.stats["attempts"] == 0
            assert direct is not None
            await direct.aclose()
            await direct.wait_closed()
            with pytest.raises(HolePunchError, match="no relayed connection"):
                await victim.holepunch.upgrade(other.peer_id)


@pytest.mark.anyio
async def test_a_malformed_offer_ends_the_attempt(tmp_path: Path) -> None:
    async with relayed_pair(tmp_path, HolePunchConfig(punch_timeout=5.0)) as (victim, other):
        with anyio.fail_after(TIMEOUT):
            stream = await other.open_stream(victim.peer_id, HOLEPUNCH_PROTOCOL)
            await stream.send_message(b"\x08\x01\x12\x03\xff\xff\xff")
            assert victim.holepunch is not None
            (result,) = await victim.holepunch.wait_attempts(1)
            await stream.aclose()
        assert not result.success
        assert "InvalidHolePunchMessage" in result.reason
