"""matrix-nio, a real Matrix client, against homeserver-lite on both storage backends:
register, log in, create a room, invite, join, talk, sync (long-poll woken by the send),
paginate, react, redact, typing and receipts, media, profiles, and a kick that sticks."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from nio import (
    JoinResponse,
    LoginResponse,
    ReactionEvent,
    ReceiptEvent,
    RedactedEvent,
    RedactionEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomSendError,
    RoomSendResponse,
    SyncResponse,
    TypingNoticeEvent,
    UploadResponse,
)

from .conftest import ServerHandle, nio_client

pytestmark = pytest.mark.anyio
TIMEOUT = 60


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


async def sync(client: Any, since: str | None = None, wait_ms: int = 0) -> SyncResponse:
    response = await client.sync(timeout=wait_ms, since=since, full_state=False)
    assert isinstance(response, SyncResponse), response
    return response


async def test_two_users_talk_through_sync_and_history(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "alice") as alice, nio_client(server.url, "bob") as bob:
            for client in (alice, bob):
                registered = await client.register(client.user, "correct horse")
                assert isinstance(registered, RegisterResponse), registered
                logged_in = await client.login("correct horse")
                assert isinstance(logged_in, LoginResponse), logged_in
            assert alice.user_id == "@alice:localhost"
            created = await alice.room_create(name="Sala", topic="conversa", invite=[bob.user_id])
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id

            first = await sync(bob)
            assert room_id in first.rooms.invite
            joined = await bob.join(room_id)
            assert isinstance(joined, JoinResponse), joined
            bob_since = (await sync(bob)).next_batch
            alice_since = (await sync(alice)).next_batch
            assert alice.rooms[room_id].name == "Sala"

            # A waiting sync is woken by the send: no polling, no sleeping.
            result: dict[str, SyncResponse] = {}

            async def long_poll() -> None:
                result["sync"] = await sync(bob, bob_since, wait_ms=30_000)

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_poll)
                await anyio.to_thread.run_sync(
                    server.call, server.hs.notifier.until_waiting, bob.user_id
                )
                sent = await alice.room_send(
                    room_id, "m.room.message", text("olá bob"), tx_id="txn-1"
                )
                assert isinstance(sent, RoomSendResponse), sent
            assert time.monotonic() - started < 20
            timeline = result["sync"].rooms.join[room_id].timeline.events
            assert [e.body for e in timeline if isinstance(e, RoomMessageText)] == ["olá bob"]

            # Idempotent per transaction ID.
            again = await alice.room_send(room_id, "m.room.message", text("olá bob"), tx_id="txn-1")
            assert isinstance(again, RoomSendResponse)
            assert again.event_id == sent.event_id

            # Both ways, then history by pagination.
            bodies = [f"m{i}" for i in range(25)]
            for i, body in enumerate(bodies):
                sender = bob if i % 2 else alice
                assert isinstance(
                    await sender.room_send(room_id, "m.room.message", text(body)),
                    RoomSendResponse,
                )
            got = await sync(alice, alice_since)
            room = got.rooms.join[room_id]
            assert room.timeline.limited  # 26 new events, timeline limit 10
            seen: list[str] = []
            token = room.timeline.prev_batch
            for _ in range(20):
                page = await bob.room_messages(room_id, start=token, limit=7)
                assert isinstance(page, RoomMessagesResponse), page
                seen += [e.body for e in page.chunk if isinstance(e, RoomMessageText)]
                if not page.end:
                    break
                token = page.end
            newest = [e.body for e in room.timeline.events if isinstance(e, RoomMessageText)]
            history = list(reversed(seen)) + newest
            assert history == ["olá bob", *bodies]

            # Reactions and redactions.
            target = sent.event_id
            reaction = {
                "m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": "👍"}
            }
            reacted = await bob.room_send(room_id, "m.reaction", reaction)
            assert isinstance(reacted, RoomSendResponse), reacted
            duplicate = await bob.room_send(room_id, "m.reaction", reaction)
            assert isinstance(duplicate, RoomSendError)
            assert duplicate.status_code == "M_DUPLICATE_ANNOTATION"
            redacted = await alice.room_redact(room_id, target, reason="oops")
            assert not hasattr(redacted, "status_code"), redacted
            got = await sync(bob, result["sync"].next_batch)
            events = got.rooms.join[room_id].timeline.events
            reactions = [e for e in events if isinstance(e, ReactionEvent)]
            assert [(r.reacts_to, r.key) for r in reactions] == [(target, "👍")]
            assert any(isinstance(e, RedactionEvent) and e.redacts == target for e in events)
            page = await bob.room_messages(room_id, start=got.next_batch, limit=100)
            assert isinstance(page, RoomMessagesResponse)
            gone = [e for e in page.chunk if e.event_id == target]
            assert len(gone) == 1
            assert isinstance(gone[0], RedactedEvent)
            assert "olá bob" not in str(gone[0].source)

            # Typing and read receipts arrive as ephemeral events.
            since = got.next_batch
            await alice.room_typing(room_id, True, timeout=10_000)
            await alice.update_receipt_marker(room_id, reacted.event_id)
            got = await sync(bob, since)
            ephemeral = got.rooms.join[room_id].ephemeral
            typing = [e for e in ephemeral if isinstance(e, TypingNoticeEvent)]
            assert typing
            assert typing[-1].users == [alice.user_id]
            receipts = [e for e in ephemeral if isinstance(e, ReceiptEvent)]
            assert receipts
            assert receipts[0].receipts[0].user_id == alice.user_id

            # A kicked user can no longer send, and sees the kick.
            since = got.next_batch
            kicked = await alice.room_kick(room_id, bob.user_id, reason="bye")
            assert not hasattr(kicked, "status_code"), kicked
            refused = await bob.room_send(room_id, "m.room.message", text("still here?"))
            assert isinstance(refused, RoomSendError)
            assert refused.status_code == "M_FORBIDDEN"
            got = await sync(bob, since)
            assert room_id in got.rooms.leave
            again_join = await bob.join(room_id)
            assert not isinstance(again_join, JoinResponse)  # invite-only: no way back


async def test_media_profiles_and_directory(server: ServerHandle) -> None:
    import aiohttp

    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "carol") as carol:
            assert isinstance(await carol.register("carol", "pw"), RegisterResponse)
            data = bytes(range(256)) * 40
            uploaded, _ = await carol.upload(
                lambda *_: data, "image/png", "pic.png", filesize=len(data)
            )
            assert isinstance(uploaded, UploadResponse), uploaded
            assert uploaded.content_uri.startswith("mxc://localhost/")
            downloaded = await carol.download(uploaded.content_uri)
            assert getattr(downloaded, "body", None) == data, downloaded
            assert downloaded.content_type == "image/png"

            assert not hasattr(await carol.set_displayname("Carol C."), "status_code")
            profile = await carol.get_displayname(carol.user_id)
            assert profile.displayname == "Carol C."

            headers = {"Authorization": f"Bearer {carol.access_token}"}
            async with aiohttp.ClientSession() as http:
                url = f"{server.url}/_matrix/client/v3/user_directory/search"
                async with http.post(
                    url, json={"search_term": "carol c"}, headers=headers
                ) as response:
                    assert response.status == 200
                    found = await response.json()
                assert found["results"] == [{"user_id": carol.user_id, "display_name": "Carol C."}]


async def shared_room(alice: Any, bob: Any) -> str:
    """Both registered, Alice's room with Bob joined; its ID."""
    for client in (alice, bob):
        assert isinstance(await client.register(client.user, "pw"), RegisterResponse)
    created = await alice.room_create(name="sala", invite=[bob.user_id])
    assert isinstance(created, RoomCreateResponse), created
    await sync(bob)
    assert isinstance(await bob.join(created.room_id), JoinResponse)
    return str(created.room_id)


