"""Application payloads (`Peer.send_app` / `on_app`): the pipeline groups, devices and
attachments are built on — direct and stored, refused, unknown, and taken again after a crash."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from teia.errors import DeliveryError, InvalidChatMessage, TeiaError
from teia.identity import Identity
from teia.peer import AppMessage, Peer, Profile
from teia.peer.wire import MAX_APP_DATA, MAX_TEXT_BYTES, Kind, Plaintext

from .conftest import PASSPHRASE, TIMEOUT, introduce, make_profile, online
from .infra import store_nodes


class Collector:
    """A handler that keeps what it is given and lets a test wait for a count."""

    def __init__(self) -> None:
        self.got: list[AppMessage] = []
        self._changed = anyio.Event()

    async def __call__(self, message: AppMessage) -> None:
        self.got.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[AppMessage]:
        while len(self.got) < count:
            self._changed = anyio.Event()
            await self._changed.wait()
        return self.got


@pytest.mark.anyio
async def test_payloads_reach_their_handler_in_order_and_leave_no_text(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    echo = Collector()
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            bob.on_app("test.echo", echo)
            await introduce(alice, bob)
            blobs = [os.urandom(n) for n in (0, 1, 1000, MAX_APP_DATA)]
            ids = [await alice.send_app(bob.peer_id, "test.echo", blob) for blob in blobs]
            for message_id in ids:
                row = await alice.wait_delivered(message_id)
                assert row.state == "delivered"
                assert row.path == "direct"
            got = await echo.wait_for(len(blobs))
            assert [m.data for m in got] == blobs
            assert [m.message_id.hex() for m in got] == ids
            assert {m.sender for m in got} == {alice.peer_id}
            assert {m.app for m in got} == {"test.echo"}
            # Not texts: no conversation shows them.
            assert await alice.history(bob.peer_id) == []
            assert await bob.history(alice.peer_id) == []
            assert await bob.run_db(bob.profile.db.app_pending) == []
            # Texts and payloads share the session.
            await alice.wait_delivered(await alice.send(bob.peer_id, "and a text"))
            assert [m.text for m in await bob.history(alice.peer_id)] == ["and a text"]


@pytest.mark.anyio
async def test_bad_names_and_sizes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    async with online(a_dir) as alice, online(b_dir) as bob:
        for name in ("", "Upper", "x" * 65, "spa ce", "é"):
            with pytest.raises(InvalidChatMessage):
                await alice.send_app(bob.peer_id, name, b"")
            with pytest.raises(InvalidChatMessage):
                alice.on_app(name, Collector())
        with pytest.raises(InvalidChatMessage):
            await alice.send_app(bob.peer_id, "test.big", bytes(MAX_APP_DATA + 1))
        with pytest.raises(DeliveryError):
            await alice.send_app(alice.peer_id, "test.self", b"")
        assert alice.profile.db.outbox() == []


@pytest.mark.anyio
async def test_refusing_failing_and_unknown_handlers_do_not_stop_the_others(
    tmp_path: Path,
) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    good = Collector()

    async def refuse(message: AppMessage) -> None:
        raise TeiaError("not for me")

    async def crash(message: AppMessage) -> None:
        raise RuntimeError("a bug")

    handlers = {"test.good": good, "test.refuse": refuse, "test.crash": crash}
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            for app, handler in handlers.items():
                bob.on_app(app, handler)
            await introduce(alice, bob)
            for app in ("test.refuse", "test.crash", "test.nobody", "test.good"):
                await alice.wait_delivered(await alice.send_app(bob.peer_id, app, b"x"))
            await good.wait_for(1)
            assert bob.stats["app_refused"] == 1
            assert bob.stats["app_failed"] == 1
            assert bob.stats["app_unknown"] == 1
            assert bob.stats["app_taken"] == 1


@pytest.mark.anyio
async def test_a_payload_whose_handler_did_not_finish_comes_back_after_a_restart(
    tmp_path: Path,
) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    entered = anyio.Event()

    async def stuck(message: AppMessage) -> None:
        entered.set()
        await anyio.sleep_forever()  # the process "dies" while the handler works

    again = Collector()
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice:
            async with online(b_dir) as bob:
                bob.on_app("test.work", stuck)
                await introduce(alice, bob)
                sent = await alice.send_app(bob.peer_id, "test.work", b"job")
                await alice.wait_delivered(sent)  # acknowledged: it is in Bob's database
                await entered.wait()
            # Registered at open: a handler registered after it may come too late for a
            # payload the dispatcher takes up at once (it would be dropped as unknown).
            async with Peer.open(b_dir, passphrase=PASSPHRASE, apps={"test.work": again}):
                (message,) = await again.wait_for(1)
                assert message.data == b"job"
                assert message.message_id.hex() == sent


@pytest.mark.anyio
async def test_payloads_for_an_offline_peer_go_through_the_store(tmp_path: Path) -> None:
    got = Collector()
    with anyio.fail_after(TIMEOUT):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            a_dir = make_profile(tmp_path / "a", **settings)
            b_dir = make_profile(tmp_path / "b", **settings)
            async with online(b_dir) as bob:
                bob_id = bob.peer_id
            async with online(a_dir) as alice:
                sent = await alice.send_app(bob_id, "test.stored", b"while you were away")
                row = await alice.wait_delivered(sent)
                assert row.state == "stored"
                # The largest payload and the largest text fit a store envelope too.
                biggest = os.urandom(MAX_APP_DATA)
                big = await alice.send_app(bob_id, "test.stored", biggest)
                long_text = await alice.send(bob_id, "é" * (MAX_TEXT_BYTES // 2))
                for message_id in (big, long_text):
                    assert (await alice.wait_delivered(message_id)).state == "stored"

                async with Peer.open(
                    b_dir,
                    passphrase=PASSPHRASE,
                    listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
                    apps={"test.stored": got},
                ):
                    message, largest = await got.wait_for(2)
                    assert message.data == b"while you were away"
                    assert largest.data == biggest
                    assert message.path == "stored"
                    assert message.sender == alice.peer_id
                    # The receipt flows back: Alice's payload becomes delivered.
                    with anyio.fail_after(20):
                        while (await alice.wait_delivered(sent)).state != "delivered":
                            await alice.fetch_stored()


def test_refused_payload_envelopes_are_encrypted_again_from_the_kept_plaintext(
    tmp_path: Path,
) -> None:
    other = Identity.generate()
    plaintext = Plaintext(app="test.kept", data=b"\x00\x01binary").encode()
    with Profile.open(make_profile(tmp_path / "p"), PASSPHRASE) as profile:
        db = profile.db
        db.queue_outgoing(
            peer_id=str(other.peer_id),
            conversation="",
            message_id=b"m" * 16,
            sent_ms=1,
            text="",
            kind=int(Kind.APP),
            plaintext=plaintext,
        )
        db.set_envelopes(str(other.peer_id), [(b"m" * 16, b"ciphertext")], (1, []))
        (item,) = db.outbox()
        assert item.envelope == b"ciphertext"
        db.reset_envelopes(str(other.peer_id), [b"m" * 16])
        (item,) = db.outbox()
        assert item.envelope is None
        assert item.plaintext == plaintext
        assert db.conversations() == []  # hidden from every conversation
