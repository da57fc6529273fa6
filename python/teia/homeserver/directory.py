"""Room aliases and the public room directory (client-server API, and the alias query over
federation).

- ``PUT/GET/DELETE /directory/room/{alias}``: ``#name:server`` → room ID. Aliases of this server
  are created by a joined member of the room (at most 100 a room), deleted by their creator or
  by a member allowed to send ``m.room.canonical_alias``; an alias of another server is asked
  of it (``GET /_matrix/federation/v1/query/directory``).
- ``createRoom`` takes ``room_alias_name`` (the alias and the room's ``m.room.canonical_alias``)
  and ``visibility: public`` (listed in the directory).
- ``GET/PUT /directory/list/room/{roomId}``: whether a room is listed (PUT: members allowed to
  send ``m.room.canonical_alias``).
- ``GET/POST /publicRooms``: the listed rooms, most joined members first, with name, topic,
  canonical alias, member count and join rule; ``filter.generic_search_term`` matches name,
  topic and alias; ``limit`` (at most 100) and ``since`` page through them.
- ``/join/{roomIdOrAlias}`` resolves an alias first (its servers are tried for a remote room).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

from teia.errors import MatrixError
from teia.homeserver import auth
from teia.homeserver.storage import Tx

if TYPE_CHECKING:
    from teia.homeserver.server import Homeserver, Requester

__all__ = ["Directory", "parse_alias"]

_ALIAS: Final = re.compile(r"^#([^:\s#]{1,128}):([A-Za-z0-9.\-\[\]:]{1,255})$")
MAX_ALIASES_PER_ROOM: Final = 100
MAX_PUBLIC_ROOMS_PAGE: Final = 100


def parse_alias(alias: str) -> tuple[str, str]:
    """(localpart, server) of ``#localpart:server``; `MatrixError` ``M_INVALID_PARAM``."""
    match = _ALIAS.match(alias)
    if match is None:
        raise MatrixError(400, "M_INVALID_PARAM", "a room alias is #name:server")
    return match.group(1), match.group(2)


