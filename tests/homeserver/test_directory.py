"""Room aliases and the public room directory: matrix-nio creates a room with an alias and lists
it, another user resolves the alias and joins by it; the rules for creating, deleting and
listing; the public list's search and pages; and an alias of another server resolved over
federation to join there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from nio import (
    JoinResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomResolveAliasResponse,
    RoomVisibility,
)

from .conftest import ServerHandle, http_user, nio_client, two_servers

pytestmark = pytest.mark.anyio
TIMEOUT = 60
BASE = "/_matrix/client/v3"


async def test_an_alias_is_resolved_and_joined_and_the_room_listed(server: ServerHandle) -> None:
    with anyio.fail_after(TIMEOUT):
        async with nio_client(server.url, "alice") as alice, nio_client(server.url, "bob") as bob:
            for client in (alice, bob):
                assert isinstance(await client.register(client.user, "pw"), RegisterResponse)
            created = await alice.room_create(
                alias="sala",
                visibility=RoomVisibility.public,
                name="Sala pública",
                topic="assuntos gerais",
            )
            assert isinstance(created, RoomCreateResponse), created
            resolved = await bob.room_resolve_alias("#sala:localhost")
            assert isinstance(resolved, RoomResolveAliasResponse), resolved
            assert resolved.room_id == created.room_id
            assert resolved.servers == ["localhost"]
            joined = await bob.join("#sala:localhost")
            assert isinstance(joined, JoinResponse), joined
            assert joined.room_id == created.room_id
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                listed = (await http.get(BASE + "/publicRooms")).json()
            assert listed["chunk"] == [
                {
                    "room_id": created.room_id,
                    "num_joined_members": 2,
                    "world_readable": False,
                    "guest_can_join": False,
                    "join_rule": "public",
                    "name": "Sala pública",
                    "topic": "assuntos gerais",
                    "canonical_alias": "#sala:localhost",
                }
            ]
            assert listed["total_room_count_estimate"] == 1


async def test_alias_and_listing_rules(server: ServerHandle) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        carol, dave = await http_user(http, "carol"), await http_user(http, "dave")

        async def room(name: str, **body: Any) -> str:
            reply = await http.post(
                BASE + "/createRoom", headers=carol, json={"name": name, **body}
            )
            room_id: str = reply.json()["room_id"]
            return room_id

        first = await room("first", room_alias_name="first")
        taken = await http.post(
            BASE + "/createRoom", headers=carol, json={"room_alias_name": "first"}
        )
        assert taken.json()["errcode"] == "M_ROOM_IN_USE"
        alias = "/directory/room/%23more%3Alocalhost"
        # Dave is not in the room: he cannot name it; Carol can, once.
        assert (
            await http.put(BASE + alias, headers=dave, json={"room_id": first})
        ).status_code == 403
        assert (
            await http.put(BASE + alias, headers=carol, json={"room_id": first})
        ).status_code == 200
        assert (
            await http.put(BASE + alias, headers=carol, json={"room_id": first})
        ).status_code == 409
        other = "/directory/room/%23x%3Aelsewhere.example"
        assert (
            await http.put(BASE + other, headers=carol, json={"room_id": first})
        ).status_code == 400
        listed = await http.get(f"{BASE}/rooms/{first}/aliases", headers=carol)
        assert listed.json() == {"aliases": ["#first:localhost", "#more:localhost"]}
        # Only its creator (or a moderator of the room) deletes an alias.
        assert (await http.delete(BASE + alias, headers=dave)).status_code == 403
        assert (await http.delete(BASE + alias, headers=carol)).status_code == 200
        assert (await http.get(BASE + alias)).status_code == 404
        # Listing: moderators only; private by default.
        visibility = f"{BASE}/directory/list/room/{first}"
        assert (await http.get(visibility)).json() == {"visibility": "private"}
        assert (
            await http.put(visibility, headers=dave, json={"visibility": "public"})
        ).status_code == 403
        assert (
            await http.put(visibility, headers=carol, json={"visibility": "public"})
        ).status_code == 200
        assert (await http.get(visibility)).json() == {"visibility": "public"}
        # Search and pages over the public list.
        for name in ("second", "third"):
            await room(name, visibility="public", topic=f"about {name}")
        found = await http.post(
            BASE + "/publicRooms", headers=dave, json={"filter": {"generic_search_term": "THIRD"}}
        )
        assert [r["name"] for r in found.json()["chunk"]] == ["third"]
        pages: list[str] = []
        since = None
        for _ in range(5):
            body: dict[str, Any] = {"limit": 2, **({"since": since} if since else {})}
            page = (await http.post(BASE + "/publicRooms", headers=dave, json=body)).json()
            pages += [r["name"] for r in page["chunk"]]
            since = page.get("next_batch")
            if since is None:
                break
        assert sorted(pages) == ["first", "second", "third"]
        bad = await http.post(BASE + "/publicRooms", headers=dave, json={"since": "x"})
        assert bad.status_code == 400


async def test_an_alias_of_another_server_is_resolved_over_federation(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT), two_servers(tmp_path) as (server_a, server_b):
        async with (
            nio_client(server_a.url, "alice") as alice,
            nio_client(server_b.url, "bob") as bob,
        ):
            assert isinstance(await alice.register("alice", "pw"), RegisterResponse)
            assert isinstance(await bob.register("bob", "pw"), RegisterResponse)
            created = await alice.room_create(alias="praca", visibility=RoomVisibility.public)
            assert isinstance(created, RoomCreateResponse), created
            alias = f"#praca:{server_a.server_name}"
            resolved = await bob.room_resolve_alias(alias)
            assert isinstance(resolved, RoomResolveAliasResponse), resolved
            assert resolved.room_id == created.room_id
            assert resolved.servers == [server_a.server_name]
            joined = await bob.join(alias)
            assert isinstance(joined, JoinResponse), joined
            members = await alice.joined_members(created.room_id)
            assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id}
            missing = await bob.room_resolve_alias(f"#nada:{server_a.server_name}")
            assert not isinstance(missing, RoomResolveAliasResponse)
