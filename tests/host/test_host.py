"""Hosts on loopback: connect, ping, handlers by protocol, limits, shutdown."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from teia.errors import (
    ConnectionLimitExceeded,
    InvalidMultiaddr,
    NotConnected,
    PeerIdMismatch,
    ProtocolNotSupported,
)
from teia.host.connmgr import ConnectionLimits
from teia.host.host import _MAX_OBSERVED, _MAX_REPORTERS, OBSERVED_TTL, Host
from teia.host.streams import NegotiatedStream
from teia.identity import Identity, Multiaddr, PeerId
from teia.transport.quic import QuicConnectionHandle

TIMEOUT = 10
ECHO = "/teia/test-echo/1.0.0"


def new_host(**kwargs: object) -> Host:
    return Host(Identity.generate(), **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def two_hosts(**b_kwargs: object) -> AsyncIterator[tuple[Host, Host]]:
    async with new_host() as a, new_host(**b_kwargs) as b:
        yield a, b


async def read_all(stream: NegotiatedStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)


@pytest.mark.anyio
async def test_connect_and_ping() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            connection = await a.connect(b.addrs[0])
            assert connection.remote_peer.peer_id == b.peer_id
            rtts = await a.ping(b.peer_id, count=3)
            assert len(rtts) == 3
            # A second connect to a known peer reuses the connection.
            assert await a.connect(b.addrs[0]) is connection
            assert a.connections.peers() == [b.peer_id]
            assert b.connections.peers() == [a.peer_id]
            assert "/ipfs/ping/1.0.0" in b.protocols


@pytest.mark.anyio
async def test_handlers_by_protocol_see_the_remote_peer() -> None:
    seen: list[PeerId | None] = []

    async def echo(stream: NegotiatedStream) -> None:
        seen.append(stream.remote_peer_id)
        await stream.send(await read_all(stream))

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, echo)
            await a.connect(b.listen_addrs[0])
            stream = await a.open_stream(b.peer_id, ["/teia/unknown/9.9.9", ECHO])
            assert stream.protocol == ECHO
            await stream.send(b"round trip")
            await stream.send_eof()
            assert await read_all(stream) == b"round trip"
            await stream.aclose()
            assert seen == [a.peer_id]

            b.remove_handler(ECHO)
            with pytest.raises(ProtocolNotSupported):
                await a.open_stream(b.peer_id, ECHO)
            with pytest.raises(NotConnected):
                await a.open_stream(Identity.generate().peer_id, ECHO)


@pytest.mark.anyio
async def test_a_failing_handler_does_not_hurt_the_connection() -> None:
    async def broken(stream: NegotiatedStream) -> None:
        raise RuntimeError("handler bug")

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, broken)
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, ECHO)
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
            await stream.aclose()
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
async def test_wrong_peer_id_is_refused() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b), new_host() as c:
            with pytest.raises(PeerIdMismatch):
                await a.connect(b.listen_addrs[0].with_peer_id(c.peer_id))
            assert a.connections.peers() == []


@pytest.mark.anyio
async def test_inbound_limit_closes_the_extra_connection() -> None:
    limits = ConnectionLimits(max_inbound=1)
    with anyio.fail_after(TIMEOUT):
        async with two_hosts(limits=limits) as (a, b), new_host() as c:
            await a.connect(b.addrs[0])
            refused = await c.connect(b.addrs[0])
            await refused.wait_closed()
            assert b.connections.peers() == [a.peer_id]
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
async def test_outbound_limit_raises() -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            new_host(limits=ConnectionLimits(max_connections=1)) as a,
            new_host() as b,
            new_host() as c,
        ):
            await a.connect(b.listen_addrs[0])
            with pytest.raises(ConnectionLimitExceeded, match="max_connections"):
                await a.connect(c.listen_addrs[0])
            assert a.connections.peers() == [b.peer_id]


@pytest.mark.anyio
async def test_leaving_the_block_cancels_running_handlers() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def forever(stream: NegotiatedStream) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            b.set_handler(ECHO, forever)
            await a.connect(b.listen_addrs[0])
            await a.open_stream(b.peer_id, ECHO)
            await started.wait()
        assert cancelled.is_set()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.anyio
@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
async def test_dual_stack_host_dials_by_address_family() -> None:
    listen = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip6/::1/udp/0/quic-v1"]
    with anyio.fail_after(TIMEOUT):
        async with new_host(listen=listen) as a, new_host(listen=listen) as b:
            v6 = next(addr for addr in b.addrs if addr.protocols[0] == "ip6")
            connection = await a.connect(v6)
            assert ":" in connection.remote_address[0]
            assert len(await a.ping(b.peer_id)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_smoke_on_asyncio() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            await a.connect(b.addrs[0])
            assert len(await a.ping(b.peer_id, count=2)) == 2
            assert "/ipfs/ping/1.0.0" in (await a.identify(b.peer_id)).protocols


@pytest.mark.anyio
async def test_listen_addresses_must_be_quic_ip_literals() -> None:
    for bad in ("/ip4/127.0.0.1/tcp/0", "/dns4/localhost/udp/0/quic-v1", "/ip4/1.2.3.4/udp/1"):
        with pytest.raises(InvalidMultiaddr):
            new_host(listen=[bad])
    with pytest.raises(ValueError, match="at least one"):
        new_host(listen=[])


@pytest.mark.anyio
async def test_addresses_carry_the_peer_id_and_the_real_port() -> None:
    async with new_host() as a:
        (addr,) = a.addrs
        assert addr.peer_id == a.peer_id
        assert addr.without_peer_id() == a.listen_addrs[0]
        assert addr.to_udp_address()[1] != 0


@pytest.mark.anyio
async def test_identify_fills_the_address_book_and_reports_the_observed_address() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b), new_host() as c:
            await a.connect(b.addrs[0])
            await a.wait_identified(b.peer_id)
            await b.wait_identified(a.peer_id)
            assert b.listen_addrs[0] in a.peerstore.addrs(b.peer_id, now=anyio.current_time())
            # b saw a at a's bound address (loopback: no NAT in between).
            assert a.observed_addrs() == [a.listen_addrs[0]]
            # Peers the book knows can be dialed by peer ID alone.
            c.peerstore.add(b.peer_id, [b.addrs[0]], ttl=60, now=anyio.current_time())
            connection = await c.connect(b.peer_id)
            assert connection.remote_peer.peer_id == b.peer_id
            with pytest.raises(NotConnected, match="no known address"):
                await c.connect(Identity.generate().peer_id)


@pytest.mark.anyio
async def test_observed_addresses_count_distinct_peers_and_expire() -> None:
    host = new_host()  # not started: only its bookkeeping is used
    public = Multiaddr("/ip4/127.0.2.7/udp/4001/quic-v1")
    rebound = Multiaddr("/ip4/127.0.2.7/udp/5002/quic-v1")
    liar, a, b = (Identity.generate().peer_id for _ in range(3))
    for _ in range(5):  # one peer saying it again and again still counts once
        host._note_observed(rebound, liar, now=100.0)
    host._note_observed(public, a, now=110.0)
    host._note_observed(public, b, now=120.0)
    assert host.observed_addrs(now=130.0) == [public, rebound]
    assert host.observed_addrs(min_peers=2, now=130.0) == [public]
    # Only a quic-v1 address without a peer ID is taken.
    host._note_observed(Multiaddr("/ip4/127.0.2.8/udp/1/quic-v1/p2p/" + str(a)), a, now=130.0)
    host._note_observed(None, a, now=130.0)
    assert host.observed_addrs(now=130.0) == [public, rebound]
    # The NAT rebinds: old reports lapse, the new address is all that is left.
    later = 120.0 + OBSERVED_TTL + 1
    host._note_observed(rebound, a, now=later - 10)
    assert host.observed_addrs(now=later) == [rebound]
    assert host.observed_addrs(now=later + OBSERVED_TTL) == []


@pytest.mark.anyio
async def test_observed_addresses_are_bounded() -> None:
    host = new_host()
    reporter = Identity.generate().peer_id
    for port in range(1, 200):
        host._note_observed(Multiaddr(f"/ip4/127.0.2.9/udp/{port}/quic-v1"), reporter, now=1.0)
    assert len(host.observed_addrs(now=2.0)) == _MAX_OBSERVED
    many = Multiaddr("/ip4/127.0.2.10/udp/1/quic-v1")
    for _ in range(200):
        host._note_observed(many, Identity.generate().peer_id, now=3.0)
    assert len(host._observed[many]) == _MAX_REPORTERS
    assert host.observed_addrs(now=4.0)[0] == many


@pytest.mark.anyio
async def test_dns_addresses_resolve_on_loopback() -> None:
    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            port = b.listen_addrs[0].to_udp_address()[1]
            target = Multiaddr(f"/dns4/localhost/udp/{port}/quic-v1/p2p/{b.peer_id}")
            connection = await a.connect(target)
            assert connection.remote_address == ("127.0.0.1", port)


@pytest.mark.anyio
async def test_concurrent_dials_to_one_peer_share_one_connection() -> None:
    results = []

    async def dial(a: Host, target: Multiaddr) -> None:
        results.append(await a.connect(target))

    with anyio.fail_after(TIMEOUT):
        async with two_hosts() as (a, b):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(dial, a, b.addrs[0])
            assert len(results) == 10
            assert all(c is results[0] for c in results)
            assert len(a.connections.connections_to(b.peer_id)) == 1


@pytest.mark.anyio
async def test_simultaneous_dials_from_both_sides_settle_on_one_connection() -> None:
    dialed: dict[str, object] = {}

    async def dial(name: str, src: Host, dst: Host) -> None:
        dialed[name] = await src.connect(dst.addrs[0])

    with anyio.fail_after(TIMEOUT):
        async with new_host(close_grace=0.2) as a, new_host(close_grace=0.2) as b:
            async with anyio.create_task_group() as tg:
                tg.start_soon(dial, "a", a, b)
                tg.start_soon(dial, "b", b, a)
            small, large = sorted((a, b), key=lambda h: h.peer_id.to_bytes())
            survivor, loser = dialed["a" if small is a else "b"], dialed["a" if large is a else "b"]
            assert isinstance(survivor, QuicConnectionHandle)
            assert isinstance(loser, QuicConnectionHandle)
            # The smaller side keeps its own dial: a ping over it also proves that the larger
            # side accepted that connection.
            assert small._usable_connection(large.peer_id) is survivor
            assert len(await small.ping(large.peer_id)) == 1
            # The larger side drains its own dial and closes it after the grace period.
            await loser.wait_closed()
            (live,) = [
                c for c in large.connections.connections_to(small.peer_id) if not c.is_closed
            ]
            assert not live.is_initiator
            assert len(await large.ping(small.peer_id)) == 1
