"""Two peers in one process over loopback: first contact (X3DH), both ways, receipts, order."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import DeliveryError, InvalidChatMessage
from teia.peer import Delivered, Peer, Read, Retracted
from teia.peer.peer import decode_read, encode_read

from .conftest import TIMEOUT, introduce, make_profile, online


async def receive(peer: Peer, count: int, since: int | None = None) -> list[str]:
    texts: list[str] = []
    async for message in peer.messages(since_seq=since):
        texts.append(message.text)
        if len(texts) == count:
            break
    return texts


@pytest.mark.anyio
async def test_first_contact_both_ways_with_receipts(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob, "bob")
            async with alice.events() as events:
                sent = await alice.send("bob", "hello bob")
                row = await alice.wait_delivered(sent)
                assert row.state == "delivered"
                assert row.path == "direct"
                assert row.latency_ms is not None
                assert row.latency_ms >= 0
                event = await events.receive()
                assert isinstance(event, Delivered)
                assert event.message_id == sent
            assert await receive(bob, 1) == ["hello bob"]
            # Bob answers by peer ID, over the connection Alice opened.
            reply = await bob.send(alice.peer_id, "hi alice")
            await bob.wait_delivered(reply)
            assert await receive(alice, 1) == ["hi alice"]
            history = await alice.history("bob")
            assert [(m.outgoing, m.text, m.state) for m in history] == [
                (True, "hello bob", "delivered"),
                (False, "hi alice", "received"),
            ]
            contact = await bob.contact(str(alice.peer_id))
            assert contact.trust == "unverified"  # added on first message, not trusted


@pytest.mark.anyio
async def test_many_messages_arrive_once_and_in_order(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob)
            ids = [await alice.send(bob.peer_id, f"message {i}") for i in range(300)]
            for message_id in ids:
                await alice.wait_delivered(message_id)
            texts = await receive(bob, 300)
            assert texts == [f"message {i}" for i in range(300)]
            history = await bob.history(alice.peer_id, limit=1000)
            assert [m.text for m in history] == texts
            assert bob.stats["duplicates"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_smoke(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob)
            await alice.wait_delivered(await alice.send(bob.peer_id, "over asyncio"))
            assert await receive(bob, 1) == ["over asyncio"]
            await bob.wait_delivered(await bob.send(alice.peer_id, "and back"))
            assert await receive(alice, 1) == ["and back"]


@pytest.mark.anyio
async def test_a_delivery_is_in_history_for_whoever_reads_after_its_event(
    tmp_path: Path,
) -> None:
    """The commit of a delivery is not awaited before the `Delivered` event, but is queued
    before it: a read after the event sees it, so does the profile reopened right after."""
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")

    async def delivered(events: anyio.abc.ObjectReceiveStream[object], message_id: str) -> None:
        while True:
            event = await events.receive()
            if isinstance(event, Delivered) and event.message_id == message_id:
                return

    with anyio.fail_after(TIMEOUT):
        async with online(b_dir) as bob:
            async with online(a_dir) as alice:
                await introduce(alice, bob, "bob")
                async with alice.events() as events:
                    first = await alice.send("bob", "one")
                    await delivered(events, first)
                    states = {m.text: m.state for m in await alice.history("bob")}
                    assert states == {"one": "delivered"}
                    # A send right on the event, then a read: the delivery is there.
                    second = await alice.send("bob", "two")
                    states = {m.text: m.state for m in await alice.history("bob")}
                    assert states["one"] == "delivered"
                    await delivered(events, second)
                    third = await alice.send("bob", "three")
                    await delivered(events, third)
                # Closed at once: the deliveries noted last are committed on the way out.
            async with online(a_dir) as alice:
                states = {m.text: m.state for m in await alice.history("bob")}
                assert states == {"one": "delivered", "two": "delivered", "three": "delivered"}
                assert await alice.run_db(alice.profile.db.outbox, str(bob.peer_id)) == []


@pytest.mark.anyio
async def test_both_sides_move_search_tokens_into_the_index_and_find_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teia.peer import db as peer_db

    monkeypatch.setattr(peer_db, "_RECENT_TOKENS", 4)  # a merge every second message
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob)
            ids = [await alice.send(bob.peer_id, f"searchable {i}") for i in range(10)]
            for message_id in ids:
                await alice.wait_delivered(message_id)
            await receive(bob, 10)
            for peer in (alice, bob):
                # Calls run in order: a merge queued before this read has run.
                read = peer.profile.db.read
                indexed = await peer.run_db(read, "SELECT count(*) FROM search_tokens")
                recent = await peer.run_db(read, "SELECT count(*) FROM search_recent")
                assert indexed[0][0] >= 16  # merged, by the peer (the cap is 32)
                assert recent[0][0] < 4
                assert len(await peer.search("searchable")) == 10
                assert [m.text for m in await peer.search("7")] == ["searchable 7"]


@pytest.mark.anyio
async def test_read_receipts(tmp_path: Path) -> None:
    """Bob reads Alice's texts: hers turn ``read`` and she gets a `Read` event; reading again
    tells nothing new; with read receipts off, Carol's reading stays on her side."""
    with anyio.fail_after(TIMEOUT):
        a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
        c_dir = make_profile(tmp_path / "c", read_receipts=False)
        async with online(a_dir) as alice, online(b_dir) as bob, online(c_dir) as carol:
            for other in (bob, carol):
                await introduce(alice, other)
                await introduce(other, alice)
            async with alice.events() as events:
                ids = [await alice.send(bob.peer_id, f"texto {i}") for i in range(3)]
                for message_id in ids:
                    await alice.wait_delivered(message_id)
                assert await receive(bob, 3) == ["texto 0", "texto 1", "texto 2"]
                assert await bob.mark_read(alice.peer_id, ids[:1]) == 1
                assert await bob.mark_read(alice.peer_id) == 2
                assert await bob.mark_read(alice.peer_id) == 0
                read: list[str] = []
                while len(read) < 3:
                    event = await events.receive()
                    if isinstance(event, Read):
                        assert event.peer == bob.peer_id
                        read += event.message_ids
                assert sorted(read) == sorted(ids)
            states = [row.state for row in await alice.history(bob.peer_id)]
            assert states == ["read", "read", "read"]
            assert [r.state for r in await bob.history(alice.peer_id)] == ["read"] * 3
            # A late delivered mark never takes "read" back.
            row = await alice.wait_delivered(ids[0])
            assert row.state == "read"

            quiet = await alice.send(carol.peer_id, "para a carol")
            await alice.wait_delivered(quiet)
            assert await receive(carol, 1) == ["para a carol"]
            assert await carol.mark_read(alice.peer_id) == 1
            assert [r.state for r in await carol.history(alice.peer_id)] == ["read"]
            # Carol sent nothing: a text of hers afterwards arrives before any read receipt
            # could, and Alice's text stays delivered.
            marker = await carol.send(alice.peer_id, "ok")
            await carol.wait_delivered(marker)
            assert await receive(alice, 1) == ["ok"]
            assert [r.state for r in await alice.history(carol.peer_id) if r.outgoing] == [
                "delivered"
            ]


