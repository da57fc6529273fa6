"""Two teia hosts that reach each other only through a teia relay, on loopback: ping, a 1 MB
transfer and identify over a QUIC session that stays end to end (the relay's counters show
the traffic, and a marker sent inside a stream never appears in any datagram exchanged with
the relay); a relay restart in between (the hosts re-allocate and reconnect, waiting on their
address-change events); and the bad paths."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from teia.errors import ConfigError, RelayUnavailable
from teia.host.host import Host
from teia.host.streams import NegotiatedStream
from teia.identity import Identity, Multiaddr
from teia.peer.profile import PeerConfig
from teia.relay.auth import rest_password
from teia.relay.client import RelayClientConfig, TurnSession
from teia.relay.server import RelayServer
from teia.relay.service import RelayConfig, build_server

TIMEOUT = 60
REALM = "teia.test"
REST_SECRET = "relayed-hosts-secret"
SINK = "/teia/test/sink/1.0.0"
MARKER = b"PLAINTEXT-CANARY-7f3a9c"
MEGABYTE = 1024 * 1024


@contextlib.asynccontextmanager
async def running_relay(
    tmp_path: Path,
    port: int = 0,
    *,
    ip: str = "127.0.0.1",
    allow: tuple[str, ...] = ("127.0.0.0/8",),
) -> AsyncIterator[RelayServer]:
    config = RelayConfig(
        listen=f"{ip}:{port}",
        realm=REALM,
        user=["alice:wonderland"],
        auth_secret=REST_SECRET,
        allow_peer=list(allow),
        data_dir=tmp_path / "relay",
        tcp=False,
    )
    async with build_server(config) as server:
        yield server


def long_term(port: int, ip: str = "127.0.0.1", **overrides: Any) -> RelayClientConfig:
    settings: dict[str, Any] = {
        "address": f"{ip}:{port}",
        "username": "alice",
        "password": "wonderland",
        "keepalive": 0.5,
        "rto": 0.2,
        "max_transmissions": 4,
    }
    settings.update(overrides)
    return RelayClientConfig(**settings)


def rest(port: int, ip: str = "127.0.0.1") -> RelayClientConfig:
    return RelayClientConfig(
        address=f"{ip}:{port}",
        rest_secret=REST_SECRET,
        rest_user="bob",
        keepalive=0.5,
        rto=0.2,
        max_transmissions=4,
    )


class Sniffer:
    """Every datagram exchanged with the relay, as the relay sees it (wrapped and unwrapped
    by the hosts' TURN sessions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.to_relay: list[bytes] = []
        self.from_relay: list[bytes] = []
        wrap, feed = TurnSession.wrap, TurnSession.feed

        def sniff_wrap(session: TurnSession, peer: tuple[str, int], data: bytes) -> bytes | None:
            wrapped = wrap(session, peer, data)
            if wrapped is not None:
                self.to_relay.append(wrapped)
            return wrapped

        def sniff_feed(session: TurnSession, data: bytes) -> tuple[tuple[str, int], bytes] | None:
            self.from_relay.append(data)
            return feed(session, data)

        monkeypatch.setattr(TurnSession, "wrap", sniff_wrap)
        monkeypatch.setattr(TurnSession, "feed", sniff_feed)

    def total(self) -> int:
        return sum(map(len, self.to_relay)) + sum(map(len, self.from_relay))

    def saw(self, marker: bytes) -> bool:
        return any(marker in datagram for datagram in self.to_relay + self.from_relay)


async def serve_sink(stream: NegotiatedStream) -> None:
    """Read everything, answer with the byte count."""
    received = 0
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            received += len(await stream.receive())
    await stream.send(str(received).encode())


async def exchange(a: Host, b: Host, b_relayed: Multiaddr) -> None:
    """Connect ``a`` to ``b`` at its relayed address; ping, 1 MB with the marker, identify."""
    connection = await a.connect(b_relayed)
    assert connection.remote_address == b_relayed.to_udp_address()
    assert connection.remote_peer.peer_id == b.peer_id
    assert len(await a.ping(b.peer_id, count=3)) == 3
    stream = await a.open_stream(b.peer_id, SINK)
    chunk = MARKER + bytes(64 * 1024 - len(MARKER))
    for _ in range(MEGABYTE // len(chunk)):
        await stream.send(chunk)
    await stream.send_eof()
    assert await stream.receive() == str(MEGABYTE).encode()
    await stream.aclose()
    info = await a.identify(b.peer_id)
    assert b_relayed.without_peer_id() in info.listen_multiaddrs


def relayed_bytes(server: RelayServer) -> tuple[int, int]:
    """Payload bytes the relay sent out of relayed sockets, and to its clients."""
    stats: dict[str, int] = server.data_plane.stats()  # type: ignore[attr-defined]
    return stats["bytes_to_peers"], stats["bytes_to_clients"]


@pytest.mark.parametrize(
    ("anyio_backend", "relay_ip", "allow", "relay_host"),
    [
        ("trio", "127.0.0.1", ("127.0.0.0/8",), "127.0.0.1"),
        ("asyncio", "127.0.0.1", ("127.0.0.0/8",), "127.0.0.1"),
        # Neither loopback nor the relay's own IP allow-listed: the hosts reach each other's
        # relayed addresses because they are live allocations of that relay.
        ("trio", "127.0.0.2", ("127.0.0.3/32",), "127.0.0.2"),
        # The hosts name the relay (resolved from /etc/hosts, never a DNS query).
        ("trio", "127.0.0.1", ("127.0.0.0/8",), "localhost"),
    ],
)
@pytest.mark.anyio
async def test_two_hosts_talk_through_the_relay_end_to_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    relay_ip: str,
    allow: tuple[str, ...],
    relay_host: str,
) -> None:
    sniffer = Sniffer(monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with running_relay(tmp_path, ip=relay_ip, allow=allow) as server:
            changes: list[list[Multiaddr]] = []
            async with (
                Host(Identity.generate(), relays=[long_term(server.port, relay_host)]) as a,
                Host(Identity.generate(), relays=[rest(server.port, relay_host)]) as b,
            ):
                b.on_relayed_addrs_change(changes.append)
                b.set_handler(SINK, serve_sink)
                (a_relayed,) = await a.wait_relayed_addrs()
                (b_relayed,) = await b.wait_relayed_addrs()
                assert changes == [[b_relayed]]
                assert b_relayed in b.addrs
                assert b_relayed.peer_id == b.peer_id
                host, port = b_relayed.to_udp_address()
                assert host == relay_ip
                assert port not in (server.port, b.listen_addrs[0].to_udp_address()[1])

                await exchange(a, b, b_relayed)

                # B saw A at A's relayed address: the path really was relay to relay.
                (inbound,) = b.connections.connections_to(a.peer_id)
                assert inbound.remote_address == a_relayed.to_udp_address()
                # Each byte crossed the relay twice: A's allocation out to B's relayed address,
                # then B's allocation in to B.
                assert min(relayed_bytes(server)) > MEGABYTE
                assert server.core.responses[("channel_bind", 200)] >= 2  # ChannelData both ways
                assert sniffer.total() > 2 * MEGABYTE
                assert not sniffer.saw(MARKER)  # QUIC encrypted it end to end
                assert server.core.responses[("create_permission", 403)] == 0


class RelayIncarnation:
    """A relay run in its own task, so a test can stop it and start another on its port."""

    def __init__(self, tmp_path: Path, port: int = 0) -> None:
        self.tmp_path = tmp_path
        self.port = port
        self.stop = anyio.Event()
        self.stopped = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[RelayServer]) -> None:
        try:
            async with running_relay(self.tmp_path, self.port) as server:
                task_status.started(server)
                await self.stop.wait()
        finally:
            self.stopped.set()


@pytest.mark.anyio
async def test_hosts_reallocate_and_reconnect_after_a_relay_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sniffer = Sniffer(monkeypatch)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as relays:
            before = RelayIncarnation(tmp_path)
            first = await relays.start(before.run)
            port = first.port
            async with (
                Host(Identity.generate(), relays=[long_term(port)]) as a,
                Host(Identity.generate(), relays=[rest(port)]) as b,
            ):
                b.set_handler(SINK, serve_sink)
                (old_a,) = await a.wait_relayed_addrs()
                (old_b,) = await b.wait_relayed_addrs()
                await exchange(a, b, old_b)

                before.stop.set()  # the relay stops …
                await before.stopped.wait()
                after = RelayIncarnation(tmp_path, port)
                second = await relays.start(after.run)
                # … and comes back on the same port, knowing nothing of the allocations; the
                # hosts notice at their next refresh (437), allocate anew, and say so.
                (new_a,) = await a.wait_relayed_addrs(lambda addrs: addrs not in ([], [old_a]))
                (new_b,) = await b.wait_relayed_addrs(lambda addrs: addrs not in ([], [old_b]))
                # The connection through the lost allocations was closed, so this dials anew.
                await exchange(a, b, new_b)
                assert min(relayed_bytes(second)) > MEGABYTE
                (inbound,) = [c for c in b.connections.connections_to(a.peer_id) if not c.is_closed]
                assert inbound.remote_address == new_a.to_udp_address()
            after.stop.set()
    assert not sniffer.saw(MARKER)


@pytest.mark.anyio
async def test_dialing_through_a_relay_without_one_is_a_clear_error(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            running_relay(tmp_path) as server,
            Host(Identity.generate()) as lonely,
            Host(Identity.generate(), relays=[long_term(server.port)]) as b,
        ):
            (b_relayed,) = await b.wait_relayed_addrs()
            with pytest.raises(RelayUnavailable, match="no relay is configured"):
                await lonely.connect(b_relayed, via_relay=True)


@pytest.mark.anyio
async def test_a_refused_allocation_makes_relayed_dials_fail_fast(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with running_relay(tmp_path) as server:
            bad = long_term(server.port, password="not-her-password")
            async with (
                Host(Identity.generate(), relays=[bad]) as a,
                Host(Identity.generate(), relays=[long_term(server.port)]) as b,
            ):
                (b_relayed,) = await b.wait_relayed_addrs()
                with pytest.raises(RelayUnavailable, match="401"):
                    await a.connect(b_relayed)
                assert a.relayed_addrs == []


def test_a_relay_needs_a_listen_address_of_its_ip_version() -> None:
    relay = RelayClientConfig(address="[::1]:3478", username="a", password="b")
    with pytest.raises(ConfigError, match="IPv6"):
        Host(Identity.generate(), relays=[relay])


def test_rest_credentials_match_the_relays_formula() -> None:
    username, password = rest(3478).credentials(time.time())
    assert username.endswith(":bob")
    assert password == rest_password(REST_SECRET.encode(), username)


def test_a_relay_may_be_named() -> None:
    """A name is resolved by the system resolver when the configuration is made (``localhost``
    from /etc/hosts here); IPv4 first; the text stays as written."""
    relay = RelayClientConfig(address="localhost:3478", username="a", password="b")
    assert relay.server == ("127.0.0.1", 3478)
    assert relay.address == "localhost:3478"
    profile = PeerConfig.from_toml(
        {"relays": [{"address": "localhost:3480", "username": "a", "password": "b"}]}, "test"
    )
    assert [r.server for r in profile.relay_configs()] == [("127.0.0.1", 3480)]
    for bad in ("local_host:3478", "-localhost:3478", ":3478", "localhost:0", "localhost"):
        with pytest.raises(ConfigError, match="relay address"):
            RelayClientConfig(address=bad, username="a", password="b")


def test_a_relay_name_that_does_not_resolve_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object, **kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)  # no query leaves the machine
    with pytest.raises(ConfigError, match="cannot resolve 'localhost': Name or service"):
        RelayClientConfig(address="localhost:1", username="a", password="b")
