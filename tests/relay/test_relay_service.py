"""The relay for real, on loopback: aioice's and coturn's TURN clients, hostile input beside an
honest allocation, the ``teia relay`` command, its metrics and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream

from teia.relay import stun
from teia.relay.auth import rest_password
from teia.relay.server import RelayServer
from teia.relay.service import RelayConfig, build_server
from teia.relay.stun import Attr, MessageBuilder, MessageClass, Method, StunMessage

TIMEOUT = 60
REALM = "teia.test"
REST_SECRET = "rest-secret-for-tests"
USERS = {"alice": "wonderland", "bob": "builder"}
UDP_TRANSPORT = bytes([17, 0, 0, 0])


def relay_config(tmp_path: Path, **overrides: Any) -> RelayConfig:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "realm": REALM,
        "user": [f"{name}:{password}" for name, password in USERS.items()],
        "auth_secret": REST_SECRET,
        "allow_peer": ["127.0.0.0/8"],
        "data_dir": tmp_path / "relay",
    }
    settings.update(overrides)
    return RelayConfig(**settings)


@contextlib.asynccontextmanager
async def running_relay(tmp_path: Path, **overrides: Any) -> AsyncIterator[RelayServer]:
    async with build_server(relay_config(tmp_path, **overrides)) as server:
        yield server


def rest_user(name: str, valid_for: int = 3600) -> tuple[str, str]:
    username = f"{int(time.time()) + valid_for}:{name}"
    return username, rest_password(REST_SECRET.encode(), username)


# --- a small TURN client of our own (for the hostile cases) --------------------------------------


class TurnTestClient:
    """Speaks TURN over a real UDP socket with teia's codec: enough to misbehave precisely."""

    def __init__(self, socket: anyio.abc.UDPSocket, server: tuple[str, int], user: str) -> None:
        self.socket = socket
        self.server = server
        self.username = user
        self.key = stun.long_term_key(user, REALM, USERS[user])
        self.nonce = ""
        self.relayed: tuple[str, int] | None = None

    async def exchange(self, data: bytes, transaction_id: bytes) -> StunMessage:
        await self.socket.sendto(data, *self.server)
        with anyio.fail_after(5):
            while True:
                reply, _ = await self.socket.receive()
                if stun.is_stun(reply):
                    message = stun.parse(reply)
                    if message.transaction_id == transaction_id:
                        return message

    def build(
        self, method: int, attributes: Sequence[tuple[int, bytes]], tid: bytes, *, key: bytes | None
    ) -> bytes:
        builder = MessageBuilder(method, MessageClass.REQUEST, tid)
        for attr, value in attributes:
            builder.add(attr, value)
        builder.add_text(Attr.USERNAME, self.username).add_text(Attr.REALM, REALM)
        builder.add_text(Attr.NONCE, self.nonce)
        return builder.finish(key=key, fingerprint=True)

    async def request(
        self, method: int, attributes: Sequence[tuple[int, bytes]], *, key: bytes | None = None
    ) -> StunMessage:
        tid = os.urandom(12)
        answer = await self.exchange(self.build(method, attributes, tid, key=key or self.key), tid)
        if code(answer) in (401, 438) and key is None:
            self.nonce = (answer.get(Attr.NONCE) or b"").decode()
            tid = os.urandom(12)
            answer = await self.exchange(self.build(method, attributes, tid, key=self.key), tid)
        return answer

    async def allocate(self) -> tuple[str, int]:
        answer = await self.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, UDP_TRANSPORT)])
        assert code(answer) is None, code(answer)
        assert answer.verify_integrity(self.key)
        relayed = answer.get(Attr.XOR_RELAYED_ADDRESS) or b""
        self.relayed = stun.decode_xor_address(relayed, answer.transaction_id)
        return self.relayed

    async def bind(self, channel: int, peer: tuple[str, int]) -> StunMessage:
        tid = os.urandom(12)  # XOR-PEER-ADDRESS is xored with the request's own ID
        attrs = [
            (Attr.CHANNEL_NUMBER, channel.to_bytes(2, "big") + b"\x00\x00"),
            (Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(*peer, tid)),
        ]
        answer = await self.exchange(self.build(Method.CHANNEL_BIND, attrs, tid, key=self.key), tid)
        return answer

    async def send(self, peer: tuple[str, int], data: bytes) -> None:
        """A Send indication (no answer comes)."""
        tid = os.urandom(12)
        builder = MessageBuilder(Method.SEND, MessageClass.INDICATION, tid)
        builder.add(Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(*peer, tid))
        builder.add(Attr.DATA, data)
        await self.socket.sendto(builder.finish(), *self.server)

    async def receive_data(self) -> tuple[tuple[str, int], bytes]:
        """The next Data indication: (peer, data)."""
        with anyio.fail_after(5):
            while True:
                datagram, _ = await self.socket.receive()
                if not stun.is_stun(datagram):
                    continue
                message = stun.parse(datagram)
                if message.cls == MessageClass.INDICATION and message.method == Method.DATA:
                    raw_peer = message.get(Attr.XOR_PEER_ADDRESS) or b""
                    peer = stun.decode_xor_address(raw_peer, message.transaction_id)
                    return peer, message.get(Attr.DATA) or b""

    async def permit(self, peer_ip: str, port: int = 9) -> StunMessage:
        tid = os.urandom(12)
        attrs = [(Attr.XOR_PEER_ADDRESS, stun.encode_xor_address(peer_ip, port, tid))]
        return await self.exchange(
            self.build(Method.CREATE_PERMISSION, attrs, tid, key=self.key), tid
        )


