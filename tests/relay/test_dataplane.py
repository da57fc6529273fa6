"""The Rust TURN data plane through Python, with real loopback sockets: client ↔ relay ↔ peer.

The wire helpers below are written from RFC 8656 independently of the Rust codec, so they
cross-check it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the relay data plane is Linux-only"
)

from teia._native import RelayDataPlane  # noqa: E402

COOKIE = 0x2112A442
WAIT = 5.0
MINUTE_MS = 60_000


# --- wire helpers -------------------------------------------------------------------------


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _xor_address(host: str, port: int, transaction: bytes) -> bytes:
    ip = ipaddress.ip_address(host)
    mask = struct.pack("!I", COOKIE) + (transaction if ip.version == 6 else b"")
    packed = bytes(a ^ b for a, b in zip(ip.packed, mask, strict=False))
    family = 1 if ip.version == 4 else 2
    return struct.pack("!BBH", 0, family, port ^ (COOKIE >> 16)) + packed


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + _pad(value)


def send_indication(host: str, port: int, data: bytes) -> bytes:
    transaction = os.urandom(12)
    body = _attribute(0x0012, _xor_address(host, port, transaction)) + _attribute(0x0013, data)
    return struct.pack("!HHI", 0x0016, len(body), COOKIE) + transaction + body


def channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    message = struct.pack("!HH", channel, len(data)) + data
    return _pad(message) if pad else message


def parse_data_indication(message: bytes) -> tuple[tuple[str, int], bytes]:
    kind, length, cookie = struct.unpack_from("!HHI", message)
    assert (kind, cookie, len(message)) == (0x0017, COOKIE, 20 + length)
    transaction = message[8:20]
    at, peer, data = 20, None, None
    while at < len(message):
        attr, size = struct.unpack_from("!HH", message, at)
        value = message[at + 4 : at + 4 + size]
        if attr == 0x0012:
            family, xport = struct.unpack_from("!xBH", value)
            mask = struct.pack("!I", COOKIE) + (transaction if family == 2 else b"")
            raw = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
            peer = (str(ipaddress.ip_address(raw)), xport ^ (COOKIE >> 16))
        elif attr == 0x0013:
            data = value
        at += 4 + size + (-size % 4)
    assert peer is not None
    assert data is not None
    return peer, data


def binding_request() -> bytes:
    return struct.pack("!HHI", 0x0001, 0, COOKIE) + os.urandom(12)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def plane() -> Iterator[RelayDataPlane]:
    # Peers share the relay's IP here, as if the operator allow-listed loopback (own_ips=[]);
    # test_own_address_only_at_live_allocations checks the default.
    p = RelayDataPlane("127.0.0.1", own_ips=[])
    try:
        yield p
    finally:
        p.close()


def _udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(WAIT)
    return s


@pytest.fixture
def udp() -> Iterator[Callable[..., socket.socket]]:
    opened: list[socket.socket] = []

    def make(host: str = "127.0.0.1") -> socket.socket:
        s = _udp(host)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def wait_for(plane: RelayDataPlane, done: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Poll the counters until ``done`` holds: the worker runs on its own thread."""
    deadline = time.monotonic() + WAIT
    while True:
        stats = plane.stats()
        if done(stats):
            return stats
        assert time.monotonic() < deadline, f"counters never got there: {stats}"
        time.sleep(0.002)


def received(n: int) -> Callable[[dict[str, int]], bool]:
    return lambda stats: stats["client_datagrams"] == n


def nothing_arrives(s: socket.socket, within: float = 0.15) -> None:
    s.settimeout(within)
    try:
        with pytest.raises(TimeoutError):
            s.recvfrom(65536)
    finally:
        s.settimeout(WAIT)


def address(s: socket.socket) -> tuple[str, int]:
    host, port = s.getsockname()
    return str(host), int(port)


class Allocation:
    """One entry of ``allocation_stats()``, typed."""

    def __init__(self, entry: dict[str, object]) -> None:
        self.entry = entry

    def __getitem__(self, key: str) -> int:
        value = self.entry[key]
        assert isinstance(value, int)
        return value

    def value(self, key: str) -> object:
        return self.entry[key]

    @property
    def drops(self) -> dict[str, int]:
        drops = self.entry["drops"]
        assert isinstance(drops, dict)
        return drops


