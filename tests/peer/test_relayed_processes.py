"""The relayed path across processes: the example echo bot runs in a subprocess, a peer in this
process reaches it only through a relay (no direct dials), and the answer comes back the same way.

The relay listens on its own loopback address (127.0.0.2) so that each peer's record of the path
means something: a connection from the relay's address is relayed, one from 127.0.0.1 is not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from teia.identity import Multiaddr
from teia.peer import Profile

from .conftest import PASSPHRASE, make_profile, online
from .infra import relay_server

ROOT = Path(__file__).resolve().parents[2]


async def bot_addrs(bot: anyio.abc.Process) -> list[str]:
    """The addresses the echo bot prints before ``ready``."""
    assert bot.stdout is not None
    buffer = b""
    while b"ready\n" not in buffer:
        buffer += await bot.stdout.receive()
    return [
        line.split(" ", 1)[1]
        for line in buffer.decode().splitlines()
        if line.startswith("listening ")
    ]


async def stderr_of(bot: anyio.abc.Process) -> str:
    """What the bot wrote to stderr (for a failure message), once it has exited."""
    assert bot.stderr is not None
    chunks: list[bytes] = []
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            chunks.append(await bot.stderr.receive())
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.anyio
async def test_echo_bot_answers_through_the_relay_from_another_process(tmp_path: Path) -> None:
    with anyio.fail_after(40):
        async with relay_server(tmp_path) as (server, table):
            settings = {"relays": [table], "direct": False}
            bot_dir = make_profile(tmp_path / "bot", **settings)
            me_dir = make_profile(tmp_path / "me", **settings)
            command = [
                sys.executable,
                str(ROOT / "examples" / "echo_bot.py"),
                "--profile",
                str(bot_dir),
                "--listen",
                "/ip4/127.0.0.1/udp/0/quic-v1",
                "--limit",
                "1",
            ]
            env = {**os.environ, "TEIA_PASSPHRASE": PASSPHRASE}
            bot = await anyio.open_process(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                # Only the bot's own socket: reaching it is then up to our relay allocation.
                addrs = [a for a in await bot_addrs(bot) if "/ip4/127.0.0.1/" in a]
                bot_id = Multiaddr(addrs[0]).peer_id
                assert bot_id is not None
                async with online(me_dir) as me:
                    with anyio.fail_after(10):
                        await me.host.wait_relayed_addrs()
                    before = server.data_plane.stats()
                    await me.add_contact(bot_id, "bot", addrs)
                    row = await me.wait_delivered(await me.send("bot", "over the relay"))
                    assert row.path == "relayed"
                    async for message in me.messages():
                        assert message.sender == bot_id
                        assert message.text == "echo: over the relay"
                        assert message.path == "relayed"
                        break
                    assert await bot.wait() == 0, await stderr_of(bot)
                    after = server.data_plane.stats()
                    me_id = str(me.peer_id)
                    assert [m.path for m in await me.history(bot_id)] == ["relayed", "relayed"]
            finally:
                with anyio.CancelScope(shield=True):
                    if bot.returncode is None:
                        bot.kill()
                    await bot.wait()
                    await bot.aclose()
            # The bot recorded the same path for what it received and what it answered.
            with Profile.open(bot_dir, PASSPHRASE) as profile:
                rows = profile.db.history(me_id)
            assert [(r.outgoing, r.text, r.path) for r in rows] == [
                (False, "over the relay", "relayed"),
                (True, "echo: over the relay", "relayed"),
            ]
            # Both ways went through the relay's data plane.
            for counter in ("packets_to_peers", "packets_to_clients"):
                assert after[counter] > before[counter], (counter, before, after)
