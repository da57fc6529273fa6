"""More across separate processes: ``teia chat`` interactively, and the stored path (sender
and recipient are CLI processes, never online together; store nodes run in this process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from teia.peer import Profile

from .conftest import PASSPHRASE, TIMEOUT, make_profile, online
from .infra import store_nodes
from .test_cli import ENV, teia
from .test_direct import receive


async def read_until(stream: TextReceiveStream, marker: str, seen: list[str]) -> None:
    while marker not in "".join(seen):
        seen.append(await stream.receive())


@pytest.mark.anyio
async def test_teia_chat_shows_delivery_and_answers(tmp_path: Path) -> None:
    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT * 2):
        async with online(b_dir) as bob:
            # Alice's contact for Bob, written while no process has her profile online.
            with Profile.open(a_dir, PASSPHRASE) as profile:
                alice_id = profile.identity.peer_id
                profile.db.upsert_contact(
                    str(bob.peer_id), bob.peer_id.public_key or b"", name="bob",
                    addrs=[str(a) for a in bob.addrs],
                )  # fmt: skip
            chat = await anyio.open_process(
                [sys.executable, "-m", "teia", "chat", "bob", "--profile", str(a_dir)],
                env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert chat.stdin is not None
            assert chat.stdout is not None
            out = TextReceiveStream(chat.stdout)
            seen: list[str] = []
            await read_until(out, "Ctrl-D to leave", seen)
            await chat.stdin.send(b"hello from a terminal\n")
            await read_until(out, "✓ delivered (direct", seen)
            assert await receive(bob, 1) == ["hello from a terminal"]
            await bob.wait_delivered(await bob.send(alice_id, "hello back"))
            await read_until(out, "bob: hello back", seen)
            await chat.stdin.aclose()
            assert await chat.wait() == 0


@pytest.mark.anyio
async def test_stored_path_between_cli_processes(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 3):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            a_dir = make_profile(tmp_path / "a", **settings)
            b_dir = make_profile(tmp_path / "b", **settings)
            bob_id = teia("id", "--keystore", str(b_dir / "identity.key")).stdout.strip()

            def run(*args: str) -> subprocess.CompletedProcess[str]:
                return teia(*args)

            # Bob goes online once (his bundle reaches the store nodes), then leaves.
            await anyio.to_thread.run_sync(run, "inbox", "--wait", "1", "--profile", str(b_dir))
            # Alice, never connected to Bob, sends; it is stored (W = 2 of 3 nodes).
            sent = await anyio.to_thread.run_sync(
                run, "send", bob_id, "kept for you", "--json", "--profile", str(a_dir)
            )
            report = json.loads(sent.stdout)
            assert report["state"] == "stored"
            assert report["path"] == "stored"
            # Bob comes back later, in another process: fetched, decrypted, kept, acked.
            got = await anyio.to_thread.run_sync(
                run, "inbox", "--wait", "1", "--json", "--profile", str(b_dir)
            )
            rows = [json.loads(line) for line in got.stdout.splitlines()]
            assert [(r["text"], r["path"]) for r in rows] == [("kept for you", "stored")]
            # Once only: a second visit fetches nothing new.
            again = await anyio.to_thread.run_sync(
                run, "inbox", "--wait", "1", "--json", "--profile", str(b_dir)
            )
            assert len(again.stdout.splitlines()) == 1
