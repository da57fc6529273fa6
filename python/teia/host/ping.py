"""libp2p ping (``/ipfs/ping/1.0.0``): 32 random bytes out, the same 32 bytes back.

The dialer may ping repeatedly on one stream; the listener echoes until the stream ends. Spec:
libp2p/specs ``ping/ping.md``.
"""

from __future__ import annotations

import secrets

import anyio
import anyio.abc

from teia.errors import PingFailed
from teia.host.streams import receive_exactly

__all__ = ["PING_PROTOCOL", "PING_SIZE", "ping", "serve_ping"]

PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_SIZE = 32


async def ping(stream: anyio.abc.ByteStream) -> float:
    """Send one ping on a negotiated ping stream; return the round trip in seconds."""
    payload = secrets.token_bytes(PING_SIZE)
    started = anyio.current_time()
    await stream.send(payload)
    echoed = await receive_exactly(stream, PING_SIZE)
    if echoed != payload:
        raise PingFailed("the peer echoed different bytes to our ping")
    return anyio.current_time() - started


async def serve_ping(stream: anyio.abc.ByteStream, *, max_pings: int = 1024) -> None:
    """Echo pings until the peer ends the stream (or ``max_pings`` were answered)."""
    for _ in range(max_pings):
        try:
            payload = await receive_exactly(stream, PING_SIZE)
        except anyio.IncompleteRead:
            return
        await stream.send(payload)