def allocation(plane: RelayDataPlane, client: socket.socket) -> Allocation:
    (found,) = [a for a in plane.allocation_stats() if a["client"] == address(client)]
    return Allocation(found)


class Pair:
    """A client with an allocation and a peer, all on loopback."""

    def __init__(self, plane: RelayDataPlane, udp: Callable[..., socket.socket]) -> None:
        self.plane = plane
        self.server = ("127.0.0.1", plane.port)
        self.client, self.peer = udp(), udp()
        self.client_addr = address(self.client)
        self.peer_addr = address(self.peer)
        self.relayed = plane.allocate(*self.client_addr)

    def permit(self, lifetime_ms: int = MINUTE_MS) -> None:
        self.plane.add_permission(*self.client_addr, self.peer_addr[0], lifetime_ms)

    def send(self, data: bytes) -> None:
        self.client.sendto(data, self.server)


@pytest.fixture
def pair(plane: RelayDataPlane, udp: Callable[..., socket.socket]) -> Pair:
    return Pair(plane, udp)


# --- forwarding ---------------------------------------------------------------------------


def test_send_indication_to_peer_and_data_indication_back(pair: Pair) -> None:
    assert pair.relayed[0] == "127.0.0.1"
    pair.permit()
    pair.send(send_indication(*pair.peer_addr, b"hello peer"))
    assert pair.peer.recvfrom(65536) == (b"hello peer", pair.relayed)

    pair.peer.sendto(b"hello client", pair.relayed)
    message, source = pair.client.recvfrom(65536)
    assert source == pair.server
    assert parse_data_indication(message) == (pair.peer_addr, b"hello client")

    # Odd lengths exercise the DATA padding both ways.
    for size in (0, 1, 3, 1199):
        data = os.urandom(size)
        pair.send(send_indication(*pair.peer_addr, data))
        assert pair.peer.recvfrom(65536) == (data, pair.relayed)
        pair.peer.sendto(data, pair.relayed)
        assert parse_data_indication(pair.client.recvfrom(65536)[0])[1] == data

    stats = pair.plane.stats()
    assert stats["packets_to_peers"] == stats["packets_to_clients"] == 5
    assert stats["dropped"] == 0
    a = allocation(pair.plane, pair.client)
    assert a.value("relayed") == pair.relayed
    assert a["bytes_to_peers"] == 10 + 1 + 3 + 1199
    assert a["bytes_to_client"] == 12 + 1 + 3 + 1199
    assert a["last_activity_ms"] >= a["created_ms"] > 1_600_000_000_000


def test_channel_data_both_ways(pair: Pair) -> None:
    pair.plane.bind_channel(*pair.client_addr, 0x4ABC, *pair.peer_addr, MINUTE_MS)
    for pad in (False, True):
        pair.send(channel_data(0x4ABC, b"odd", pad=pad))
        assert pair.peer.recvfrom(65536) == (b"odd", pair.relayed)
    pair.peer.sendto(b"back at you", pair.relayed)
    message, source = pair.client.recvfrom(65536)
    assert source == pair.server
    assert message == channel_data(0x4ABC, b"back at you")
    a = allocation(pair.plane, pair.client)
    assert (a["channels"], a["permissions"]) == (1, 1)
    assert (a["packets_to_peers"], a["packets_to_client"]) == (2, 1)


def test_without_permission_nothing_is_forwarded(
    pair: Pair, udp: Callable[..., socket.socket]
) -> None:
    pair.send(send_indication(*pair.peer_addr, b"no permission yet"))
    pair.peer.sendto(b"unsolicited", pair.relayed)
    stats = wait_for(pair.plane, lambda s: s["dropped_no_permission"] == 2)
    assert stats["packets_to_peers"] == stats["packets_to_clients"] == 0
    nothing_arrives(pair.peer)
    nothing_arrives(pair.client)

    # A permission is for one IP: another loopback address stays out.
    pair.permit()
    stranger = udp("127.0.0.2")
    stranger.sendto(b"intruder", pair.relayed)
    wait_for(pair.plane, lambda s: s["dropped_no_permission"] == 3)
    nothing_arrives(pair.client)
    assert allocation(pair.plane, pair.client).drops["no_permission"] == 3

    # ChannelData on an unbound channel, data from a client without an allocation.
    pair.send(channel_data(0x4000, b"unbound"))
    outsider = udp()
    outsider.sendto(send_indication(*pair.peer_addr, b"who am I"), pair.server)
    stats = wait_for(
        pair.plane, lambda s: s["dropped_unknown_channel"] == 1 and s["dropped_no_allocation"] == 1
    )
    assert stats["packets_to_peers"] == 0
    nothing_arrives(pair.peer)


