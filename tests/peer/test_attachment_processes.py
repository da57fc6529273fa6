"""Attachments across processes: ``teia file send`` in its own process (online there, and
queued for the process that has the profile online), the recipient in this one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from teia.errors import AttachmentError
from teia.host.streams import NegotiatedStream
from teia.peer import Profile
from teia.peer.attachments import PROTOCOL, TransferCompleted, TransferOffered

from .conftest import PASSPHRASE, TIMEOUT, introduce, make_profile, online
from .infra import store_nodes
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
                assert report["state"] == "queued"
                while True:
                    event = await events.receive()
                    if isinstance(event, TransferCompleted):
                        break
            assert event.transfer.file_id == report["file_id"]
            assert event.transfer.saved_as is not None
            assert event.transfer.saved_as.read_bytes() == data
            await alice.attachments.wait_complete(report["file_id"])


@pytest.mark.anyio
async def test_teia_file_cancel_from_another_process(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    source = tmp_path / "draft.pdf"
    source.write_bytes(os.urandom(300 * 1024))
    with anyio.fail_after(TIMEOUT * 2):
        async with online(b_dir) as bob, online(a_dir) as alice:
            await introduce(alice, bob)
            await introduce(bob, alice)
            # Bob never gets to pull it: Alice's server refuses to answer for now.
            alice.host.set_handler(PROTOCOL, _refuse)
            async with bob.attachments.events() as events:
                file_id = await alice.attachments.send_file(bob.peer_id, source)
                assert isinstance(await events.receive(), TransferOffered)
        # Alice's profile is free again: another process calls the transfer off. Bob is
        # offline and there is no store, so the notice waits in the outbox (exit 3).
        cancelled = await anyio.to_thread.run_sync(
            lambda: teia("file", "cancel", file_id, "--json", "--timeout", "1",
                         "--profile", str(a_dir), check=False)
        )  # fmt: skip
        assert cancelled.returncode == 3, cancelled.stderr
        assert json.loads(cancelled.stdout)["state"] == "cancelled"
        assert not (a_dir / "attachments" / "out" / f"{file_id}.enc").exists()
        # Both online again: the notice arrives and Bob lets go too.
        async with online(b_dir) as bob, online(a_dir) as alice:
            await introduce(alice, bob)
            with pytest.raises(AttachmentError, match="cancelled"):
                await bob.attachments.wait_complete(file_id)
            assert not (b_dir / "attachments" / "in" / f"{file_id}.part").exists()


async def _refuse(stream: NegotiatedStream) -> None:
    await stream.aclose()


@pytest.mark.anyio
async def test_a_queued_file_for_an_absent_recipient_goes_through_the_store(
    tmp_path: Path,
) -> None:
    source = tmp_path / "minutes.txt"
    data = os.urandom(200_000)
    source.write_bytes(data)
    with anyio.fail_after(TIMEOUT * 3):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            a_dir = make_profile(tmp_path / "a", **settings)
            b_dir = make_profile(tmp_path / "b", **settings)
            async with online(b_dir) as bob:
                bob_addrs = [str(a) for a in bob.addrs]
                bob_id = bob.peer_id
            async with online(a_dir) as alice:
                await alice.add_contact(bob_id, "bob", bob_addrs)  # Bob is gone by now
                sent = await anyio.to_thread.run_sync(
                    lambda: teia(
                        "file", "send", "bob", str(source), "--json", "--profile", str(a_dir)
                    )
                )
                file_id = json.loads(sent.stdout)["file_id"]
                # The running peer takes it over (it scans for what other processes queued)
                # and, Bob being away, pushes the chunks towards his store inbox.
                await alice.attachments.adopt_queued()
                pushed = await alice.attachments.wait_state(file_id, "pushed")
                assert pushed.state == "pushed"
                await alice.wait_delivered(alice.attachments.push_notices[file_id])
            async with online(b_dir) as bob:
                got = await bob.attachments.wait_complete(file_id)
                assert got.saved_as is not None
                assert got.saved_as.read_bytes() == data
                assert got.path == "stored"
