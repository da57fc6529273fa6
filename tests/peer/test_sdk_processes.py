"""The SDK across processes: the example echo bot runs in a subprocess (trio, then asyncio),
a peer in this process talks to it over loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import teia
from teia.identity import Multiaddr

from .conftest import PASSPHRASE, TIMEOUT, make_profile, online

ROOT = Path(__file__).resolve().parents[2]


def test_peer_is_exported_lazily() -> None:
    from teia.peer import Peer

    assert teia.Peer is Peer


@pytest.mark.parametrize("bot_backend", ["trio", "asyncio"])
@pytest.mark.anyio
async def test_echo_bot_answers_from_another_process(tmp_path: Path, bot_backend: str) -> None:
    bot_dir, me_dir = make_profile(tmp_path / "bot"), make_profile(tmp_path / "me")
    command = [
        sys.executable,
        str(ROOT / "examples" / "echo_bot.py"),
        "--profile",
        str(bot_dir),
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--limit",
        "3",
    ]
    if bot_backend == "asyncio":
        command.append("--asyncio")
    env = {**os.environ, "TEIA_PASSPHRASE": PASSPHRASE}
    with anyio.fail_after(TIMEOUT):
        async with await anyio.open_process(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as bot:
            assert bot.stdout is not None
            addrs: list[str] = []
            buffer = b""
            while b"ready\n" not in buffer:
                buffer += await bot.stdout.receive()
            for line in buffer.decode().splitlines():
                if line.startswith("listening "):
                    addrs.append(line.split(" ", 1)[1])
            bot_id = Multiaddr(addrs[0]).peer_id
            assert bot_id is not None
            async with online(me_dir) as me:
                await me.add_contact(bot_id, "bot", addrs)
                for text in ("one", "two", "three"):
                    await me.send("bot", text)
                answers = []
                async for message in me.messages():
                    assert message.sender == bot_id
                    answers.append(message.text)
                    if len(answers) == 3:
                        break
                assert answers == ["echo: one", "echo: two", "echo: three"]
                assert await bot.wait() == 0