def test_expired_permission_stops_forwarding(pair: Pair) -> None:
    pair.permit(lifetime_ms=300)
    pair.send(send_indication(*pair.peer_addr, b"in time"))
    assert pair.peer.recvfrom(65536)[0] == b"in time"

    # Keep sending until the data plane's own clock expires the permission.
    deadline = time.monotonic() + WAIT
    while pair.plane.stats()["dropped_no_permission"] == 0:
        assert time.monotonic() < deadline, "the permission never expired"
        pair.send(send_indication(*pair.peer_addr, b"still?"))
        time.sleep(0.02)
    forwarded = pair.plane.stats()["packets_to_peers"]
    pair.peer.settimeout(0.05)
    received = 0
    try:
        while True:
            pair.peer.recvfrom(65536)
            received += 1
    except TimeoutError:
        pass
    pair.peer.settimeout(WAIT)
    assert received == forwarded - 1

    # Both directions are closed now.
    dropped = pair.plane.stats()["dropped_no_permission"]
    pair.send(send_indication(*pair.peer_addr, b"too late"))
    pair.peer.sendto(b"too late", pair.relayed)
    wait_for(pair.plane, lambda s: s["dropped_no_permission"] == dropped + 2)
    nothing_arrives(pair.peer)
    nothing_arrives(pair.client)
    assert pair.plane.stats()["packets_to_peers"] == forwarded


def test_expired_channel_stops_channel_data(pair: Pair) -> None:
    pair.plane.bind_channel(*pair.client_addr, 0x4001, *pair.peer_addr, 300)
    deadline = time.monotonic() + WAIT
    while pair.plane.stats()["dropped_unknown_channel"] == 0:
        assert time.monotonic() < deadline, "the channel never expired"
        pair.send(channel_data(0x4001, b"ping"))
        time.sleep(0.02)
    forwarded = pair.plane.stats()["packets_to_peers"]
    assert forwarded >= 1
    pair.send(channel_data(0x4001, b"late"))
    wait_for(pair.plane, lambda s: s["dropped_unknown_channel"] == 2)
    assert pair.plane.stats()["packets_to_peers"] == forwarded


def test_garbage_and_truncated_datagrams_are_counted_never_forwarded(pair: Pair) -> None:
    pair.permit()
    pair.plane.bind_channel(*pair.client_addr, 0x4000, *pair.peer_addr, MINUTE_MS)
    good_send = send_indication(*pair.peer_addr, b"payload")
    good_channel = channel_data(0x4000, b"payload", pad=True)
    garbage = [
        b"",
        b"\x80",
        b"\xff" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        good_channel[:3],  # shorter than the header
        good_channel[:6],  # shorter than its length
        good_channel + b"\0\0\0\0",  # longer than length + padding
        channel_data(0x5000, b"reserved"),
        good_send[:19],
        good_send[:-1],
        good_send + b"\0\0\0\0",
        good_send[:4] + b"\0\0\0\0" + good_send[8:],  # bad cookie
        # A Send indication with an unknown comprehension-required attribute.
        good_send[:2]
        + struct.pack("!H", len(good_send) - 20 + 8)
        + good_send[4:]
        + _attribute(0x0024, b"\0\0\0\0"),
    ]
    for datagram in garbage:
        pair.send(datagram)
    stats = wait_for(pair.plane, lambda s: s["client_datagrams"] == len(garbage))
    assert stats["dropped_malformed"] == stats["dropped"] == len(garbage)
    assert stats["packets_to_peers"] == 0
    assert stats["control_messages"] == 0
    nothing_arrives(pair.peer)

    # Random bytes: never forwarded unless they happen to be well formed, never a crash.
    rng = os.urandom
    for _ in range(300):
        pair.send(rng(int.from_bytes(rng(1), "big")))
    stats = wait_for(pair.plane, lambda s: s["client_datagrams"] == len(garbage) + 300)
    assert stats["packets_to_peers"] == 0
    # The honest path still works afterwards.
    pair.send(good_send)
    assert pair.peer.recvfrom(65536) == (b"payload", pair.relayed)


