"""An echo bot: a program that is a teia peer, answering every message it receives.

Run it on a profile (``teia init --keystore DIR/identity.key`` creates one)::

    TEIA_PASSPHRASE=… python examples/echo_bot.py --profile DIR \\
        --listen /ip4/127.0.0.1/udp/4001/quic-v1

It prints its address, then answers "echo: <text>" to whoever writes to it. It works the
same under asyncio (``--asyncio``): the SDK is written against anyio.
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

import teia


async def serve(profile: str, passphrase: str, listen: list[str] | None, limit: int) -> None:
    async with teia.Peer.open(profile, passphrase=passphrase, listen=listen) as peer:
        for addr in peer.addrs:
            print(f"listening {addr}", flush=True)
        print("ready", flush=True)
        answers: list[str] = []
        async for message in peer.messages():
            answers.append(await peer.send(message.sender, f"echo: {message.text}"))
            if limit and len(answers) >= limit:
                break
        # Let the answers leave before closing (they would wait in the outbox otherwise).
        with anyio.move_on_after(10):
            for message_id in answers:
                await peer.wait_delivered(message_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="profile directory")
    parser.add_argument("--listen", action="append", help="listen multiaddr (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="stop after N answers (0: never)")
    parser.add_argument("--asyncio", action="store_true", help="run on asyncio instead of trio")
    args = parser.parse_args()
    passphrase = os.environ.get("TEIA_PASSPHRASE")
    if not passphrase:
        print("set TEIA_PASSPHRASE to the profile's passphrase", file=sys.stderr)
        return 2
    backend = "asyncio" if args.asyncio else "trio"
    try:
        anyio.run(serve, args.profile, passphrase, args.listen, args.limit, backend=backend)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
