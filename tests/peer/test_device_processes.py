"""Multi-device across processes: a new device links with ``teia device link CODE`` in its own
process (the primary and the other account run in this process), gets the history, and — offline
afterwards — still gets the other account's next message through the store, fanned out to it
(``teia inbox --wait`` in another process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from teia.identity import Identity

from .conftest import TIMEOUT, introduce, make_profile, online
from .infra import discovery_node, store_nodes
from .test_cli import ENV, teia


async def run(*args: str) -> list[dict[str, object]]:
    result = await anyio.to_thread.run_sync(lambda: teia(*args))
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.anyio
async def test_linking_in_another_process_then_fan_out_through_the_store(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 4):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            a1_dir = make_profile(tmp_path / "a1", **settings)
            b1_dir = make_profile(tmp_path / "b1", **settings)
            a2_dir = str(make_profile(tmp_path / "a2", **settings))
            async with online(a1_dir) as a1, online(b1_dir) as b1:
                alice = await a1.devices.create_account()
                bob = await b1.devices.create_account()
                await introduce(a1, b1)
                await introduce(b1, a1)
                await a1.devices.introduce(b1.peer_id)
                await a1.devices.wait_account(bob)
                await b1.devices.wait_account(alice)
                await a1.devices.wait_sent(await a1.devices.send(bob, "before the link"))

                code = a1.devices.link_code()
                (linked,) = await run("device", "link", code, "--json", "--profile", a2_dir)
                assert linked["account"] == str(alice)
                assert linked["history"] == 1
                assert linked["settled"] is True
                assert len(linked["devices"]) == 2  # type: ignore[arg-type]
                a2_id = str(linked["this_device"])
                (listed,) = await run("device", "list", "--json", "--profile", a2_dir)
                assert listed["account"] == str(alice)
                assert listed["primary"] is False
                assert a2_id in listed["devices"]  # type: ignore[operator]

                # Bob's next message reaches the new device too, while it is offline.
                await b1.devices.wait_account(alice, version=2)
                copies = await b1.devices.wait_sent(await b1.devices.send(alice, "after"))
                assert {str(d): row.state for d, row in copies.items()} == {
                    str(a1.peer_id): "delivered",
                    a2_id: "stored",
                }
                rows = await run(
                    "inbox", "--wait", "2", "--contact", str(bob), "--json", "--profile", a2_dir
                )
                assert [(r["direction"], r["text"]) for r in rows] == [
                    ("out", "before the link"),
                    ("in", "after"),
                ]
                assert rows[1]["path"] == "stored"
                assert rows[1]["peer_id"] == str(bob)


@pytest.mark.anyio
async def test_code_shown_by_one_process_links_a_device_in_another(tmp_path: Path) -> None:
    a1_dir = str(make_profile(tmp_path / "a1"))
    a2_dir = make_profile(tmp_path / "a2")
    with anyio.fail_after(TIMEOUT * 2):
        (created,) = await run("device", "create", "--json", "--profile", a1_dir)
        assert created["settled"] is True
        assert created["version"] == 1
        shower = await anyio.open_process(
            [sys.executable, "-m", "teia", "device", "code", "--json", "--timeout", "30",
             "--profile", a1_dir],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        async with shower:
            assert shower.stdout is not None
            out = TextReceiveStream(shower.stdout)
            seen = ""
            while "\n" not in seen:
                seen += await out.receive()
            code = json.loads(seen.splitlines()[0])["code"]
            async with online(a2_dir) as a2:
                granted = await a2.devices.link(code)
                assert str(granted.account) == created["account"]
                assert await a2.devices.wait_history() == 0
                async for chunk in out:
                    seen += chunk
                assert await shower.wait() == 0
        report = json.loads(seen.splitlines()[-1])
        assert report["linked"] == str(a2.peer_id)
        assert report["version"] == 2


@pytest.mark.anyio
async def test_an_account_made_in_one_process_is_found_and_reached_from_others(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT * 4):
        async with discovery_node() as bootstrap, store_nodes(tmp_path) as stores:
            settings = {"bootstrap": [bootstrap], "store_nodes": stores}
            a1_dir = str(make_profile(tmp_path / "a1", **settings))
            b1_dir = make_profile(tmp_path / "b1", **settings)
            c1_dir = str(make_profile(tmp_path / "c1", **settings))
            # `create` returns once the list is in the DHT ("settled").
            (created,) = await run("device", "create", "--json", "--profile", a1_dir)
            assert created["settled"] is True
            alice = str(created["account"])
            (found,) = await run("device", "lookup", alice, "--json", "--profile", c1_dir)
            assert found["found"] is True
            assert found["version"] == 1
            assert found["devices"] == [created["this_device"]]
            # An account nobody published: exit status 1.
            stranger = str(Identity.generate().peer_id)
            missing = await anyio.to_thread.run_sync(
                lambda: teia("device", "lookup", stranger, "--json", "--timeout", "10",
                             "--profile", c1_dir, check=False)
            )  # fmt: skip
            assert missing.returncode == 1
            assert json.loads(missing.stdout)["found"] is False
            # Bob, in this process, writes to the account by its ID alone while its only
            # device is offline; back online in a process of its own, it gets the message.
            async with online(b1_dir) as b1:
                bob = await b1.devices.create_account()
                message_id = await b1.devices.send(alice, "to your account")
                copies = await b1.devices.wait_sent(message_id)
                assert [row.state for row in copies.values()] == ["stored"]
            rows = await run(
                "inbox", "--wait", "1", "--contact", str(bob), "--json", "--profile", a1_dir
            )
            assert [(r["direction"], r["text"]) for r in rows] == [("in", "to your account")]
