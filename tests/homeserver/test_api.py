"""The client-server API by raw HTTP: hostile and malformed input gets Matrix errors, stores
nothing, and the server keeps serving; power levels; rate limits; closed registration."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from .conftest import ServerHandle, base_config, serve_in_thread

pytestmark = pytest.mark.anyio
TIMEOUT = 60
C = "/_matrix/client/v3"


class Http:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            method, self.url + path, json=json, data=data, headers=headers
        ) as response:
            body = await response.read()
            try:
                import json as json_module

                return response.status, json_module.loads(body)
            except ValueError:
                return response.status, body

    async def register(self, name: str) -> tuple[str, str]:
        status, body = await self.call(
            "POST",
            C + "/register",
            json={"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}},
        )
        assert status == 200, body
        return body["user_id"], body["access_token"]


@pytest.fixture
async def http(server: ServerHandle) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, server.url)


async def _room_messages(http: Http, token: str, room: str) -> list[str]:
    status, body = await http.call("GET", f"{C}/rooms/{room}/messages?dir=b&limit=100", token=token)
    assert status == 200, body
    return [event["event_id"] for event in body["chunk"]]


async def test_bad_input_gets_matrix_errors_and_stores_nothing(http: Http) -> None:
    with anyio.fail_after(TIMEOUT):
        # The user-interactive flow: no auth → 401 with the flows.
        status, body = await http.call(
            "POST", C + "/register", json={"username": "x", "password": "pw"}
        )
        assert status == 401
        assert body["flows"] == [{"stages": ["m.login.dummy"]}]
        user, token = await http.register("dora")
        status, body = await http.call("POST", C + "/createRoom", token=token, json={})
        room = body["room_id"]
        before = await _room_messages(http, token, room)

        send = f"{C}/rooms/{room}/send/m.room.message/"
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            ("PUT", send + "t1", {"data": b"{not json"}, 400, "M_NOT_JSON"),
            ("PUT", send + "t2", {"data": b"\xff\xfe"}, 400, "M_NOT_JSON"),
            ("PUT", send + "t3", {"data": b"[1, 2]"}, 400, "M_BAD_JSON"),
            ("PUT", send + "t4", {"data": b'{"a": NaN}'}, 400, "M_NOT_JSON"),
            ("PUT", send + "t5", {"data": b'{"a": 1.5}'}, 400, "M_BAD_JSON"),
            (
                "PUT",
                send + "t6",
                {"data": b"{" + b'"a":' * 10 + b"1" + b"}" * 10},
                400,
                "M_NOT_JSON",
            ),
            (
                "PUT",
                send + "t7",
                {"data": b'{"body": "' + b"x" * 70_000 + b'"}'},
                413,
                "M_TOO_LARGE",
            ),
            ("POST", C + "/createRoom", {"data": b'{"invite": "nobody"}'}, 400, "M_BAD_JSON"),
            ("POST", C + "/createRoom", {"data": b'{"preset": "secret"}'}, 400, "M_BAD_JSON"),
            ("POST", f"{C}/rooms/{room}/invite", {"data": b'{"user_id": 7}'}, 400, "M_BAD_JSON"),
            ("GET", f"{C}/rooms/{room}/messages?from=bogus", {}, 400, "M_INVALID_PARAM"),
            ("GET", C + "/sync?since=s1_x", {}, 400, "M_INVALID_PARAM"),
            ("GET", C + "/nonexistent", {}, 404, "M_UNRECOGNIZED"),
        ]
        for method, path, kwargs, want_status, want_code in cases:
            status, body = await http.call(method, path, token=token, **kwargs)
            assert (status, body.get("errcode")) == (want_status, want_code), (path, body)

        # A chunked body over the limit, without Content-Length, is cut off while reading.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"body": "'
            for _ in range(20):
                yield b"y" * 8192
            yield b'"}'

        async with http.session.put(
            http.url + send + "t8", data=chunks(), headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 413
            assert (await response.json())["errcode"] == "M_TOO_LARGE"

        # Tokens: wrong, missing, malformed header; by query parameter works.
        for headers, code in (
            ({"Authorization": "Bearer nope"}, "M_UNKNOWN_TOKEN"),
            ({}, "M_MISSING_TOKEN"),
            ({"Authorization": "Basic abc"}, "M_MISSING_TOKEN"),
        ):
            status, body = await http.call("PUT", send + "t9", json={"body": "x"}, headers=headers)
            assert (status, body["errcode"]) == (401, code)
        status, body = await http.call("GET", f"{C}/account/whoami?access_token=nope")
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        status, body = await http.call("GET", f"{C}/account/whoami?access_token={token}")
        assert (status, body["user_id"]) == (200, user)

        # Nothing was stored, and the server still serves.
        assert await _room_messages(http, token, room) == before
        status, body = await http.call("PUT", send + "ok", token=token, json={"body": "fine"})
        assert status == 200, body
        assert len(await _room_messages(http, token, room)) == len(before) + 1

        # Logout ends the token.
        assert (await http.call("POST", C + "/logout", token=token))[0] == 200
        status, body = await http.call("GET", C + "/account/whoami", token=token)
        assert body["errcode"] == "M_UNKNOWN_TOKEN"
        status, body = await http.call(
            "POST",
            C + "/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "dora"},
                "password": "wrong",
            },
        )
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


async def test_power_levels_govern_moderation(http: Http) -> None:
    with anyio.fail_after(TIMEOUT):
        owner, owner_token = await http.register("owner")
        member, member_token = await http.register("member")
        other, other_token = await http.register("other")
        status, body = await http.call(
            "POST",
            C + "/createRoom",
            token=owner_token,
            json={"preset": "public_chat", "name": "Praça"},
        )
        room = body["room_id"]
        for token in (member_token, other_token):
            status, body = await http.call("POST", f"{C}/join/{room}", token=token)
            assert status == 200, body

        async def state(token: str, kind: str, content: dict[str, Any]) -> tuple[int, Any]:
            return await http.call(
                "PUT", f"{C}/rooms/{room}/state/{kind}", token=token, json=content
            )

        # A member at level 0 may talk but not rename, kick, ban or redact others.
        assert (await state(member_token, "m.room.name", {"name": "mine"}))[0] == 403
        for action in ("kick", "ban"):
            status, body = await http.call(
                "POST", f"{C}/rooms/{room}/{action}", token=member_token, json={"user_id": other}
            )
            assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, body = await http.call(
            "PUT", f"{C}/rooms/{room}/send/m.room.message/a", token=other_token, json={"body": "hi"}
        )
        target = body["event_id"]
        status, body = await http.call(
            "PUT", f"{C}/rooms/{room}/redact/{target}/r1", token=member_token, json={}
        )
        assert status == 403
        # The owner raises the member to moderator; granting above one's own level fails.
        status, levels = await http.call(
            "GET", f"{C}/rooms/{room}/state/m.room.power_levels", token=owner_token
        )
        levels["users"][member] = 50
        assert (await state(owner_token, "m.room.power_levels", levels))[0] == 200
        levels["users"][other] = 100
        assert (await state(member_token, "m.room.power_levels", levels))[0] == 403
        # Now the moderator renames, redacts, kicks; but cannot kick the owner.
        assert (await state(member_token, "m.room.topic", {"topic": "t"}))[0] == 200
        status, body = await http.call(
            "PUT", f"{C}/rooms/{room}/redact/{target}/r2", token=member_token, json={}
        )
        assert status == 200, body
        status, _ = await http.call(
            "POST", f"{C}/rooms/{room}/kick", token=member_token, json={"user_id": owner}
        )
        assert status == 403
        status, _ = await http.call(
            "POST",
            f"{C}/rooms/{room}/ban",
            token=member_token,
            json={"user_id": other, "reason": "spam"},
        )
        assert status == 200
        # The banned user cannot rejoin until unbanned.
        status, body = await http.call("POST", f"{C}/join/{room}", token=other_token)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, _ = await http.call(
            "POST", f"{C}/rooms/{room}/unban", token=member_token, json={"user_id": other}
        )
        assert status == 200
        status, body = await http.call("POST", f"{C}/join/{room}", token=other_token)
        assert status == 200, body


async def test_rate_limits_and_closed_registration(tmp_path: Path) -> None:
    config = base_config(tmp_path, "sqlite", user_rate=1.0, user_burst=5.0, registration_open=False)
    with serve_in_thread(config) as server, anyio.fail_after(TIMEOUT):
        async with aiohttp.ClientSession() as session:
            http = Http(session, server.url)
            status, body = await http.call(
                "POST",
                C + "/register",
                json={"username": "eve", "password": "pw", "auth": {"type": "m.login.dummy"}},
            )
            assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
            token = await server_token(server, "frank")
            codes = []
            for _ in range(8):
                status, body = await http.call("GET", C + "/account/whoami", token=token)
                codes.append(status)
                if status == 429:
                    assert body["errcode"] == "M_LIMIT_EXCEEDED"
                    assert body["retry_after_ms"] > 0
            assert codes[:5] == [200] * 5
            assert 429 in codes


async def server_token(server: ServerHandle, name: str) -> str:
    """An account made directly on the server (registration is closed to clients)."""
    from dataclasses import replace

    hs = server.hs

    async def make() -> str:
        settings = hs.settings
        hs.settings = replace(settings, registration_open=True)
        try:
            session = await hs.register(name, "pw", None, False)
        finally:
            hs.settings = settings
        return str(session["access_token"])

    return str(await anyio.to_thread.run_sync(server.call, make))