class Directory:
    """Aliases and the public room list of one `Homeserver`."""

    def __init__(self, hs: Homeserver) -> None:
        self.hs = hs
        self.db = hs.store.db

    # aliases -------------------------------------------------------------------------------

    async def create_alias(self, requester: Requester, alias: str, room_id: str) -> None:
        _, server = parse_alias(alias)
        if server != self.hs.server_name:
            raise MatrixError(400, "M_INVALID_PARAM", "aliases of other servers are theirs")
        membership = await self.hs.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] != "join":
            raise MatrixError(403, "M_FORBIDDEN", "you are not joined to that room")
        now = self.hs.now_ms()

        def fn(tx: Tx) -> None:
            if tx.one("SELECT 1 FROM room_aliases WHERE alias = ?", (alias,)) is not None:
                raise MatrixError(409, "M_UNKNOWN", "that alias exists already")
            (count,) = tx.one(
                "SELECT count(*) FROM room_aliases WHERE room_id = ?", (room_id,)
            ) or (0,)
            if count >= MAX_ALIASES_PER_ROOM:
                raise MatrixError(400, "M_LIMIT_EXCEEDED", "that room has too many aliases")
            tx.run(
                "INSERT INTO room_aliases (alias, room_id, creator, created_ts) "
                "VALUES (?, ?, ?, ?)",
                (alias, room_id, requester.user_id, now),
            )

        await self.db.run(fn, write=True)

    async def resolve(self, alias: str) -> tuple[str, list[str]]:
        """(room ID, servers to join through); ``M_NOT_FOUND`` for an unknown alias."""
        _, server = parse_alias(alias)
        if server != self.hs.server_name:
            ask = self.hs.remote_alias
            if ask is None:
                raise MatrixError(404, "M_NOT_FOUND", "aliases of other servers are not asked")
            try:
                answer = await ask(server, alias)
            except Exception:
                raise MatrixError(404, "M_NOT_FOUND", f"{server} does not resolve it") from None
            if not isinstance(answer, dict):
                answer = {}
            room_id, servers = answer.get("room_id"), answer.get("servers", [])
            if not isinstance(room_id, str) or not isinstance(servers, list):
                raise MatrixError(404, "M_NOT_FOUND", f"{server} gave no room for that alias")
            return room_id, [s for s in servers if isinstance(s, str)][:20] or [server]
        row = await self.db.run(
            lambda tx: tx.one("SELECT room_id FROM room_aliases WHERE alias = ?", (alias,))
        )
        if row is None:
            raise MatrixError(404, "M_NOT_FOUND", "no room has that alias")
        room_id = str(row[0])
        members = await self.hs.store.room_members(room_id)
        servers = sorted({m.split(":", 1)[1] for m in members if ":" in m} | {self.hs.server_name})
        return room_id, servers

    async def local_alias(self, alias: str) -> dict[str, Any]:
        """The federation answer for an alias of this server."""
        _, server = parse_alias(alias)
        if server != self.hs.server_name:
            raise MatrixError(404, "M_NOT_FOUND", "not an alias of this server")
        room_id, servers = await self.resolve(alias)
        return {"room_id": room_id, "servers": servers}

    async def delete_alias(self, requester: Requester, alias: str) -> None:
        row = await self.db.run(
            lambda tx: tx.one("SELECT room_id, creator FROM room_aliases WHERE alias = ?", (alias,))
        )
        if row is None:
            raise MatrixError(404, "M_NOT_FOUND", "no room has that alias")
        room_id, creator = str(row[0]), str(row[1])
        if creator != requester.user_id and not await self._may_manage(requester, room_id):
            raise MatrixError(403, "M_FORBIDDEN", "only its creator or a room moderator")
        await self.db.run(
            lambda tx: tx.run("DELETE FROM room_aliases WHERE alias = ?", (alias,)), write=True
        )

    async def room_aliases(self, requester: Requester, room_id: str) -> list[str]:
        membership = await self.hs.store.membership(room_id, requester.user_id)
        if membership is None or membership[0] != "join":
            raise MatrixError(403, "M_FORBIDDEN", "you are not joined to that room")
        rows = await self.db.run(
            lambda tx: tx.query(
                "SELECT alias FROM room_aliases WHERE room_id = ? ORDER BY alias", (room_id,)
            )
        )
        return [str(r[0]) for r in rows]

    async def _may_manage(self, requester: Requester, room_id: str) -> bool:
        """Joined, with the power to send ``m.room.canonical_alias``."""
        state = await self.hs.store.current_state(room_id)
        if auth.membership_of(state, requester.user_id) != "join":
            return False
        levels = auth.power_levels(state)
        needed = auth.event_level(levels, "m.room.canonical_alias", is_state=True)
        return auth.user_level(levels, requester.user_id) >= needed

    # the public room list ------------------------------------------------------------------

    async def visibility(self, room_id: str) -> str:
        if not await self.hs.store.room_exists(room_id):
            raise MatrixError(404, "M_NOT_FOUND", "no such room")
        row = await self.db.run(
            lambda tx: tx.one("SELECT 1 FROM room_directory WHERE room_id = ?", (room_id,))
        )
        return "public" if row is not None else "private"

    async def set_visibility(self, requester: Requester, room_id: str, visibility: Any) -> None:
        if visibility not in ("public", "private"):
            raise MatrixError(400, "M_INVALID_PARAM", "visibility is public or private")
        if not await self._may_manage(requester, room_id):
            raise MatrixError(403, "M_FORBIDDEN", "only a room moderator lists a room")
        await self.list_room(room_id, visibility == "public")

    async def list_room(self, room_id: str, listed: bool) -> None:
        now = self.hs.now_ms()

        def fn(tx: Tx) -> None:
            tx.run("DELETE FROM room_directory WHERE room_id = ?", (room_id,))
            if listed:
                tx.run(
                    "INSERT INTO room_directory (room_id, added_ts) VALUES (?, ?)", (room_id, now)
                )

        await self.db.run(fn, write=True)

    async def public_rooms(self, limit: Any, since: Any, search: Any) -> dict[str, Any]:
        if limit is None:
            limit = MAX_PUBLIC_ROOMS_PAGE
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise MatrixError(400, "M_INVALID_PARAM", "limit is a positive integer")
        limit = min(limit, MAX_PUBLIC_ROOMS_PAGE)
        start = 0
        if since is not None:
            if not isinstance(since, str) or not since.isdigit() or len(since) > 9:
                raise MatrixError(400, "M_INVALID_PARAM", "unknown since token")
            start = int(since)
        term = search.lower() if isinstance(search, str) and search else None
        rooms = []
        for room_id, state in await self.hs.store.listed_rooms_state():
            entry = _entry(room_id, state)
            if term is not None and not any(
                term in str(entry.get(k, "")).lower() for k in ("name", "topic", "canonical_alias")
            ):
                continue
            rooms.append(entry)
        rooms.sort(key=lambda e: (-int(e["num_joined_members"]), str(e["room_id"])))
        page = rooms[start : start + limit]
        out: dict[str, Any] = {"chunk": page, "total_room_count_estimate": len(rooms)}
        if start + limit < len(rooms):
            out["next_batch"] = str(start + limit)
        if start > 0:
            out["prev_batch"] = str(max(0, start - limit))
        return out


def _entry(room_id: str, state: auth.State) -> dict[str, Any]:
    """A room's line in the public list."""
    joined = sum(
        1 for (kind, _), e in state.items()
        if kind == "m.room.member" and e.get("content", {}).get("membership") == "join"
    )  # fmt: skip

    def content(kind: str) -> dict[str, Any]:
        event = state.get((kind, ""))
        value = event.get("content") if event else None
        return value if isinstance(value, dict) else {}

    entry: dict[str, Any] = {
        "room_id": room_id,
        "num_joined_members": joined,
        "world_readable": content("m.room.history_visibility").get("history_visibility")
        == "world_readable",
        "guest_can_join": content("m.room.guest_access").get("guest_access") == "can_join",
        "join_rule": content("m.room.join_rules").get("join_rule", "invite"),
    }
    for key, kind, field in (
        ("name", "m.room.name", "name"),
        ("topic", "m.room.topic", "topic"),
        ("canonical_alias", "m.room.canonical_alias", "alias"),
    ):
        value = content(kind).get(field)
        if isinstance(value, str) and value:
            entry[key] = value
    return entry