# --- control plane ------------------------------------------------------------------------


def test_stun_requests_go_to_the_control_plane_and_replies_come_back(
    plane: RelayDataPlane, udp: Callable[..., socket.socket]
) -> None:
    client = udp()
    requests = [binding_request() for _ in range(5)]
    for r in requests:
        client.sendto(r, ("127.0.0.1", plane.port))
    got: list[tuple[bytes, str, int]] = []
    deadline = time.monotonic() + WAIT
    while len(got) < len(requests) and time.monotonic() < deadline:
        got += plane.recv_control(1000)
    host, port = address(client)
    assert got == [(r, host, port) for r in requests]
    started = time.monotonic()
    assert plane.recv_control(50) == []
    assert time.monotonic() - started >= 0.04

    plane.send_to_client(b"a response", host, port)
    assert client.recvfrom(65536) == (b"a response", ("127.0.0.1", plane.port))
    assert plane.stats()["control_replies"] == 1


def test_the_control_queue_is_bounded(udp: Callable[..., socket.socket]) -> None:
    plane = RelayDataPlane("127.0.0.1", control_queue=4)
    try:
        client = udp()
        for _ in range(10):
            client.sendto(binding_request(), ("127.0.0.1", plane.port))
        stats = wait_for(plane, lambda s: s["client_datagrams"] == 10)
        assert (stats["control_messages"], stats["dropped_control_queue_full"]) == (4, 6)
        assert len(plane.recv_control(1000)) == 4
    finally:
        plane.close()


