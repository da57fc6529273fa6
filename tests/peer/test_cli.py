"""The CLI across separate processes: ``teia init``, ``contacts``, ``send`` (online, and queued
beside a running daemon), ``inbox``, and ``teia peer run`` with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from .conftest import PASSPHRASE, free_udp_port, make_profile

ENV = {**os.environ, "TEIA_PASSPHRASE": PASSPHRASE}


def teia(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "teia", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


async def scrape(port: int) -> str:
    """The daemon's /metrics page (the exporter closes the connection after it)."""
    chunks: list[bytes] = []
    async with await anyio.connect_tcp("127.0.0.1", port) as http:
        await http.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunks.append(await http.receive())
    return b"".join(chunks).decode()


async def wait_ready(stream: TextReceiveStream, seen: list[str]) -> str:
    buffer = ""
    while True:
        chunk = await stream.receive()
        seen.append(chunk)
        buffer += chunk
        for line in buffer.splitlines():
            if '"event": "ready"' in line:
                return line


@pytest.mark.anyio
async def test_cli_end_to_end_across_processes(tmp_path: Path) -> None:
    a_dir = tmp_path / "alice"
    a_port, b_port = free_udp_port(), free_udp_port()
    # Alice's profile starts from `teia init` (a keystore alone), Bob's from the SDK.
    teia("init", "--keystore", str(a_dir / "identity.key"))
    alice_id = teia("id", "--keystore", str(a_dir / "identity.key")).stdout.strip()
    b_dir = make_profile(tmp_path / "bob", listen=[f"/ip4/127.0.0.1/udp/{b_port}/quic-v1"])
    bob_id = teia("id", "--keystore", str(b_dir / "identity.key")).stdout.strip()
    # An empty listing opens the profile (and writes its config.toml); then pin Alice's port.
    assert teia("contacts", "list", "--profile", str(a_dir)).stdout == ""
    config = (a_dir / "config.toml").read_text()
    (a_dir / "config.toml").write_text(
        config.replace("/udp/0/quic-v1", f"/udp/{a_port}/quic-v1").replace(
            "retry_interval = 5.0", "retry_interval = 0.2"
        )
    )
    b_addr = f"/ip4/127.0.0.1/udp/{b_port}/quic-v1"
    a_addr = f"/ip4/127.0.0.1/udp/{a_port}/quic-v1"
    teia("contacts", "add", "bob", bob_id, "--addr", b_addr, "--profile", str(a_dir))
    teia("contacts", "add", "alice", alice_id, "--addr", a_addr, "--profile", str(b_dir))
    listed = [json.loads(line) for line in teia(
        "contacts", "list", "--json", "--profile", str(a_dir)
    ).stdout.splitlines()]  # fmt: skip
    assert [(c["name"], c["peer_id"], c["trust"]) for c in listed] == [
        ("bob", bob_id, "unverified")
    ]
    shown = json.loads(teia("contacts", "show", "bob", "--json", "--profile", str(a_dir)).stdout)
    theirs = json.loads(teia("contacts", "show", "alice", "--json", "--profile", str(b_dir)).stdout)
    assert shown["safety_number"] == theirs["safety_number"]

    with anyio.fail_after(90):
        daemon = await anyio.open_process(
            [sys.executable, "-m", "teia", "peer", "run", "--profile", str(b_dir),
             "--log-format", "json", "--metrics", "127.0.0.1:0"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        seen: list[str] = []
        try:
            assert daemon.stderr is not None
            ready = json.loads(await wait_ready(TextReceiveStream(daemon.stderr), seen))
            assert ready["peer_id"] == bob_id
            sent = await anyio.to_thread.run_sync(
                lambda: teia("send", "bob", "hello from the CLI", "--json", "--profile", str(a_dir))
            )
            report = json.loads(sent.stdout)
            assert report["state"] == "delivered"
            assert report["path"] == "direct"
            # Counts only in the daemon's metrics, never content.
            metrics = await scrape(ready["metrics_port"])
            assert 'teia_peer_messages{outcome="received"} 1.0' in metrics
            assert 'teia_peer_holepunch{outcome="attempts"} 0.0' in metrics
            assert "from the CLI" not in metrics
            # Bob's history is readable beside his running daemon.
            inbox = await anyio.to_thread.run_sync(
                lambda: teia("inbox", "--json", "--profile", str(b_dir))
            )
            rows = [json.loads(line) for line in inbox.stdout.splitlines()]
            assert [(r["text"], r["peer_id"], r["direction"]) for r in rows] == [
                ("hello from the CLI", alice_id, "in")
            ]
            # Bob answers while his daemon has the profile: the message is queued for it.
            queued = await anyio.to_thread.run_sync(
                lambda: teia(
                    "send", "alice", "queued by the CLI", "--json", "--profile", str(b_dir)
                )
            )
            assert json.loads(queued.stdout)["state"] == "pending"
            # Alice comes online a while; Bob's daemon delivers to her.
            received = await anyio.to_thread.run_sync(
                lambda: teia(
                    "inbox",
                    "--wait",
                    "45",  # returns as soon as the message is in (--count 1)
                    "--count",
                    "1",
                    "--json",
                    "--profile",
                    str(a_dir),
                    "--contact",
                    "bob",
                )
            )
            texts = [json.loads(line)["text"] for line in received.stdout.splitlines()]
            assert texts == ["hello from the CLI", "queued by the CLI"]
            found = await anyio.to_thread.run_sync(
                lambda: teia("inbox", "--search", "queued", "--profile", str(a_dir))
            )
            assert "queued by the CLI" in found.stdout
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = await daemon.wait()
        assert code == 0, "".join(seen)
        # Nothing readable on disk: the texts are sealed in both profiles.
        for directory in (a_dir, b_dir):
            for path in directory.iterdir():
                if path.is_file():
                    assert b"from the CLI" not in path.read_bytes(), path


@pytest.mark.anyio
async def test_teia_retract_online_and_beside_a_running_peer(tmp_path: Path) -> None:
    from teia.peer import Retracted

    from .conftest import TIMEOUT, introduce, online

    a_dir, b_dir = make_profile(tmp_path / "a"), make_profile(tmp_path / "b")
    with anyio.fail_after(TIMEOUT * 2):
        async with online(b_dir) as bob:
            async with online(a_dir) as alice:
                await introduce(alice, bob)
                alice_id = alice.peer_id
                first = await alice.send(bob.peer_id, "primeira")
                second = await alice.send(bob.peer_id, "segunda")
                for message_id in (first, second):
                    await alice.wait_delivered(message_id)
                # Beside the running peer: retracted here, the notice queued for it.
                async with bob.events() as events:
                    queued = await anyio.to_thread.run_sync(
                        lambda: teia("retract", first, "--json", "--profile", str(a_dir))
                    )
                    assert json.loads(queued.stdout)["notice"] == "pending"
                    event = await events.receive()
                    while not isinstance(event, Retracted):
                        event = await events.receive()
                    assert event.message_id == first
            # The profile is free: the command goes online and waits for the notice.
            done = await anyio.to_thread.run_sync(
                lambda: teia("retract", second, "--json", "--profile", str(a_dir))
            )
            assert json.loads(done.stdout)["notice"] == "delivered"
            assert [r.state for r in await bob.history(alice_id)] == [
                "retracted",
                "retracted",
            ]
            bad = await anyio.to_thread.run_sync(
                lambda: teia("retract", "abc", "--profile", str(a_dir), check=False)
            )
            assert bad.returncode != 0