def code(message: StunMessage) -> int | None:
    if message.cls == MessageClass.SUCCESS:
        return None
    return stun.decode_error_code(message.get(Attr.ERROR_CODE) or b"")[0]


async def echo_peer(
    socket: anyio.abc.UDPSocket,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    async for data, (host, port) in socket:
        await socket.sendto(data, host, port)


# --- standard clients ------------------------------------------------------------------------


async def _aioice_round_trips(
    server_port: int, username: str, password: str, transport: str, count: int
) -> list[bytes]:
    from aioice import turn

    loop = asyncio.get_running_loop()
    received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(b"echo:" + data, addr)

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.put_nowait((data, addr))

    peer_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = peer_transport.get_extra_info("sockname")
    turn_transport, _ = await turn.create_turn_endpoint(
        Client, ("127.0.0.1", server_port), username, password, transport=transport
    )
    try:
        relayed = turn_transport.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
        answers = []
        for index in range(count):
            turn_transport.sendto(f"ping {index}".encode(), peer)
            data, addr = await asyncio.wait_for(received.get(), 5)
            assert tuple(addr) == tuple(peer)
            answers.append(data)
        return answers
    finally:
        turn_transport.close()
        peer_transport.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("credentials", ["long-term", "rest"])
@pytest.mark.anyio
async def test_aioice_turn_client_relays_through_teia(
    tmp_path: Path, transport: str, credentials: str
) -> None:
    username, password = ("alice", USERS["alice"]) if credentials == "long-term" else rest_user("x")
    with anyio.fail_after(TIMEOUT):
        async with running_relay(tmp_path) as server:
            answers = await _aioice_round_trips(server.port, username, password, transport, 30)
            assert answers == [f"echo:ping {i}".encode() for i in range(30)]
            stats: dict[str, int] = server.data_plane.stats()  # type: ignore[attr-defined]
            assert stats["allocations_created"] == 1
            assert server.core.responses[("channel_bind", 200)] >= 1


def _uclient() -> str:
    path = shutil.which("turnutils_uclient")
    assert path, "turnutils_uclient is missing: scripts/bootstrap-system.sh installs coturn"
    return path


@pytest.mark.parametrize(
    ("flags", "credentials"),
    [([], "long-term"), ([], "rest"), (["-t"], "long-term"), (["-t"], "rest")],
    ids=["udp-long-term", "udp-rest", "tcp-long-term", "tcp-rest"],
)
@pytest.mark.anyio
async def test_coturn_uclient_loses_nothing(
    tmp_path: Path, flags: list[str], credentials: str
) -> None:
    # -s: Send/Data indications (coturn's client picks channel numbers from RFC 5766's wider
    # range, which RFC 8656 reserves, so ChannelBind is refused with 400; aioice covers
    # channels). -c: no RTCP allocation pairs.
    auth = ["-u", "alice", "-w", USERS["alice"]]
    if credentials == "rest":
        auth = ["-u", "carol", "-W", REST_SECRET]
    with anyio.fail_after(TIMEOUT):
        async with (
            running_relay(tmp_path) as server,
            await anyio.create_udp_socket(local_host="127.0.0.1") as peer,
            anyio.create_task_group() as tg,
        ):
            await tg.start(echo_peer, peer)
            peer_port = peer.extra(anyio.abc.SocketAttribute.local_port)
            command = [_uclient(), *flags, "-s", "-c", *auth, "-e", "127.0.0.1",
                       "-r", str(peer_port), "-p", str(server.port), "-n", "200", "-l", "170",
                       "-m", "4", "127.0.0.1"]  # fmt: skip
            result = await anyio.run_process(command, check=False)
            output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
            tg.cancel_scope.cancel()
    assert "Total lost packets 0 (0.000000%)" in output, output[-2000:]
    assert "tot_send_msgs=800, tot_recv_msgs=800" in output, output[-2000:]


# --- hostile input beside an honest allocation ---------------------------------------------


@pytest.mark.anyio
async def test_bad_input_is_answered_or_dropped_while_an_honest_allocation_flows(
    tmp_path: Path,
) -> None:
    rate = 50_000
    async with (
        running_relay(tmp_path, bandwidth=rate) as server,
        await anyio.create_udp_socket(local_host="127.0.0.1") as honest_socket,
        await anyio.create_udp_socket(local_host="127.0.0.1") as flood_socket,
        await anyio.create_udp_socket(local_host="127.0.0.1") as rogue_socket,
        await anyio.create_udp_socket(local_host="127.0.0.1") as peer,
        await anyio.create_udp_socket(local_host="127.0.0.1") as sink,
        anyio.create_task_group() as tg,
    ):
        await tg.start(echo_peer, peer)
        relay = ("127.0.0.1", server.port)
        peer_address = ("127.0.0.1", peer.extra(anyio.abc.SocketAttribute.local_port))
        sink_address = ("127.0.0.1", sink.extra(anyio.abc.SocketAttribute.local_port))
        honest = TurnTestClient(honest_socket, relay, "alice")
        flooder = TurnTestClient(flood_socket, relay, "bob")
        rogue = TurnTestClient(rogue_socket, relay, "alice")
        with anyio.fail_after(TIMEOUT):
            await honest.allocate()
            assert code(await honest.bind(0x4000, peer_address)) is None
            await flooder.allocate()
            assert code(await flooder.bind(0x4000, sink_address)) is None
            await rogue.allocate()

            flood_frames = 0

            async def flood() -> None:
                nonlocal flood_frames
                frame = stun.encode_channel_data(0x4000, bytes(1000))
                for _ in range(3000):  # 3 MB against a 50 kB/s quota
                    await flood_socket.sendto(frame, *relay)
                    flood_frames += 1
                    await anyio.lowlevel.checkpoint()

            async def misbehave() -> None:
                send = rogue_socket.sendto
                await send(b"\x00\x01\x00\x08" + b"garbage" * 5, *relay)  # malformed STUN
                await send(stun.encode_channel_data(0x4000, b"hello")[:6], *relay)  # truncated
                await send(stun.encode_channel_data(0x4ABC, b"unbound"), *relay)
                wrong = await rogue.request(Method.REFRESH, [], key=b"not the key")
                assert code(wrong) == 401
                rogue.nonce = server.core.auth.new_nonce("127.0.0.1", time.time() - 3600)
                stale = await rogue.request(Method.REFRESH, [], key=rogue.key)
                assert code(stale) == 438
                rogue.nonce = (stale.get(Attr.NONCE) or b"").decode()
                for forbidden in ("10.0.0.1", "192.168.1.1", "169.254.0.1", "224.0.0.1"):
                    assert code(await rogue.permit(forbidden)) == 403
                assert code(await rogue.bind(0x5000, peer_address)) == 400

            tg.start_soon(flood)
            tg.start_soon(misbehave)
            # The honest allocation: lock-step round trips through the relay, all of them.
            started = time.monotonic()
            for index in range(200):
                payload = f"honest {index}".encode()
                await honest_socket.sendto(stun.encode_channel_data(0x4000, payload), *relay)
                with anyio.fail_after(5):
                    while True:
                        data, _ = await honest_socket.receive()
                        if stun.is_channel_data(data):
                            assert stun.parse_channel_data(data) == (0x4000, payload)
                            break
            elapsed = time.monotonic() - started

        stats: dict[str, int] = server.data_plane.stats()  # type: ignore[attr-defined]
        per_allocation = {
            tuple(entry["client"]): entry
            for entry in server.data_plane.allocation_stats()  # type: ignore[attr-defined]
        }
        flood_client = ("127.0.0.1", flood_socket.extra(anyio.abc.SocketAttribute.local_port))
        flood_stats = per_allocation[flood_client]
        tg.cancel_scope.cancel()
    assert elapsed < 30
    assert stats["dropped_malformed"] >= 1
    assert stats["dropped_unknown_channel"] >= 1
    assert stats["dropped_quota"] > 0
    # The flooder got its quota (plus a burst), not the 3 MB it pushed.
    assert flood_stats["bytes_to_peers"] < 3000 * 1000 / 2
    assert server.core.responses[("create_permission", 403)] == 4


# --- two clients of one relay ------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_clients_of_one_relay_reach_each_other_without_allow_listing_it(
    tmp_path: Path,
) -> None:
    """The relay on 127.0.0.2 allow-lists only 127.0.0.3/32: not loopback, not itself. Its
    clients still reach each other's relayed addresses, both ways; its other ports (listening
    port, a local service, a freed allocation) are refused with 403, and data to or from them
    is dropped although the permission for the IP holds."""
    async with (
        running_relay(tmp_path, listen="127.0.0.2:0", allow_peer=["127.0.0.3/32"]) as server,
        await anyio.create_udp_socket(local_host="127.0.0.3") as a_socket,
        await anyio.create_udp_socket(local_host="127.0.0.3") as b_socket,
        await anyio.create_udp_socket(local_host="127.0.0.3") as c_socket,
        await anyio.create_udp_socket(local_host="127.0.0.2") as service,
    ):
        relay = ("127.0.0.2", server.port)
        service_address = ("127.0.0.2", service.extra(anyio.abc.SocketAttribute.local_port))
        a = TurnTestClient(a_socket, relay, "alice")
        b = TurnTestClient(b_socket, relay, "bob")
        c = TurnTestClient(c_socket, relay, "alice")
        with anyio.fail_after(TIMEOUT):
            ra, rb, rc = await a.allocate(), await b.allocate(), await c.allocate()
            assert {ra[0], rb[0], rc[0]} == {"127.0.0.2"}
            for port in (server.port, service_address[1]):
                assert code(await a.permit("127.0.0.2", port)) == 403
                assert code(await a.bind(0x4001, ("127.0.0.2", port))) == 403
            assert code(await a.permit(*rb)) is None
            assert code(await b.permit(*ra)) is None
            assert code(await c.permit(*ra)) is None

            await a.send(rb, b"a to b")
            assert await b.receive_data() == (ra, b"a to b")
            assert code(await b.bind(0x4000, ra)) is None
            await b_socket.sendto(stun.encode_channel_data(0x4000, b"b to a"), *relay)
            assert await a.receive_data() == (rb, b"b to a")

            # B's allocation ends: its port is refused again.
            assert code(await b.request(Method.REFRESH, [(Attr.LIFETIME, bytes(4))])) is None
            assert code(await a.permit(*rb)) == 403
            assert code(await c.bind(0x4002, rb)) == 403
            # A holds a permission for 127.0.0.2, but only live allocations are reachable there.
            # Each refused datagram is followed on its path by one that passes: once that one
            # arrives, the data plane has dropped the other (sockets and the worker keep order).
            await service.sendto(b"from a local service", *ra)
            await c.send(ra, b"behind it on A's relayed socket")
            assert await a.receive_data() == (rc, b"behind it on A's relayed socket")
            await a.send(rb, b"to a freed port")
            await a.send(service_address, b"to a local service")
            await a.send(rc, b"behind them from A")
            assert await c.receive_data() == (ra, b"behind them from A")
            data_plane: Any = server.data_plane
        stats: dict[str, int] = data_plane.stats()
        assert stats["dropped_forbidden_peer"] == 3
        assert stats["dropped_no_permission"] == 0
        assert server.core.responses[("create_permission", 403)] == 3
        assert server.core.responses[("channel_bind", 403)] == 3


