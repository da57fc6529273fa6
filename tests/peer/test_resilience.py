"""Outbox across restarts, hostile input from a peer, identity changes, and the canary."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from teia.errors import ContactIdentityChanged
from teia.host.host import Host
from teia.host.protobuf import encode_uvarint
from teia.identity import Identity, PeerId
from teia.peer import IdentityChanged, Peer, Profile, SessionStarted
from teia.peer.peer import _Incoming
from teia.peer.wire import CHAT_PROTOCOL, AckStatus, ChatAck, ChatEnvelope, Kind
from teia.transport.quic import QuicConnectionHandle, QuicEndpoint

from .conftest import LOOPBACK, PASSPHRASE, TIMEOUT, free_udp_port, introduce, make_profile, online
from .test_direct import receive

CANARY = "PLAINTEXT-CANARY-e2e-4b1d"


@pytest.mark.anyio
async def test_outbox_survives_a_sender_restart(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    port = free_udp_port()
    with anyio.fail_after(TIMEOUT):
        async with online(b_dir, port=port) as bob:
            bob_id = bob.peer_id
            async with online(a_dir) as alice:
                await introduce(alice, bob, "bob")
                await alice.wait_delivered(await alice.send("bob", "before"))
        # Bob is gone; Alice queues three messages and stops before any can leave.
        async with online(a_dir) as alice:
            queued = [await alice.send("bob", f"while away {i}") for i in range(3)]
            states = {m.state for m in await alice.history("bob")}
            assert states == {"delivered", "pending"}
        assert len(Profile.open(a_dir, PASSPHRASE).db.outbox()) == 3
        # Bob comes back on the same address; Alice restarts and the outbox drains.
        async with online(b_dir, port=port) as bob, online(a_dir) as alice:
            assert bob.peer_id == bob_id
            for message_id in queued:
                row = await alice.wait_delivered(message_id)
                assert row.state == "delivered"
            history = await bob.history(alice.peer_id)
            assert [m.text for m in history] == ["before"] + [f"while away {i}" for i in range(3)]
            assert await alice._db(alice.profile.db.outbox) == []


@pytest.mark.anyio
async def test_first_message_to_an_offline_peer_waits_for_it(tmp_path: Path) -> None:
    """No bundle without the peer (and no store): the text waits unencrypted-for-the-wire,
    sealed in the outbox, and leaves once the peer is reachable."""
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    port = free_udp_port()
    with anyio.fail_after(TIMEOUT):
        async with online(b_dir, port=port) as bob:
            bob_id, bob_addrs = bob.peer_id, [str(a) for a in bob.addrs]
        async with online(a_dir) as alice:
            await alice.add_contact(bob_id, "bob", bob_addrs)
            sent = await alice.send("bob", "are you there?")
            async with online(b_dir, port=port) as bob:
                await alice.wait_delivered(sent)
                assert await receive(bob, 1) == ["are you there?"]


@pytest.mark.anyio
async def test_identity_change_of_a_named_contact_is_surfaced(tmp_path: Path) -> None:
    a_dir, b_dir, c_dir = (make_profile(tmp_path / n) for n in "abc")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob, online(c_dir) as impostor:
            await introduce(alice, bob, "bob")
            await alice.verify_contact("bob")
            assert (await alice.contact("bob")).trust == "verified"
            number = alice.safety_number(bob.peer_id)
            assert number == bob.safety_number(alice.peer_id)
            assert len(number) == 60
            async with alice.events() as events:
                # "bob" now claims another key (a reinstall — or an impostor).
                await introduce(alice, impostor, "bob")
                event = await events.receive()
            assert event == IdentityChanged("bob", bob.peer_id, impostor.peer_id)
            contact = await alice.contact("bob")
            assert contact.trust == "unverified-changed"
            assert contact.previous_peer_id == str(bob.peer_id)
            assert alice.safety_number(impostor.peer_id) != number
            with pytest.raises(ContactIdentityChanged):
                await alice.send("bob", "secret for bob")
            await alice.verify_contact("bob")
            await alice.wait_delivered(await alice.send("bob", "verified now"))
            assert await receive(impostor, 1) == ["verified now"]


async def _raw_exchange(host: Host, target: Peer, frames: list[bytes]) -> list[ChatAck]:
    await host.connect(target.addrs[0])
    stream = await host.open_stream(target.peer_id, CHAT_PROTOCOL)
    await stream.send(b"".join(encode_uvarint(len(f)) + f for f in frames))
    acks = [ChatAck.decode(await stream.receive_message()) for _ in frames]
    await stream.aclose()
    return acks


@pytest.mark.anyio
async def test_garbage_forged_and_replayed_envelopes_change_nothing(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            seen: list[ChatEnvelope] = []
            original = bob._take

            async def spy(peer: PeerId, envelopes: list[ChatEnvelope], path: str) -> list[bool]:
                seen.extend(envelopes)
                return await original(peer, envelopes, path)  # type: ignore[arg-type]

            bob._take = spy  # type: ignore[method-assign]
            await introduce(alice, bob)
            for i in range(3):
                await alice.wait_delivered(await alice.send(bob.peer_id, f"real {i}"))
            await bob.wait_delivered(await bob.send(alice.peer_id, "answer"))
            await alice.wait_delivered(await alice.send(bob.peer_id, "real 3"))
            first_prekey, last = seen[0], seen[-1]

            def snapshot() -> tuple[Any, ...]:
                db = bob.profile.db
                return (
                    db.sessions(str(alice.peer_id)),
                    [(m.text, m.message_id) for m in db.history(str(alice.peer_id))],
                    db.fresh_one_time_prekeys(),
                )

            before = await bob._db(snapshot)
            mallory = Identity.generate()
            async with Host(mallory, listen=[LOOPBACK]) as host:
                forged = ChatEnvelope(
                    os.urandom(16), alice.peer_id.to_bytes(), "", 0, Kind.TEXT, last.body
                )
                # Mallory's own name, Alice's prekey message: the identity key is not Mallory's.
                stolen = ChatEnvelope(
                    os.urandom(16), mallory.peer_id.to_bytes(), "", 0, Kind.TEXT, first_prekey.body
                )
                junk = ChatEnvelope(
                    os.urandom(16), mallory.peer_id.to_bytes(), "", 0, Kind.TEXT, os.urandom(200)
                )
                acks = await _raw_exchange(
                    host,
                    bob,
                    [b"\xff\x00garbage", forged.encode(), stolen.encode(), junk.encode(), b""],
                )
                assert [a.status for a in acks] == [AckStatus.REFUSED] * 5
            # Replays over Alice's own connection: the same IDs are acknowledged as already
            # held (no second copy); the same ciphertexts under new IDs are refused.
            for envelope in (first_prekey, last):
                assert await bob._receive(_Incoming(alice.peer_id, envelope, "direct"))
                renamed = ChatEnvelope(
                    os.urandom(16),
                    envelope.sender,
                    "",
                    envelope.timestamp_ms,
                    envelope.kind,
                    envelope.body,
                )
                assert not await bob._receive(_Incoming(alice.peer_id, renamed, "direct"))
            assert await bob._db(snapshot) == before
            assert bob.stats["refused"] >= 7
            assert bob.stats["duplicates"] == 2
            # The conversation still works both ways.
            await alice.wait_delivered(await alice.send(bob.peer_id, "still fine"))
            await bob.wait_delivered(await bob.send(alice.peer_id, "yes"))
            assert [m.text for m in await bob.history(alice.peer_id)][-2:] == ["still fine", "yes"]


@pytest.mark.anyio
async def test_a_peer_that_lost_its_profile_starts_a_new_session(tmp_path: Path) -> None:
    """Bob loses his database (same identity): Alice's envelopes are refused, so she starts
    over with a new bundle; Bob surfaces the new session."""
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    port = free_udp_port()
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice:
            async with online(b_dir, port=port) as bob:
                await introduce(alice, bob)
                await alice.wait_delivered(await alice.send(bob.peer_id, "one"))
                await bob.wait_delivered(await bob.send(alice.peer_id, "two"))
            for suffix in ("", "-wal", "-shm"):
                (b_dir / f"peer.db{suffix}").unlink(missing_ok=True)
            async with online(b_dir, port=port) as bob, bob.events() as events:
                await alice.wait_delivered(await alice.send(bob.peer_id, "three"))
                assert [m.text for m in await bob.history(alice.peer_id)] == ["three"]
                assert isinstance(await events.receive(), SessionStarted)


class WireSniffer:
    """Everything the hosts hand to QUIC streams (before QUIC's own encryption) and every
    datagram the endpoints send."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunks: list[bytes] = []
        stream_send: Callable[..., None] = QuicConnectionHandle._send_stream_data
        datagrams_send = QuicEndpoint._send_datagrams

        def sniff_stream(
            handle: QuicConnectionHandle, stream_id: int, data: bytes, *, end_stream: bool
        ) -> None:
            self.chunks.append(bytes(data))
            stream_send(handle, stream_id, data, end_stream=end_stream)

        async def sniff_datagrams(
            endpoint: QuicEndpoint, datagrams: list[tuple[bytes, tuple[str, int]]]
        ) -> None:
            self.chunks.extend(bytes(d) for d, _ in datagrams)
            await datagrams_send(endpoint, datagrams)

        monkeypatch.setattr(QuicConnectionHandle, "_send_stream_data", sniff_stream)
        monkeypatch.setattr(QuicEndpoint, "_send_datagrams", sniff_datagrams)

    def saw(self, marker: bytes) -> bool:
        return any(marker in chunk for chunk in self.chunks)


def _files_contain(directory: Path, marker: bytes) -> list[str]:
    return [p.name for p in directory.iterdir() if p.is_file() and marker in p.read_bytes()]


@pytest.mark.anyio
async def test_canary_never_on_the_wire_nor_in_profile_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sniffer = WireSniffer(monkeypatch)
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob)
            for i in range(20):
                await alice.wait_delivered(await alice.send(bob.peer_id, f"{CANARY} {i}"))
            await bob.wait_delivered(await bob.send(alice.peer_id, f"re: {CANARY}"))
            assert len(await receive(bob, 20)) == 20
            # Search still finds it, without the words being in the file.
            found = await bob.search(CANARY)
            assert len(found) == 21
            assert all(CANARY in m.text for m in found)
        assert sniffer.chunks
        assert len(sniffer.chunks) > 40
        assert not sniffer.saw(CANARY.encode())
        for directory in (a_dir, b_dir):
            assert _files_contain(directory, CANARY.encode()) == []
            assert _files_contain(directory, CANARY.lower().encode()) == []
            assert (directory / "peer.db").stat().st_mode & 0o077 == 0


