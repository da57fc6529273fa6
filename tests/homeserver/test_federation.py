"""Federation between two homeserver-lite instances on loopback: a user on A and a user on B
share a room (make_join/send_join, backfill) and talk both ways through /send; with A stopped,
B's user still reads the whole history; forged signatures, bad request signatures and
replayed transactions are refused and store nothing."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from nio import (
    JoinResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)

from teia.homeserver.events import (
    b64encode,
    canonical_json,
    compute_event_id,
    content_hash,
    sign_event,
)
from teia.homeserver.keys import SigningKey

from .conftest import ServerHandle, nio_client, serve_in_thread, server_config

pytestmark = pytest.mark.anyio
TIMEOUT = 90


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


async def _texts(client: Any, room_id: str) -> list[str]:
    """The room's whole history as this client's server has it, oldest first."""
    bodies: list[str] = []
    token = None
    for _ in range(50):
        page = await client.room_messages(room_id, start=token or "", limit=20)
        assert isinstance(page, RoomMessagesResponse), page
        bodies += [e.body for e in page.chunk if isinstance(e, RoomMessageText)]
        if not page.end:
            break
        token = page.end
    return list(reversed(bodies))


async def _wait_for_text(
    client: Any, server: ServerHandle, room_id: str, since: str, body: str
) -> str:
    """Long-poll sync until ``body`` arrives in the room; returns the next token."""
    for _ in range(20):
        got = await client.sync(timeout=10_000, since=since)
        assert isinstance(got, SyncResponse), got
        since = got.next_batch
        room = got.rooms.join.get(room_id)
        if room and any(
            isinstance(e, RoomMessageText) and e.body == body for e in room.timeline.events
        ):
            return since
    raise AssertionError(f"{body!r} never arrived")


def _x_matrix(
    key: SigningKey, origin: str, destination: str, method: str, uri: str, content: Any
) -> str:
    request = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
        "content": content,
    }
    sig = b64encode(key.sign(canonical_json(request)))
    return f'X-Matrix origin="{origin}",destination="{destination}",key="{key.key_id}",sig="{sig}"'


async def test_two_servers_share_a_room_and_history_survives(tmp_path: Path) -> None:
    config_a, config_b = server_config(tmp_path, "a"), server_config(tmp_path, "b")
    with anyio.fail_after(TIMEOUT):
        with serve_in_thread(config_b) as server_b:
            with serve_in_thread(config_a) as server_a:
                async with (
                    nio_client(server_a.url, "alice") as alice,
                    nio_client(server_b.url, "bob") as bob,
                ):
                    assert isinstance(await alice.register("alice", "pw"), RegisterResponse)
                    assert isinstance(await bob.register("bob", "pw"), RegisterResponse)
                    created = await alice.room_create(
                        name="Federada", preset=RoomPreset.public_chat
                    )
                    assert isinstance(created, RoomCreateResponse), created
                    room_id = created.room_id
                    for i in range(12):
                        sent = await alice.room_send(room_id, "m.room.message", text(f"a{i}"))
                        assert isinstance(sent, RoomSendResponse), sent

                    joined = await bob.join(room_id)
                    assert isinstance(joined, JoinResponse), joined
                    assert await _texts(bob, room_id) == [f"a{i}" for i in range(12)]

                    alice_since = (await alice.sync()).next_batch
                    bob_since = (await bob.sync()).next_batch
                    assert isinstance(
                        await bob.room_send(room_id, "m.room.message", text("oi alice")),
                        RoomSendResponse,
                    )
                    await _wait_for_text(alice, server_a, room_id, alice_since, "oi alice")
                    assert isinstance(
                        await alice.room_send(room_id, "m.room.message", text("oi bob")),
                        RoomSendResponse,
                    )
                    await _wait_for_text(bob, server_b, room_id, bob_since, "oi bob")
                    members = await bob.joined_members(room_id)
                    assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id}
            # A is stopped: B still has the whole history.
            async with nio_client(server_b.url, "bob") as bob_again:
                await bob_again.login("pw")
                history = await _texts(bob_again, room_id)
                assert history == [*(f"a{i}" for i in range(12)), "oi alice", "oi bob"]

                await _hostile_federation(
                    server_b,
                    config_a,
                    room_id,
                    alice_user="@alice:" + config_a.server_name,
                    bob=bob_again,
                )


async def _public(client: Any, room_id: str) -> None:
    response = await client.room_put_state(room_id, "m.room.join_rules", {"join_rule": "public"})
    assert not hasattr(response, "status_code"), response


async def _hostile_federation(
    server_b: ServerHandle, config_a: Any, room_id: str, alice_user: str, bob: Any
) -> None:
    key_a = SigningKey.load_or_create(config_a.data_dir)
    origin, destination = config_a.server_name, server_b.server_name
    before = await _texts(bob, room_id)
    prev = [e.event_id for e in (await bob.room_messages(room_id, start="", limit=1)).chunk]

    def event(body: str, *, signer: SigningKey | None = None) -> dict[str, Any]:
        pdu: dict[str, Any] = {
            "room_id": room_id,
            "sender": alice_user,
            "type": "m.room.message",
            "content": text(body),
            "origin_server_ts": 1_800_000_000_000,
            "depth": 1000,
            "prev_events": prev,
            "auth_events": [],
        }
        pdu["hashes"] = {"sha256": content_hash(pdu)}
        sign_event(pdu, origin, key_a.key_id, signer or key_a)
        return pdu

    async with aiohttp.ClientSession() as http:

        async def send(
            txn: str, pdus: list[dict[str, Any]], *, key: SigningKey = key_a
        ) -> tuple[int, Any]:
            uri = f"/_matrix/federation/v1/send/{txn}"
            body = {"origin": origin, "origin_server_ts": 1, "pdus": pdus, "edus": []}
            headers = {
                "Authorization": _x_matrix(key, origin, destination, "PUT", uri, body),
                "Content-Type": "application/json",
            }
            async with http.put(
                server_b.url + uri, data=json.dumps(body), headers=headers
            ) as response:
                return response.status, await response.json()

        # Content changed after signing: the hash no longer matches.
        tampered = event("genuine")
        tampered["content"] = text("tampered")
        # Valid hash, signed by another key under A's key ID.
        forged = event("forged", signer=SigningKey(key_a.key_id, secrets.token_bytes(32)))
        status, answer = await send("t-bad", [tampered, forged])
        assert status == 200
        assert all("error" in result for result in answer["pdus"].values())

        # The request itself signed with a key that is not A's.
        impostor = SigningKey(key_a.key_id, secrets.token_bytes(32))
        status, answer = await send("t-impostor", [event("impostor")], key=impostor)
        assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")

        # A genuine event is taken once; a replay of its transaction ID changes nothing.
        genuine = event("late from A")
        status, answer = await send("t-1", [genuine])
        assert answer["pdus"] == {compute_event_id(genuine): {}}
        replay = event("replayed")
        status, again = await send("t-1", [replay])
        assert again == answer

    history = await _texts(bob, room_id)
    assert history == [*before, "late from A"]
