"""Attachments across processes: ``teia file send`` in its own process (online there, and
queued for the process that has the profile online), the recipient in this one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from teia.peer import Profile
from teia.peer.attachments import TransferCompleted

from .conftest import PASSPHRASE, TIMEOUT, introduce, make_profile, online
from .test_cli import teia


@pytest.mark.anyio
async def test_teia_file_send_from_another_process(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "slides.odp"
    data = os.urandom(2 * 1024 * 1024 + 5)
    source.write_bytes(data)
    with anyio.fail_after(TIMEOUT * 2):
        async with online(b_dir) as bob:
            with Profile.open(a_dir, PASSPHRASE) as profile:
                alice_id = profile.identity.peer_id
                profile.db.upsert_contact(
                    str(bob.peer_id), bob.peer_id.public_key or b"", name="bob",
                    addrs=[str(a) for a in bob.addrs],
                )  # fmt: skip
            sent = await anyio.to_thread.run_sync(
                lambda: teia("file", "send", "bob", str(source), "--json", "--profile", str(a_dir))
            )
            report = json.loads(sent.stdout)
            assert report["state"] == "complete"
            assert report["direction"] == "out"
            received = await bob.attachments.status(report["file_id"])
            assert received.state == "complete"
            assert received.peer == alice_id
            assert received.saved_as is not None
            assert received.saved_as.read_bytes() == data
            listed = await anyio.to_thread.run_sync(
                lambda: teia("file", "list", "--json", "--profile", str(a_dir))
            )
            (line,) = [json.loads(x) for x in listed.stdout.splitlines()]
            assert line["file_id"] == report["file_id"]
            assert line["state"] == "complete"


@pytest.mark.anyio
async def test_teia_file_send_queues_for_the_running_peer(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "queued.bin"
    data = os.urandom(700_000)
    source.write_bytes(data)
    with anyio.fail_after(TIMEOUT * 2):
        async with online(a_dir) as alice, online(b_dir) as bob:
            await introduce(alice, bob, "bob")
            async with bob.attachments.events() as events:
                # Alice's profile is online here: the command queues, this process delivers.
                sent = await anyio.to_thread.run_sync(
                    lambda: teia(
                        "file", "send", "bob", str(source), "--json", "--profile", str(a_dir)
                    )
                )
                report = json.loads(sent.stdout)
                assert report["state"] == "offered"
                while True:
                    event = await events.receive()
                    if isinstance(event, TransferCompleted):
                        break
            assert event.transfer.file_id == report["file_id"]
            assert event.transfer.saved_as is not None
            assert event.transfer.saved_as.read_bytes() == data
            await alice.attachments.wait_complete(report["file_id"])
