"""Groups across processes: an admin drives a group with ``teia group …`` commands (each its
own process) while two members run in this process; the admin's profile, offline between
commands, gets the members' group texts through the store (``teia inbox --wait``)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from teia.peer import Peer

from .conftest import TIMEOUT, introduce, make_profile, online
from .infra import store_nodes
from .test_cli import teia


async def run(*args: str, check: bool = True) -> dict[str, object]:
    result = await anyio.to_thread.run_sync(lambda: teia(*args, check=check))
    lines = result.stdout.splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


async def receive(peer: Peer, conversation: str, count: int) -> list[str]:
    got: list[str] = []
    async for message in peer.messages(since_seq=0):
        if message.conversation == conversation:
            got.append(message.text)
            if len(got) == count:
                break
    return got


@pytest.mark.anyio
async def test_group_driven_from_cli_processes(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 4):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            admin = str(make_profile(tmp_path / "admin", **settings))
            a_dir = make_profile(tmp_path / "alice", **settings)
            b_dir = make_profile(tmp_path / "bob", **settings)
            async with online(a_dir) as alice, online(b_dir) as bob:
                for name, peer in (("alice", alice), ("bob", bob)):
                    await run(
                        "contacts", "add", name, str(peer.peer_id),
                        "--addr", str(peer.addrs[0]), "--profile", admin,
                    )  # fmt: skip
                created = await run(
                    "group", "create", "team", "alice", "bob", "--json", "--profile", admin
                )
                assert created["settled"] is True
                assert created["version"] == 0
                group_id = str(created["group_id"])
                for member in (alice, bob):
                    info = await member.groups.wait_version(group_id, 0)
                    assert info.name == "team"
                    assert len(info.admins) == 1
                    assert info.admins[0] != member.peer_id
                conversation = f"group:{group_id}"

                sent = await run(
                    "group", "send", group_id, "hello from a terminal", "--json",
                    "--profile", admin,
                )  # fmt: skip
                assert sent["settled"] is True
                assert sent["members"] == 2
                for member in (alice, bob):
                    assert await receive(member, conversation, 1) == ["hello from a terminal"]

                # The members answer while the admin's profile is offline: stored for it.
                await alice.groups.send(group_id, "alice answers")
                await bob.groups.send(group_id, "bob answers")
                await alice.groups.wait_delivered()
                await bob.groups.wait_delivered()
                await run("inbox", "--wait", "2", "--profile", admin)
                history = await anyio.to_thread.run_sync(
                    lambda: teia("group", "history", group_id, "--json", "--profile", admin)
                )
                texts = sorted(json.loads(line)["text"] for line in history.stdout.splitlines())
                assert texts == ["alice answers", "bob answers", "hello from a terminal"]

                renamed = await run(
                    "group", "rename", group_id, "the team", "--json", "--profile", admin
                )
                assert renamed["version"] == 1
                assert (await bob.groups.wait_version(group_id, 1)).name == "the team"
                removed = await run(
                    "group", "remove", group_id, "bob", "--json", "--profile", admin
                )
                assert removed["members"] == [*removed["admins"], str(alice.peer_id)]  # type: ignore[misc]
                left = await bob.groups.wait_version(group_id, 2)
                assert not left.joined
                await alice.groups.wait_version(group_id, 2)
                listing = await anyio.to_thread.run_sync(
                    lambda: teia("group", "list", "--json", "--profile", admin)
                )
                listed = [json.loads(line) for line in listing.stdout.splitlines()]
                assert [(g["group_id"], g["version"], g["name"]) for g in listed] == [
                    (group_id, 2, "the team")
                ]
                await run("group", "send", group_id, "bob is gone", "--profile", admin)
                unknown = await anyio.to_thread.run_sync(
                    lambda: teia("group", "send", "00" * 16, "x", "--profile", admin, check=False)
                )
                assert unknown.returncode == 1
                assert "no group" in unknown.stderr
                assert await receive(alice, conversation, 3) == [
                    "hello from a terminal",
                    "bob answers",
                    "bob is gone",
                ]
                assert "bob is gone" not in [r.text for r in await bob.groups.history(group_id)]


@pytest.mark.anyio
async def test_a_member_leaves_from_the_command_line(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        member_dir = make_profile(tmp_path / "member")
        async with online(make_profile(tmp_path / "admin")) as admin:
            async with online(member_dir) as member:
                await introduce(admin, member)
                await introduce(member, admin)
                group = await admin.groups.create("team", [member.peer_id])
                await member.groups.wait_version(group, 0)
                member_id = member.peer_id
            left = await run("group", "leave", group.group_id, "--json", "--profile",
                             str(member_dir))  # fmt: skip
            assert left["joined"] is False
            assert left["settled"] is True
            after = await admin.groups.wait_version(group, 1)
            assert after.members == (admin.peer_id,)
            assert member_id not in after.members
