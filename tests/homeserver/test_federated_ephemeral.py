"""Typing notices and read receipts across two homeserver-lite instances (m.typing and m.receipt
EDUs): a matrix-nio user on one server sees the other server's user type and read; an EDU about
a user of another server, or about a room the user is not in, is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from nio import (
    JoinResponse,
    ReceiptEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
    TypingNoticeEvent,
)

from teia.errors import MatrixError

from .conftest import ServerHandle, nio_client, two_servers

pytestmark = pytest.mark.anyio
TIMEOUT = 90


async def _until(client: Any, room_id: str, since: str, found: Any) -> str:
    """Long-poll ``client``'s sync until an ephemeral event of the room satisfies ``found``."""
    for _ in range(20):
        got = await client.sync(timeout=10_000, since=since)
        assert isinstance(got, SyncResponse), got
        since = got.next_batch
        room = got.rooms.join.get(room_id)
        if room is not None and any(found(e) for e in room.ephemeral):
            return since
    raise AssertionError("never arrived")


async def test_typing_and_receipts_cross_servers(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT), two_servers(tmp_path) as (server_a, server_b):
        async with (
            nio_client(server_a.url, "alice") as alice,
            nio_client(server_b.url, "bob") as bob,
        ):
            assert isinstance(await alice.register("alice", "pw"), RegisterResponse)
            assert isinstance(await bob.register("bob", "pw"), RegisterResponse)
            created = await alice.room_create(name="sala", preset=RoomPreset.public_chat)
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            assert isinstance(await bob.join(room_id), JoinResponse)
            since = (await alice.sync()).next_batch
            await bob.room_typing(room_id, typing_state=True, timeout=20_000)
            since = await _until(
                alice,
                room_id,
                since,
                lambda e: isinstance(e, TypingNoticeEvent) and bob.user_id in e.users,
            )
            sent = await alice.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "lido?"}
            )
            assert isinstance(sent, RoomSendResponse), sent
            for _ in range(20):  # until Bob's server has the message
                got = await bob.sync(timeout=10_000)
                assert isinstance(got, SyncResponse)
                room = got.rooms.join.get(room_id)
                if room and any(getattr(e, "event_id", None) == sent.event_id
                                for e in room.timeline.events):  # fmt: skip
                    break
            await bob.room_read_markers(room_id, sent.event_id, sent.event_id)
            await _until(
                alice,
                room_id,
                since,
                lambda e: (
                    isinstance(e, ReceiptEvent)
                    and any(
                        r.user_id == bob.user_id and r.event_id == sent.event_id for r in e.receipts
                    )
                ),
            )
            await _forged_edus_are_refused(server_a, room_id, server_b.server_name)


async def _forged_edus_are_refused(server: ServerHandle, room_id: str, other: str) -> None:
    hs = server.hs

    async def call(fn: Any, *args: Any) -> None:
        await anyio.to_thread.run_sync(server.call, fn, *args)

    # A user of another server than the one sending; a user not in the room.
    with pytest.raises(MatrixError, match="not a user of the sending server"):
        await call(
            hs.remote_typing,
            "evil.example",
            {"room_id": room_id, "user_id": f"@bob:{other}", "typing": True},
        )
    with pytest.raises(MatrixError, match="not joined"):
        await call(
            hs.remote_typing,
            other,
            {"room_id": room_id, "user_id": f"@carol:{other}", "typing": True},
        )
    # A forged receipt is skipped, not stored.
    before = await anyio.to_thread.run_sync(server.call, _receipts, hs.store, room_id)
    await call(
        hs.remote_receipts,
        "evil.example",
        {room_id: {"m.read": {f"@bob:{other}": {"event_ids": ["$x"], "data": {}}}}},
    )
    after = await anyio.to_thread.run_sync(server.call, _receipts, hs.store, room_id)
    assert after == before


async def _receipts(store: Any, room_id: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = await store.db.run(
        lambda tx: tx.query(
            "SELECT user_id, event_id FROM receipts WHERE room_id = ? ORDER BY user_id", (room_id,)
        )
    )
    return rows