# --- the command ---------------------------------------------------------------------------


async def _wait_for(stream: TextReceiveStream, needle: str, seen: list[str]) -> str:
    buffered = ""
    async for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        seen.extend(lines)
        for line in lines:
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} never logged; saw {seen}")


def test_help_lists_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teia", "relay", "--help"], capture_output=True, check=True
    )
    text = result.stdout.decode()
    for flag in ("--listen", "--realm", "--auth-secret", "--auth-secret-file", "--user",
                 "--allow-peer", "--data-dir", "--metrics", "--config"):  # fmt: skip
        assert flag in text


@pytest.mark.anyio
async def test_service_answers_binding_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    import json

    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-value\n")
    command = [sys.executable, "-m", "teia", "relay", "--listen", "127.0.0.1:0",
               "--realm", REALM, "--user", "alice:wonderland-password",
               "--auth-secret-file", str(secret_file), "--allow-peer", "127.0.0.0/8",
               "--data-dir", str(tmp_path / "data"), "--metrics", "127.0.0.1:0",
               "--log-format", "json"]  # fmt: skip
    seen: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with await anyio.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as process:
            assert process.stderr is not None
            logs = TextReceiveStream(process.stderr)
            ready = json.loads(await _wait_for(logs, '"event": "ready"', seen))
            port = int(ready["listen"].rpartition(":")[2])
            async with await anyio.create_udp_socket(local_host="127.0.0.1") as client:
                tid = os.urandom(12)
                await client.sendto(
                    MessageBuilder(Method.BINDING, MessageClass.REQUEST, tid).finish(),
                    "127.0.0.1",
                    port,
                )
                reply, _ = await client.receive()
                message = stun.parse(reply)
                mapped = message.get(Attr.XOR_MAPPED_ADDRESS) or b""
                local = client.extra(anyio.abc.SocketAttribute.local_port)
                assert stun.decode_xor_address(mapped, tid) == ("127.0.0.1", local)
            async with await anyio.connect_tcp("127.0.0.1", ready["metrics_port"]) as http:
                await http.send(b"GET /metrics HTTP/1.1\r\n\r\n")
                body = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:  # the exporter closes after one answer
                        body += await http.receive()
            assert b"teia_relay_allocations" in body
            assert b'teia_relay_responses_total{code="200",method="binding"} 1.0' in body
            process.send_signal(signal.SIGTERM)
            await _wait_for(logs, '"event": "stopped"', seen)
            assert await process.wait() == 0
    logged = "\n".join(seen)
    assert "wonderland-password" not in logged
    assert "file-secret-value" not in logged
    assert (tmp_path / "data" / "relay-nonce.key").stat().st_mode & 0o077 == 0