@pytest.mark.anyio
async def test_signed_prekey_rotation_keeps_old_sessions_and_first_contacts(
    tmp_path: Path,
) -> None:
    """Every start rotates here (a tiny age limit): the old signed prekey stays for first
    messages in flight, new first contacts use the new one, and sessions go on."""
    a_dir = make_profile(tmp_path / "a", signed_prekey_days=1e-9)
    b_dir, c_dir = make_profile(tmp_path / "b"), make_profile(tmp_path / "c")
    port = free_udp_port()
    with anyio.fail_after(TIMEOUT):
        async with online(b_dir) as bob:
            async with online(a_dir, port=port) as alice:
                await introduce(bob, alice, "alice")
                await bob.wait_delivered(await bob.send("alice", "first"))
                first_ids = [i for i, _ in await alice._db(alice.profile.db.signed_prekey_ages)]
            async with online(a_dir, port=port) as alice, online(c_dir) as carol:
                ids = [i for i, _ in await alice._db(alice.profile.db.signed_prekey_ages)]
                assert ids == [first_ids[0] + 1, *first_ids]
                await bob.wait_delivered(await bob.send("alice", "second"))
                await introduce(carol, alice)
                await carol.wait_delivered(await carol.send(alice.peer_id, "new contact"))
                texts = [m.text for m in await alice.history(bob.peer_id)]
                assert texts == ["first", "second"]
                assert [m.text for m in await alice.history(carol.peer_id)] == ["new contact"]