async def test_a_new_display_name_reaches_the_rooms(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "alice") as alice, nio_client(server.url, "bob") as bob:
            room_id = await shared_room(alice, bob)
            since = (await sync(bob)).next_batch
            assert not hasattr(await alice.set_displayname("Alice A."), "status_code")
            later = await sync(bob, since)
            names = [
                e.content.get("displayname")
                for e in later.rooms.join[room_id].timeline.events
                if getattr(e, "source", {}).get("type") == "m.room.member"
                and e.source.get("state_key") == alice.user_id
            ]
            assert names == ["Alice A."]
            assert bob.rooms[room_id].user_name(alice.user_id) == "Alice A."


async def test_a_lapsed_typing_notice_wakes_the_waiting_sync(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "alice") as alice, nio_client(server.url, "bob") as bob:
            room_id = await shared_room(alice, bob)
            since = (await sync(alice)).next_batch
            await bob.room_typing(room_id, typing_state=True, timeout=500)
            typing: list[list[str]] = []
            for _ in range(5):
                got = await sync(alice, since, wait_ms=30_000)
                since = got.next_batch
                room = got.rooms.join.get(room_id)
                typing += [
                    e.users for e in (room.ephemeral if room else [])
                    if isinstance(e, TypingNoticeEvent)
                ]  # fmt: skip
                if typing and not typing[-1]:
                    break
            # Bob typed, then his notice lapsed: the second long-poll woke for it, well
            # before its 30 s.
            assert typing == [[bob.user_id], []]
