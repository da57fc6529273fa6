"""Attachments end to end on loopback: pulled directly, through a relay, pushed through the store
(and kept out of it above the limit), resumed after either side goes away, corrupted chunks
refused and fetched again, and files never served to a peer they were not offered to."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from teia.errors import AttachmentError, AttachmentTooLarge, UnknownAttachment
from teia.host.streams import NegotiatedStream
from teia.identity import Identity
from teia.peer import Peer
from teia.peer.attachments import (
    CHUNK_SIZE,
    MAX_ANSWER,
    PROTOCOL,
    ChunkAnswer,
    ChunkRequest,
    Status,
    TransferCompleted,
    TransferFailed,
    TransferOffered,
    decode_answer,
)

from .conftest import PASSPHRASE, TIMEOUT, free_udp_port, introduce, make_profile, online
from .infra import relay, store_nodes


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def both_ways(a: Peer, b: Peer) -> None:
    await introduce(a, b)
    await introduce(b, a)


class Wrapped(NegotiatedStream):
    """A stream whose outgoing messages a test can change, drop or hold back."""

    def __init__(self, inner: NegotiatedStream, on_send: Callable[[bytes], Any]) -> None:
        super().__init__(inner, inner.protocol, b"")
        self.remote_peer_id = inner.remote_peer_id
        self.remote_address = inner.remote_address
        self._inner = inner
        self._on_send = on_send

    async def receive_message(self, max_size: int = 1024 * 1024) -> bytes:
        return await self._inner.receive_message(max_size)

    async def send_message(self, message: bytes) -> None:
        changed = await self._on_send(message)
        await self._inner.send_message(changed)


@pytest.mark.anyio
async def test_a_file_is_pulled_directly_and_lands_whole_private_and_announced(
    tmp_path: Path,
) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "report 2026.pdf"
    data = make_file(source, 3 * 1024 * 1024 + 123)
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await both_ways(alice, bob)
            async with bob.attachments.events() as events:
                file_id = await alice.attachments.send_file(bob.peer_id, source)
                offered = await events.receive()
                assert isinstance(offered, TransferOffered)
                assert offered.transfer.name == "report 2026.pdf"
                assert offered.transfer.size == len(data)
                done = await events.receive()
                assert isinstance(done, TransferCompleted)
            got = await bob.attachments.wait_complete(file_id)
            assert got.path == "direct"
            assert got.have == got.chunks == -(-len(data) // CHUNK_SIZE)
            assert got.saved_as == b_dir / "files" / "report 2026.pdf"
            assert got.saved_as.read_bytes() == data
            assert stat.S_IMODE(got.saved_as.stat().st_mode) == 0o600
            sent = await alice.attachments.wait_complete(file_id)
            assert sent.outgoing
            assert sent.state == "complete"
            assert not (a_dir / "attachments" / "out" / f"{file_id}.enc").exists()
            assert list((b_dir / "attachments" / "in").iterdir()) == []
            # Both conversations show the file; Alice's line is delivered.
            (line,) = await bob.history(alice.peer_id)
            assert line.text == "[file report 2026.pdf, 3.1 MB]"
            (mine,) = await alice.history(bob.peer_id)
            assert mine.text == line.text
            assert mine.state == "delivered"
            # Sent again: a second file, a free name beside the first.
            again = await alice.attachments.send_file(bob.peer_id, source)
            second = await bob.attachments.wait_complete(again)
            assert second.saved_as == b_dir / "files" / "report 2026 (1).pdf"
            assert digest(second.saved_as) == digest(source)
            assert bob.attachments.stats["chunks_corrupted"] == 0
            with pytest.raises(UnknownAttachment):
                await bob.attachments.status("00" * 16)


@pytest.mark.anyio
async def test_limits_and_an_empty_file(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    big = tmp_path / "big"
    with big.open("wb") as file:
        file.truncate(100 * 1024 * 1024 + 1)  # sparse: nothing written
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await both_ways(alice, bob)
            with pytest.raises(AttachmentTooLarge):
                await alice.attachments.send_file(bob.peer_id, big)
            file_id = await alice.attachments.send_file(bob.peer_id, empty, name="../../x/.hidden")
            got = await bob.attachments.wait_complete(file_id)
            assert got.saved_as == b_dir / "files" / "hidden"
            assert got.saved_as.read_bytes() == b""


@pytest.mark.anyio
async def test_a_stranger_is_not_served_a_file_offered_to_someone_else(tmp_path: Path) -> None:
    dirs = [make_profile(tmp_path / n) for n in ("a", "b", "c")]
    source = tmp_path / "secret"
    make_file(source, 100_000)
    with anyio.fail_after(TIMEOUT):
        async with online(dirs[0]) as alice, online(dirs[1]) as bob, online(dirs[2]) as carol:
            await both_ways(alice, bob)
            await introduce(carol, alice)
            file_id = await alice.attachments.send_file(bob.peer_id, source)
            await bob.attachments.wait_complete(file_id)
            # Carol learnt the file ID (say, from Bob): Alice answers as if it did not exist.
            raw = bytes.fromhex(file_id)
            await carol.host.connect(alice.addrs[0])
            for ask in (raw, os.urandom(16)):
                stream = await carol.host.open_stream(alice.peer_id, PROTOCOL)
                await stream.send_message(ChunkRequest(ask, ((0, 1),)).encode())
                answer = decode_answer(await stream.receive_message(MAX_ANSWER))
                assert answer == ChunkAnswer(Status.UNAVAILABLE)
                await stream.aclose()
            # Bob asking for a chunk past the end, or garbage: a bad request.
            stream = await bob.host.open_stream(alice.peer_id, PROTOCOL)
            await stream.send_message(b"\x01garbage")
            assert decode_answer(await stream.receive_message(MAX_ANSWER)).status == (
                Status.BAD_REQUEST
            )
            await stream.aclose()
            assert alice.attachments.stats["requests_refused"] == 3


@pytest.mark.anyio
async def test_corrupted_chunks_are_refused_and_fetched_again(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "photo.jpg"
    data = make_file(source, 40 * CHUNK_SIZE + 7)
    tampered: list[int] = []

    async def tamper(message: bytes) -> bytes:
        answer = decode_answer(message)
        # Every fifth chunk is damaged the first time it is sent, one moved into another's place.
        if answer.status == Status.OK and answer.index % 5 == 0 and answer.index not in tampered:
            tampered.append(answer.index)
            if answer.index == 10:
                return ChunkAnswer(Status.OK, 10, bytes(len(answer.sealed))).encode()
            flipped = bytearray(answer.sealed)
            flipped[len(flipped) // 2] ^= 0x40
            return ChunkAnswer(Status.OK, answer.index, bytes(flipped)).encode()
        return message

    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await both_ways(alice, bob)
            serve = alice.attachments.serve

            async def tampering(stream: NegotiatedStream) -> None:
                await serve(Wrapped(stream, tamper))

            alice.host.set_handler(PROTOCOL, tampering)
            file_id = await alice.attachments.send_file(bob.peer_id, source)
            got = await bob.attachments.wait_complete(file_id)
            assert got.saved_as is not None
            assert got.saved_as.read_bytes() == data
            assert len(tampered) == 9
            assert bob.attachments.stats["chunks_corrupted"] == 9
            assert bob.attachments.stats["chunks_received"] == 41
            await alice.attachments.wait_complete(file_id)


@pytest.mark.anyio
async def test_a_sender_that_keeps_corrupting_never_gets_a_byte_written(tmp_path: Path) -> None:
    a_dir = make_profile(tmp_path / "a")
    b_dir = make_profile(tmp_path / "b", retry_interval=0.05)
    source = tmp_path / "doc"
    make_file(source, 3 * CHUNK_SIZE)
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await both_ways(alice, bob)
            serve = alice.attachments.serve
            attempts = anyio.Event()
            sent = 0

            async def always(message: bytes) -> bytes:
                nonlocal sent
                answer = decode_answer(message)
                sent += 1
                if sent >= 30:
                    attempts.set()
                return ChunkAnswer(Status.OK, answer.index, bytes(len(answer.sealed))).encode()

            async def tampering(stream: NegotiatedStream) -> None:
                await serve(Wrapped(stream, always))

            alice.host.set_handler(PROTOCOL, tampering)
            file_id = await alice.attachments.send_file(bob.peer_id, source)
            await attempts.wait()
            status = await bob.attachments.status(file_id)
            assert status.state == "receiving"
            assert status.have == 0
            assert bob.attachments.stats["chunks_received"] == 0
            part = b_dir / "attachments" / "in" / f"{file_id}.part"
            assert not part.exists() or part.read_bytes().strip(b"\0") == b""
            assert list((b_dir / "files").iterdir()) == []


async def held_after(count: int, reached: anyio.Event, hold: list[bool]) -> Any:
    """A send hook that lets ``count`` chunks through, then holds the stream while ``hold``."""
    passed = 0

    async def hook(message: bytes) -> bytes:
        nonlocal passed
        if hold[0] and passed >= count:
            reached.set()
            await anyio.sleep_forever()
        passed += 1
        return message

    return hook


@pytest.mark.anyio
async def test_the_transfer_resumes_after_the_sender_goes_away(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "video"
    data = make_file(source, 80 * CHUNK_SIZE)
    port = free_udp_port()
    reached = anyio.Event()
    hold = [True]
    hook = await held_after(50, reached, hold)
    with anyio.fail_after(TIMEOUT):
        async with online(b_dir) as bob:
            async with online(a_dir, port=port) as alice:
                await both_ways(alice, bob)
                serve = alice.attachments.serve

                async def holding(stream: NegotiatedStream) -> None:
                    await serve(Wrapped(stream, hook))

                alice.host.set_handler(PROTOCOL, holding)
                file_id = await alice.attachments.send_file(bob.peer_id, source)
                await reached.wait()
            # Alice is gone (and her process too, as far as Bob can tell): Bob keeps what
            # authenticated, and fetches the rest when she is back on the same address.
            async with online(a_dir, port=port) as alice:
                got = await bob.attachments.wait_complete(file_id)
                assert got.saved_as is not None
                assert got.saved_as.read_bytes() == data
                # Only what was missing: at most the 50 chunks before the hold were sent twice
                # (those still in flight), not the whole file.
                assert alice.attachments.stats["chunks_served"] <= 80 - 35
                await alice.attachments.wait_complete(file_id)


@pytest.mark.anyio
async def test_the_transfer_resumes_after_the_recipient_restarts(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "archive.tar"
    data = make_file(source, 90 * CHUNK_SIZE + 1)
    reached = anyio.Event()
    hold = [True]
    hook = await held_after(60, reached, hold)
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice:
            serve = alice.attachments.serve

            async def holding(stream: NegotiatedStream) -> None:
                await serve(Wrapped(stream, hook))

            alice.host.set_handler(PROTOCOL, holding)
            async with online(b_dir) as bob:
                await both_ways(alice, bob)
                file_id = await alice.attachments.send_file(bob.peer_id, source)
                await reached.wait()
            hold[0] = False
            before = alice.attachments.stats["chunks_served"]
            async with online(b_dir) as bob:  # a new process on the same profile
                got = await bob.attachments.wait_complete(file_id)
                assert got.saved_as is not None
                assert got.saved_as.read_bytes() == data
                # Bob's second life asked only for what his first had not committed.
                assert alice.attachments.stats["chunks_served"] - before <= 91 - 35
                await alice.attachments.wait_complete(file_id)  # Bob's "done" reached her


@pytest.mark.anyio
async def test_through_the_store_when_the_recipient_is_away_and_not_above_the_limit(
    tmp_path: Path,
) -> None:
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small_data = make_file(small, 10 * CHUNK_SIZE + 99)
    large_data = make_file(large, 20 * CHUNK_SIZE)
    with anyio.fail_after(TIMEOUT * 2):
        async with store_nodes(tmp_path) as stores:
            settings: dict[str, Any] = {"store_nodes": stores, "store_poll_interval": 0.3}
            a_dir = make_profile(tmp_path / "a", attachment_store_limit=15 * CHUNK_SIZE, **settings)
            b_dir = make_profile(tmp_path / "b", **settings)
            async with online(b_dir) as bob:  # once, so its prekey bundle is on the stores
                bob_id = bob.peer_id
            async with online(a_dir) as alice:
                # (Offered in this order, the large one is announced before the small one ends.)
                waiting_id = await alice.attachments.send_file(bob_id, large)
                stored_id = await alice.attachments.send_file(bob_id, small)
                assert (await alice.attachments.status(stored_id)).state == "pushed"
                assert (await alice.attachments.status(waiting_id)).state == "waiting-direct"
                # Bob comes back while Alice is online but unknown to him: the small file
                # comes out of his store inbox; the large one only announced.
                async with Peer.open(
                    b_dir, passphrase=PASSPHRASE, listen=["/ip4/127.0.0.1/udp/0/quic-v1"]
                ) as bob:
                    got = await bob.attachments.wait_complete(stored_id)
                    assert got.path == "stored"
                    assert got.saved_as is not None
                    assert got.saved_as.read_bytes() == small_data
                    waiting = await bob.attachments.status(waiting_id)
                    assert waiting.state == "receiving"
                    assert waiting.have == 0
                    # Once Bob can reach Alice, he pulls the large one.
                    await introduce(bob, alice)
                    bob.attachments.wake()
                    got = await bob.attachments.wait_complete(waiting_id)
                    assert got.path == "direct"
                    assert got.saved_as is not None
                    assert got.saved_as.read_bytes() == large_data
                    for file_id in (stored_id, waiting_id):
                        await alice.attachments.wait_complete(file_id)


@pytest.mark.anyio
async def test_a_file_goes_through_the_relay_when_direct_dials_are_off(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with relay(tmp_path) as table:
            a_dir = make_profile(tmp_path / "a", relays=[table], direct=False)
            b_dir = make_profile(tmp_path / "b", relays=[table], direct=False)
            source = tmp_path / "notes.txt"
            data = make_file(source, 500_000)
            async with online(a_dir) as alice, online(b_dir) as bob:
                await bob.host.wait_relayed_addrs()
                await alice.host.wait_relayed_addrs()
                await both_ways(alice, bob)
                file_id = await alice.attachments.send_file(bob.peer_id, source)
                got = await bob.attachments.wait_complete(file_id)
                assert got.path == "relayed"
                assert got.saved_as is not None
                assert got.saved_as.read_bytes() == data


@pytest.mark.anyio
async def test_either_side_calls_a_transfer_off_and_both_let_go(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "big"
    make_file(source, 80 * CHUNK_SIZE)
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await both_ways(alice, bob)
            serve = alice.attachments.serve
            for cancelling in ("recipient", "sender"):
                reached = anyio.Event()
                hook = await held_after(20, reached, [True])

                async def holding(stream: NegotiatedStream, hook: Any = hook) -> None:
                    await serve(Wrapped(stream, hook))

                alice.host.set_handler(PROTOCOL, holding)
                async with (
                    alice.attachments.events() as a_events,
                    bob.attachments.events() as b_events,
                ):
                    file_id = await alice.attachments.send_file(bob.peer_id, source)
                    assert isinstance(await b_events.receive(), TransferOffered)
                    await reached.wait()  # a pull is half-way
                    if cancelling == "recipient":
                        ended = await bob.attachments.cancel(file_id)
                        events = a_events
                    else:
                        ended = await alice.attachments.cancel(file_id)
                        events = b_events
                    assert ended.state == "cancelled"
                    event = await events.receive()
                    assert isinstance(event, TransferFailed)
                    assert event.reason == "cancelled by the other side"
                    assert event.transfer.file_id == file_id
                for side in (alice, bob):
                    assert (await side.attachments.status(file_id)).state == "cancelled"
                    with pytest.raises(AttachmentError, match="cancelled"):
                        await side.attachments.wait_complete(file_id)
                assert not (a_dir / "attachments" / "out" / f"{file_id}.enc").exists()
                assert not (b_dir / "attachments" / "in" / f"{file_id}.part").exists()
                assert list((b_dir / "files").iterdir()) == []
            # Cancelling again changes nothing; an unknown file ID is an error.
            assert (await bob.attachments.cancel(file_id)).state == "cancelled"
            with pytest.raises(UnknownAttachment):
                await bob.attachments.cancel("00" * 16)
            # Only the other side of a transfer can call it off.
            alice.host.set_handler(PROTOCOL, serve)
            kept = await alice.attachments.send_file(bob.peer_id, source)
            stranger = Identity.generate().peer_id
            assert not await alice.attachments._end(bytes.fromhex(kept), stranger, "x")
            assert (await bob.attachments.wait_complete(kept)).state == "complete"


@pytest.mark.anyio
async def test_offers_are_taken_only_from_whom_the_policy_allows(tmp_path: Path) -> None:
    a_dir = make_profile(tmp_path / "a")
    b_dir = make_profile(tmp_path / "b", attachment_accept="verified")
    c_dir = make_profile(tmp_path / "c", attachment_accept="none")
    source = tmp_path / "note.txt"
    make_file(source, 3 * CHUNK_SIZE)
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob, online(c_dir) as carol:
            await both_ways(alice, bob)
            await both_ways(alice, carol)
            # Bob takes files from verified contacts only: Alice is a contact, not verified.
            refused = await alice.attachments.send_file(bob.peer_id, source)
            with pytest.raises(AttachmentError, match="cancelled"):
                await alice.attachments.wait_complete(refused)
            assert bob.attachments.stats["offers_refused"] == 1
            with pytest.raises(UnknownAttachment):
                await bob.attachments.status(refused)
            await bob.verify_contact(alice.peer_id)
            taken = await alice.attachments.send_file(bob.peer_id, source)
            assert (await bob.attachments.wait_complete(taken)).state == "complete"
            # Carol takes none at all.
            nothing = await alice.attachments.send_file(carol.peer_id, source)
            with pytest.raises(AttachmentError, match="cancelled"):
                await alice.attachments.wait_complete(nothing)
            assert list((c_dir / "files").iterdir()) == []