def test_argument_errors(plane: RelayDataPlane) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        plane.allocate("localhost", 1000)
    with pytest.raises(ValueError, match="0-65535"):
        plane.allocate("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="no allocation"):
        plane.add_permission("127.0.0.1", 1000, "127.0.0.1", 1000)
    with pytest.raises(ValueError, match="no allocation"):
        plane.set_quota("127.0.0.1", 1000, 10)
    plane.allocate("127.0.0.1", 1000)
    with pytest.raises(ValueError, match="exists"):
        plane.allocate("127.0.0.1", 1000)
    with pytest.raises(ValueError, match="family"):
        plane.add_permission("127.0.0.1", 1000, "::1", 1000)
    with pytest.raises(ValueError, match=">= 0"):
        plane.add_permission("127.0.0.1", 1000, "127.0.0.1", -1)
    for channel in (0x3FFF, 0x5000, -1, 1 << 20):
        with pytest.raises(ValueError, match="outside 0x4000"):
            plane.bind_channel("127.0.0.1", 1000, channel, "127.0.0.1", 2000, 1000)
    with pytest.raises(ValueError, match="own listening address"):
        plane.bind_channel("127.0.0.1", 1000, 0x4000, "127.0.0.1", plane.port, 1000)
    plane.bind_channel("127.0.0.1", 1000, 0x4000, "127.0.0.1", 2000, 1000)
    with pytest.raises(ValueError, match="bound to"):
        plane.bind_channel("127.0.0.1", 1000, 0x4000, "127.0.0.1", 2001, 1000)
    with pytest.raises(ValueError, match="bound to"):
        plane.bind_channel("127.0.0.1", 1000, 0x4001, "127.0.0.1", 2000, 1000)
    assert plane.release("127.0.0.1", 1000)
    assert not plane.release("127.0.0.1", 1000)
    with pytest.raises(ValueError, match="range"):
        RelayDataPlane("127.0.0.1", relay_port_min=5000, relay_port_max=4000)
    with pytest.raises(ValueError, match="control_queue"):
        RelayDataPlane("127.0.0.1", control_queue=0)
    with pytest.raises(OSError, match="binding the relay"):
        RelayDataPlane("192.0.2.1")  # not a local address


def test_relay_port_range(udp: Callable[..., socket.socket]) -> None:
    probe = udp()
    port = address(probe)[1]
    probe.close()
    plane = RelayDataPlane("127.0.0.1", relay_port_min=port, relay_port_max=port)
    try:
        assert plane.allocate("127.0.0.1", 1000) == ("127.0.0.1", port)
        with pytest.raises(OSError, match="exhausted"):
            plane.allocate("127.0.0.1", 1001)
        plane.release("127.0.0.1", 1000)
        assert plane.allocate("127.0.0.1", 1001) == ("127.0.0.1", port)
    finally:
        plane.close()


@pytest.mark.parametrize("udp_gso", [True, False])
def test_bursts_arrive_whole_and_in_order(udp: Callable[..., socket.socket], udp_gso: bool) -> None:
    """Bursts of equal-sized datagrams (sent as GSO buffers when on) and odd sizes between
    them arrive one by one, whole and in order, both ways."""
    plane = RelayDataPlane("127.0.0.1", own_ips=[], udp_gso=udp_gso)
    try:
        server = ("127.0.0.1", plane.port)
        client, peer = udp(), udp()
        relayed = plane.allocate(*address(client))
        plane.bind_channel(*address(client), 0x4000, *address(peer), MINUTE_MS)
        sizes = [170] * 100 + [7, 1200, 1200, 1200, 1199, 1500, 1500] * 10
        frames = [channel_data(0x4000, bytes([i % 251]) * size) for i, size in enumerate(sizes)]
        for start in range(0, len(frames), 32):
            for frame in frames[start : start + 32]:
                client.sendto(frame, server)
            for frame in frames[start : start + 32]:
                assert peer.recvfrom(65536) == (frame[4:], relayed)
        for i, size in enumerate(sizes[:64]):
            peer.sendto(bytes([i]) * size, relayed)
        for i, size in enumerate(sizes[:64]):
            assert client.recvfrom(65536)[0] == channel_data(0x4000, bytes([i]) * size)
        assert plane.stats()["dropped"] == 0
    finally:
        plane.close()


def test_own_address_only_at_live_allocations(udp: Callable[..., socket.socket]) -> None:
    """By default the relay's own IP is reachable only at live relayed allocations: two clients
    of one relay talk through their relayed addresses; a local service on the relay's IP, the
    listening port and a freed allocation's port are refused both ways, whatever the
    permission for the IP says."""
    plane = RelayDataPlane("127.0.0.2")
    try:
        server = ("127.0.0.2", plane.port)
        a, b, c = udp("127.0.0.3"), udp("127.0.0.3"), udp("127.0.0.3")
        service = udp("127.0.0.2")
        ra, rb, rc = (plane.allocate(*address(s)) for s in (a, b, c))
        for s in (a, b, c):
            plane.add_permission(*address(s), "127.0.0.2", MINUTE_MS)

        a.sendto(send_indication(*rb, b"a to b"), server)
        assert parse_data_indication(b.recvfrom(65536)[0]) == (ra, b"a to b")
        plane.bind_channel(*address(b), 0x4000, *ra, MINUTE_MS)
        b.sendto(channel_data(0x4000, b"b to a"), server)
        assert parse_data_indication(a.recvfrom(65536)[0]) == (rb, b"b to a")

        with pytest.raises(ValueError, match="not a live relayed allocation"):
            plane.bind_channel(*address(a), 0x4001, *address(service), MINUTE_MS)
        a.sendto(send_indication(*address(service), b"to a local service"), server)
        service.sendto(b"from a local service", ra)
        assert plane.release(*address(b))
        a.sendto(send_indication(*rb, b"to a freed port"), server)
        # In order behind the refused ones: once this arrives, they have been dropped.
        a.sendto(send_indication(*rc, b"sync"), server)
        assert parse_data_indication(c.recvfrom(65536)[0]) == (ra, b"sync")
        stats = wait_for(plane, lambda s: s["dropped_forbidden_peer"] == 3)
        assert stats["dropped_no_permission"] == 0
        nothing_arrives(service)
        nothing_arrives(a)
    finally:
        plane.close()


# --- quotas, TCP clients, shutdown --------------------------------------------------------


def test_quota_drops_the_excess_while_a_neighbour_keeps_flowing(
    plane: RelayDataPlane, udp: Callable[..., socket.socket]
) -> None:
    server = ("127.0.0.1", plane.port)
    flooder, honest, peer = udp(), udp(), udp()
    rate = 20_000
    for client, quota in ((flooder, rate), (honest, 0)):
        plane.allocate(*address(client), bytes_per_second=quota)
        plane.bind_channel(*address(client), 0x4000, *address(peer), MINUTE_MS)
    message = channel_data(0x4000, b"x" * 1000)
    started = time.monotonic()
    sent = 0
    for _ in range(20):
        for _ in range(20):
            flooder.sendto(message, server)
        for _ in range(5):
            honest.sendto(message, server)
        sent += 25
        # Pace on the counter so no socket buffer overflows on the way in.
        wait_for(plane, received(sent))
    elapsed = time.monotonic() - started
    f, h = allocation(plane, flooder), allocation(plane, honest)
    assert h["packets_to_peers"] == 100
    assert set(h.drops.values()) == {0}
    assert f.drops["quota"] > 0
    assert f["packets_to_peers"] + f.drops["quota"] == 400
    # The burst (at least 16 KiB) plus the rate over the elapsed time, plus one datagram.
    assert f["bytes_to_peers"] <= 16 * 1024 + rate * elapsed + 1000
    assert f["bytes_per_second"] == rate

    plane.set_quota(*address(flooder), 0)
    before = plane.stats()["packets_to_peers"]
    for _ in range(20):
        flooder.sendto(message, server)
    wait_for(plane, lambda s: s["packets_to_peers"] == before + 20)


def test_tcp_clients_use_the_control_plane_path(
    plane: RelayDataPlane, udp: Callable[..., socket.socket]
) -> None:
    peer = udp()
    peer_host, peer_port = address(peer)
    relayed = plane.allocate("127.0.0.1", 4000, tcp=True)
    assert not plane.send_from_relay("127.0.0.1", 4000, peer_host, peer_port, b"early")
    assert plane.stats()["dropped_no_permission"] == 1
    plane.add_permission("127.0.0.1", 4000, peer_host, MINUTE_MS)
    assert plane.send_from_relay("127.0.0.1", 4000, peer_host, peer_port, b"over tcp")
    assert peer.recvfrom(65536) == (b"over tcp", relayed)

    peer.sendto(b"reply", relayed)
    ((message, host, port),) = plane.recv_relayed_for_tcp(int(WAIT * 1000))
    assert (host, port) == ("127.0.0.1", 4000)
    assert parse_data_indication(message) == ((peer_host, peer_port), b"reply")
    plane.bind_channel("127.0.0.1", 4000, 0x4321, peer_host, peer_port, MINUTE_MS)
    peer.sendto(b"reply", relayed)
    ((message, _, _),) = plane.recv_relayed_for_tcp(int(WAIT * 1000))
    assert message == channel_data(0x4321, b"reply", pad=True)


def test_release_stops_relaying(pair: Pair) -> None:
    pair.permit()
    assert pair.plane.release(*pair.client_addr)
    pair.send(send_indication(*pair.peer_addr, b"after release"))
    stats = wait_for(pair.plane, lambda s: s["dropped_no_allocation"] == 1)
    assert (stats["allocations"], stats["allocations_released"]) == (0, 1)
    nothing_arrives(pair.peer)


def test_close_returns_promptly_and_wakes_receivers(udp: Callable[..., socket.socket]) -> None:
    plane = RelayDataPlane("127.0.0.1")
    port = plane.port
    for i in range(20):
        plane.allocate("127.0.0.1", 10_000 + i)
    results: list[list[tuple[bytes, str, int]]] = []
    waiter = threading.Thread(target=lambda: results.append(plane.recv_control(30_000)))
    waiter.start()
    deadline = time.monotonic() + WAIT
    while plane.waiting_receivers() == 0:  # the waiter is blocked inside recv_control
        assert time.monotonic() < deadline
        time.sleep(0.001)
    started = time.monotonic()
    plane.close()
    assert time.monotonic() - started < 1.0
    waiter.join(timeout=WAIT)
    assert not waiter.is_alive()
    assert results == [[]]
    plane.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        plane.allocate("127.0.0.1", 1)
    with pytest.raises(ValueError, match="closed"):
        plane.send_to_client(b"x", "127.0.0.1", 1)
    # The listening port is free again.
    again = udp()
    again.close()
    rebound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rebound.bind(("127.0.0.1", port))
    rebound.close()