@given(st.binary(max_size=16 * 260))
def test_read_receipt_payloads(data: bytes) -> None:
    try:
        ids = decode_read(data)
    except InvalidChatMessage:
        assert not data or len(data) % 16 or len(data) > 16 * 256
        return
    assert encode_read(ids) == data


@pytest.mark.anyio
async def test_a_text_is_retracted_for_everyone(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob)
            await introduce(bob, alice)
            oops = await alice.send(bob.peer_id, "a senha é peixe-espada")
            fine = await alice.send(bob.peer_id, "bom dia")
            for message_id in (oops, fine):
                await alice.wait_delivered(message_id)
            assert await receive(bob, 2) == ["a senha é peixe-espada", "bom dia"]
            async with bob.events() as events:
                await alice.retract(oops)
                event = await events.receive()
                while not isinstance(event, Retracted):
                    event = await events.receive()
            assert event.peer == alice.peer_id
            assert event.message_id == oops
            for peer, other in ((alice, bob), (bob, alice)):
                rows = await peer.history(other.peer_id)
                assert (rows[0].text, rows[0].state) == ("", "retracted")
                assert rows[1].text == "bom dia"
                assert await peer.search("peixe-espada") == []
                assert [r.text for r in await peer.search("bom dia")] == ["bom dia"]
            # Only our own texts: Bob cannot retract Alice's, nobody an unknown ID; a
            # retraction naming someone else's text changes nothing.
            with pytest.raises(DeliveryError):
                await bob.retract(fine)
            with pytest.raises(DeliveryError):
                await alice.retract("00" * 16)
            await bob.send_app(alice.peer_id, "teia.retract", bytes.fromhex(fine))
            marker = await bob.send(alice.peer_id, "depois")
            await bob.wait_delivered(marker)
            assert await receive(alice, 1) == ["depois"]
            assert [r.state for r in await alice.history(bob.peer_id) if r.outgoing][1] == (
                "delivered"
            )
