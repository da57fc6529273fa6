"""End-to-end encryption through homeserver-lite with a real client: two matrix-nio clients
with encryption on (vodozemac Olm/Megolm) upload device and one-time keys, find each other's
devices, share a Megolm session over Olm-encrypted to-device messages, and talk in an encrypted
room — on both storage backends. The server stores only ciphertext. Plus the key endpoints'
rules and bounds over plain HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysUploadResponse,
    LoginResponse,
    MegolmEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)

from teia.errors import MatrixError

from .conftest import ServerHandle, http_user, two_servers

pytestmark = pytest.mark.anyio
TIMEOUT = 90
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


@contextlib.asynccontextmanager
async def e2e_client(url: str, user: str, store: Path) -> AsyncIterator[AsyncClient]:
    await anyio.Path(store).mkdir()
    client = AsyncClient(
        url, user, store_path=str(store), config=AsyncClientConfig(encryption_enabled=True)
    )
    try:
        yield client
    finally:
        await client.close()


async def sign_up(client: AsyncClient) -> None:
    assert isinstance(await client.register(client.user, "correct horse"), RegisterResponse)
    assert isinstance(await client.login("correct horse"), LoginResponse)
    assert client.should_upload_keys
    uploaded = await client.keys_upload()
    assert isinstance(uploaded, KeysUploadResponse), uploaded
    assert uploaded.signed_curve25519_count > 0


async def sync(client: AsyncClient, wait_ms: int = 0) -> SyncResponse:
    response = await client.sync(timeout=wait_ms, full_state=False)
    assert isinstance(response, SyncResponse), response
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    return response


async def texts(client: AsyncClient, room_id: str, response: SyncResponse) -> list[str]:
    room = response.rooms.join.get(room_id)
    events = room.timeline.events if room is not None else []
    undecrypted = [e for e in events if isinstance(e, MegolmEvent)]
    assert not undecrypted, "an event the client could not decrypt"
    return [e.body for e in events if isinstance(e, RoomMessageText) and e.sender != client.user_id]


async def send_and_read(
    sender: AsyncClient, reader: AsyncClient, room_id: str, body: str, rounds: int = 8
) -> None:
    """``sender`` sends ``body`` encrypted; ``reader``'s syncs (each waiting for news: the
    to-device room key, then the event) decrypt it."""
    sent = await sender.room_send(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        ignore_unverified_devices=True,
    )
    assert isinstance(sent, RoomSendResponse), sent
    got: list[str] = []
    for _ in range(rounds):
        got += await texts(reader, room_id, await sync(reader, wait_ms=10_000))
        if got:
            break
    assert got == [body]


async def test_two_clients_talk_in_an_encrypted_room(server: ServerHandle, tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            e2e_client(server.url, "alice", tmp_path / "alice") as alice,
            e2e_client(server.url, "bob", tmp_path / "bob") as bob,
        ):
            await sign_up(alice)
            await sign_up(bob)
            created = await alice.room_create(
                name="cofre", invite=[bob.user_id], initial_state=[ENCRYPTION]
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            await sync(bob)
            assert isinstance(await bob.join(room_id), JoinResponse)
            await sync(bob)
            await sync(alice)
            assert alice.rooms[room_id].encrypted
            # Alice learned Bob's device through the key endpoints.
            assert bob.device_id in alice.device_store[bob.user_id]

            await send_and_read(alice, bob, room_id, "segredo da alice")
            await send_and_read(bob, alice, room_id, "resposta do bob")

            # The server holds ciphertext only: neither text is anywhere in its events.
            stored = await anyio.to_thread.run_sync(server.call, _all_event_bodies, server.hs.store)
            assert "segredo" not in stored
            assert "resposta" not in stored
            assert '"m.room.encrypted"' in stored


async def _all_event_bodies(store: Any) -> str:
    rows = await store.db.run(lambda tx: tx.query("SELECT body FROM events"))
    return "\n".join(str(r[0]) for r in rows)


async def test_key_endpoints_over_http(server: ServerHandle) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        tokens = {u: await http_user(http, u, u.upper()) for u in ("carol", "dave")}
        carol, dave = tokens["carol"], tokens["dave"]
        base = "/_matrix/client/v3"
        device_keys = {
            "user_id": "@carol:localhost",
            "device_id": "CAROL",
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {"curve25519:CAROL": "abc", "ed25519:CAROL": "def"},
            "signatures": {"@carol:localhost": {"ed25519:CAROL": "sig"}},
        }
        one_time = {f"signed_curve25519:K{i}": {"key": f"k{i}", "signatures": {}} for i in range(3)}
        reply = await http.post(
            base + "/keys/upload",
            headers=carol,
            json={
                "device_keys": device_keys,
                "one_time_keys": one_time,
                "fallback_keys": {"signed_curve25519:F": {"key": "f", "fallback": True}},
            },
        )
        assert reply.json() == {"one_time_key_counts": {"signed_curve25519": 3}}
        # Keys for somebody else's device, a key ID already used with other content, and
        # over a hundred users at once: refused.
        forged = {**device_keys, "device_id": "OTHER"}
        reply = await http.post(base + "/keys/upload", headers=carol, json={"device_keys": forged})
        assert reply.status_code == 400
        clash = {"signed_curve25519:K0": {"key": "other", "signatures": {}}}
        reply = await http.post(base + "/keys/upload", headers=carol, json={"one_time_keys": clash})
        assert reply.status_code == 400
        too_many: dict[str, list[str]] = {f"@u{i}:localhost": [] for i in range(101)}
        reply = await http.post(base + "/keys/query", headers=dave, json={"device_keys": too_many})
        assert reply.status_code == 400
        assert reply.json()["errcode"] == "M_LIMIT_EXCEEDED"

        reply = await http.post(
            base + "/keys/query",
            headers=dave,
            json={"device_keys": {"@carol:localhost": [], "@erin:elsewhere.example": []}},
        )
        body = reply.json()
        assert body["device_keys"] == {"@carol:localhost": {"CAROL": device_keys}}
        assert list(body["failures"]) == ["elsewhere.example"]

        # Claims take the one-time keys in turn, then the fallback key (again and again).
        claimed = []
        for _ in range(5):
            reply = await http.post(
                base + "/keys/claim",
                headers=dave,
                json={"one_time_keys": {"@carol:localhost": {"CAROL": "signed_curve25519"}}},
            )
            claimed += list(reply.json()["one_time_keys"]["@carol:localhost"]["CAROL"])
        assert claimed == [
            "signed_curve25519:K0",
            "signed_curve25519:K1",
            "signed_curve25519:K2",
            "signed_curve25519:F",
            "signed_curve25519:F",
        ]

        # To-device: idempotent per transaction, delivered by sync, gone once acknowledged.
        message = {"messages": {"@carol:localhost": {"*": {"hello": "carol"}}}}
        for _ in range(2):
            reply = await http.put(base + "/sendToDevice/m.test/txn1", headers=dave, json=message)
            assert reply.status_code == 200
        first = (await http.get(base + "/sync", headers=carol)).json()
        assert first["to_device"]["events"] == [
            {"sender": "@dave:localhost", "type": "m.test", "content": {"hello": "carol"}}
        ]
        assert first["device_one_time_keys_count"] == {}
        assert first["device_unused_fallback_key_types"] == []
        again = (
            await http.get(base + "/sync", headers=carol, params={"since": first["next_batch"]})
        ).json()
        assert again["to_device"]["events"] == []
        reply = await http.put(
            base + "/sendToDevice/m.test/txn2",
            headers=dave,
            json={"messages": {"@carol:localhost": {"CAROL": "not an object"}}},
        )
        assert reply.status_code == 400
        # Carol's new keys show in Dave's device-list changes once they share a room.
        invite = {"invite": ["@dave:localhost"]}
        room = (await http.post(base + "/createRoom", headers=carol, json=invite)).json()["room_id"]
        await http.post(f"{base}/join/{room}", headers=dave)
        since = (await http.get(base + "/sync", headers=dave)).json()["next_batch"]
        await http.post(
            base + "/keys/upload",
            headers=carol,
            json={"device_keys": {**device_keys, "keys": {"curve25519:CAROL": "new"}}},
        )
        later = (await http.get(base + "/sync", headers=dave, params={"since": since})).json()
        assert later["device_lists"]["changed"] == ["@carol:localhost"]
        changes = await http.get(
            base + "/keys/changes", headers=dave, params={"from": since, "to": later["next_batch"]}
        )
        assert changes.json() == {"changed": ["@carol:localhost"], "left": []}
        # Logging out takes the device's keys away.
        await http.post(base + "/logout", headers=carol)
        reply = await http.post(
            base + "/keys/query", headers=dave, json={"device_keys": {"@carol:localhost": []}}
        )
        assert reply.json()["device_keys"] == {"@carol:localhost": {}}


async def test_an_encrypted_room_across_two_servers(tmp_path: Path) -> None:
    """Alice on A and Bob on B: keys are queried and claimed over federation, the room key
    travels as an m.direct_to_device EDU, and both read each other's encrypted messages."""
    with anyio.fail_after(TIMEOUT), two_servers(tmp_path) as (server_a, server_b):
        async with (
            e2e_client(server_a.url, "alice", tmp_path / "alice") as alice,
            e2e_client(server_b.url, "bob", tmp_path / "bob") as bob,
        ):
            await sign_up(alice)
            await sign_up(bob)
            created = await alice.room_create(
                name="cofre federado",
                preset=RoomPreset.public_chat,
                initial_state=[ENCRYPTION],
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            assert isinstance(await bob.join(room_id), JoinResponse)
            await sync(bob)
            for _ in range(5):  # until Alice's server has Bob's join
                await sync(alice, wait_ms=5_000)
                if bob.user_id in alice.rooms[room_id].users:
                    break
            await sync(alice)
            assert bob.device_id in alice.device_store[bob.user_id]

            await send_and_read(alice, bob, room_id, "segredo entre servidores")
            await send_and_read(bob, alice, room_id, "resposta federada")
            for server in (server_a, server_b):
                stored = await anyio.to_thread.run_sync(
                    server.call, _all_event_bodies, server.hs.store
                )
                assert "segredo" not in stored
                assert "resposta" not in stored


async def test_federated_edus_speak_only_for_their_own_servers_users(
    server: ServerHandle,
) -> None:
    hs = server.hs
    forged = {
        "sender": "@mallory:other.example",
        "type": "m.room_key_request",
        "message_id": "m1",
        "messages": {f"@alice:{hs.server_name}": {"*": {"x": 1}}},
    }
    with pytest.raises(MatrixError, match="not a user of the sending server"):
        await anyio.to_thread.run_sync(server.call, hs.direct_to_device, "evil.example", forged)
    with pytest.raises(MatrixError, match="not a user of the sending server"):
        await anyio.to_thread.run_sync(
            server.call, hs.device_list_update, "evil.example", {"user_id": "@x:other.example"}
        )
    with pytest.raises(MatrixError):
        await anyio.to_thread.run_sync(server.call, hs.direct_to_device, "other.example", [])
    # From the right server it is queued once, whatever the retries, for every device.
    await anyio.to_thread.run_sync(server.call, hs.register, "alice", "pw", "ALICE", False)
    for _ in range(2):
        await anyio.to_thread.run_sync(server.call, hs.direct_to_device, "other.example", forged)
    pending = await anyio.to_thread.run_sync(server.call, _count_to_device, hs.store)
    assert pending == 1


async def _count_to_device(store: Any) -> int:
    row = await store.db.run(lambda tx: tx.one("SELECT count(*) FROM to_device"))
    return int(row[0])


async def test_to_device_messages_stay_until_acknowledged_and_come_in_batches(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teia.homeserver import e2ee

    monkeypatch.setattr(e2ee, "TO_DEVICE_BATCH", 4)  # 100 in service
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        tokens = {u: await http_user(http, u, u.upper()) for u in ("fay", "gus")}
        base = "/_matrix/client/v3"
        start = (await http.get(base + "/sync", headers=tokens["fay"])).json()["next_batch"]
        for i in range(6):
            reply = await http.put(
                f"{base}/sendToDevice/m.test/t{i}",
                headers=tokens["gus"],
                json={"messages": {"@fay:localhost": {"FAY": {"n": i}}}},
            )
            assert reply.status_code == 200

        async def sync(since: str) -> dict[str, Any]:
            reply = await http.get(
                base + "/sync", headers=tokens["fay"], params={"since": since, "timeout": "0"}
            )
            body: dict[str, Any] = reply.json()
            return body

        first = await sync(start)
        numbers = [e["content"]["n"] for e in first["to_device"]["events"]]
        assert numbers == list(range(4))
        # The answer was lost: the same token gets the same messages again.
        again = await sync(start)
        assert [e["content"]["n"] for e in again["to_device"]["events"]] == numbers
        second = await sync(first["next_batch"])
        assert [e["content"]["n"] for e in second["to_device"]["events"]] == [4, 5]
        third = await sync(second["next_batch"])
        assert third["to_device"]["events"] == []
        left = await anyio.to_thread.run_sync(server.call, _count_to_device, server.hs.store)
        assert left == 0  # all acknowledged, all deleted


async def test_device_lists_left_names_users_no_room_is_shared_with_any_more(
    server: ServerHandle,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        tokens = {u: await http_user(http, u) for u in ("hal", "ivy", "joe")}
        base = "/_matrix/client/v3"
        invite = {"invite": ["@ivy:localhost", "@joe:localhost"]}
        first = (await http.post(base + "/createRoom", headers=tokens["hal"], json=invite)).json()
        second = (
            await http.post(
                base + "/createRoom", headers=tokens["hal"], json={"invite": ["@joe:localhost"]}
            )
        ).json()
        await http.post(f"{base}/join/{first['room_id']}", headers=tokens["ivy"])
        for room in (first, second):
            await http.post(f"{base}/join/{room['room_id']}", headers=tokens["joe"])
        since = (await http.get(base + "/sync", headers=tokens["hal"])).json()["next_batch"]
        # Ivy leaves the only room she shares with Hal; Joe leaves one of two.
        await http.post(f"{base}/rooms/{first['room_id']}/leave", headers=tokens["ivy"])
        await http.post(f"{base}/rooms/{first['room_id']}/leave", headers=tokens["joe"])
        later = (
            await http.get(base + "/sync", headers=tokens["hal"], params={"since": since})
        ).json()
        assert later["device_lists"]["left"] == ["@ivy:localhost"]
        # Hal leaves the second room: Joe shares nothing with him any more.
        since = later["next_batch"]
        await http.post(f"{base}/rooms/{second['room_id']}/leave", headers=tokens["hal"])
        last = (
            await http.get(base + "/sync", headers=tokens["hal"], params={"since": since})
        ).json()
        assert last["device_lists"]["left"] == ["@joe:localhost"]
