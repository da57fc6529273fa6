"""Device management and account data with matrix-nio and plain HTTP, on both backends:
devices listed and renamed, deleting one asks for the password (user-interactive) and ends its
sessions and keys; global and room account data stored, read back and delivered by sync, the
read marker kept as room account data."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from nio import (
    DeleteDevicesAuthResponse,
    DeleteDevicesResponse,
    DevicesResponse,
    FullyReadEvent,
    LoginResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomSendResponse,
    SyncResponse,
    UpdateDeviceResponse,
)

from .conftest import ServerHandle, nio_client

pytestmark = pytest.mark.anyio
TIMEOUT = 60
BASE = "/_matrix/client/v3"


async def test_devices_are_listed_renamed_and_deleted_with_the_password(
    server: ServerHandle,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with (
            nio_client(server.url, "alice") as phone,
            nio_client(server.url, "alice") as laptop,
        ):
            assert isinstance(await phone.register("alice", "correct horse"), RegisterResponse)
            logged_in = await laptop.login("correct horse", device_name="Laptop")
            assert isinstance(logged_in, LoginResponse), logged_in
            listed = await phone.devices()
            assert isinstance(listed, DevicesResponse), listed
            names = {d.id: d.display_name for d in listed.devices}
            assert names == {phone.device_id: None, laptop.device_id: "Laptop"}
            renamed = await phone.update_device(phone.device_id, {"display_name": "Phone"})
            assert isinstance(renamed, UpdateDeviceResponse), renamed
            listed = await laptop.devices()
            assert isinstance(listed, DevicesResponse)
            assert {d.id: d.display_name for d in listed.devices}[phone.device_id] == "Phone"

            # Deleting asks for the password first; a wrong one is refused.
            asked = await phone.delete_devices([laptop.device_id])
            assert isinstance(asked, DeleteDevicesAuthResponse), asked
            wrong = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "alice"},
                "password": "wrong",
                "session": asked.session,
            }
            refused = await phone.delete_devices([laptop.device_id], wrong)
            assert not isinstance(refused, DeleteDevicesResponse), refused
            right = {**wrong, "password": "correct horse"}
            deleted = await phone.delete_devices([laptop.device_id], right)
            assert isinstance(deleted, DeleteDevicesResponse), deleted
            # The laptop's session is over; the phone goes on.
            assert not isinstance(await laptop.sync(timeout=0), SyncResponse)
            listed = await phone.devices()
            assert isinstance(listed, DevicesResponse)
            assert [d.id for d in listed.devices] == [phone.device_id]


async def test_account_data_is_kept_and_synced(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            reply = await http.post(
                BASE + "/register",
                json={"username": "bob", "password": "pw", "auth": {"type": "m.login.dummy"}},
            )
            token = {"Authorization": f"Bearer {reply.json()['access_token']}"}
            user = "@bob:localhost"
            first = (await http.get(BASE + "/sync", headers=token)).json()
            assert first["account_data"]["events"] == []
            direct = {"@carol:localhost": ["!room:localhost"]}
            reply = await http.put(
                f"{BASE}/user/{user}/account_data/m.direct", headers=token, json=direct
            )
            assert reply.status_code == 200, reply.text
            got = await http.get(f"{BASE}/user/{user}/account_data/m.direct", headers=token)
            assert got.json() == direct
            missing = await http.get(f"{BASE}/user/{user}/account_data/x.none", headers=token)
            assert missing.status_code == 404
            other = await http.put(
                f"{BASE}/user/@carol:localhost/account_data/m.direct", headers=token, json={}
            )
            assert other.status_code == 403
            later = (
                await http.get(BASE + "/sync", headers=token, params={"since": first["next_batch"]})
            ).json()
            assert later["account_data"]["events"] == [{"type": "m.direct", "content": direct}]
            # Room account data goes with its room; an initial sync has everything.
            room = (await http.post(BASE + "/createRoom", headers=token, json={})).json()
            room_id = room["room_id"]
            tags = {"tags": {"u.work": {"order": 0.5}}}
            reply = await http.put(
                f"{BASE}/user/{user}/rooms/{room_id}/account_data/m.tag", headers=token, json=tags
            )
            assert reply.status_code == 200, reply.text
            since = later["next_batch"]
            news = (await http.get(BASE + "/sync", headers=token, params={"since": since})).json()
            assert news["rooms"]["join"][room_id]["account_data"]["events"] == [
                {"type": "m.tag", "content": tags}
            ]
            assert news["account_data"]["events"] == []
            full = (await http.get(BASE + "/sync", headers=token)).json()
            assert full["account_data"]["events"] == [{"type": "m.direct", "content": direct}]
            assert full["rooms"]["join"][room_id]["account_data"]["events"] == [
                {"type": "m.tag", "content": tags}
            ]


async def test_the_read_marker_is_room_account_data(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "erin") as erin:
            assert isinstance(await erin.register("erin", "pw"), RegisterResponse)
            created = await erin.room_create(name="notas")
            assert isinstance(created, RoomCreateResponse), created
            sent = await erin.room_send(created.room_id, "m.room.message", text("lembrar"))
            assert isinstance(sent, RoomSendResponse), sent
            since = (await erin.sync(timeout=0)).next_batch
            await erin.room_read_markers(created.room_id, sent.event_id, sent.event_id)
            synced = await erin.sync(timeout=0, since=since)
            assert isinstance(synced, SyncResponse), synced
            markers = [
                e
                for e in synced.rooms.join[created.room_id].account_data
                if isinstance(e, FullyReadEvent)
            ]
            assert [m.event_id for m in markers] == [sent.event_id]


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}
