"""`Broadcast`: every subscriber gets what is emitted while it listens; a full one loses the
newest events instead of blocking the emitter; closing ends the subscriptions."""

from __future__ import annotations

import anyio
import pytest

from teia.peer.broadcast import Broadcast


@pytest.mark.anyio
async def test_fan_out_overflow_and_close() -> None:
    broadcast: Broadcast[int] = Broadcast()
    assert not broadcast
    broadcast.emit(0)  # nobody listens: nothing happens
    async with broadcast.subscribe(2) as slow, broadcast.subscribe(10) as fast:
        assert broadcast
        for event in range(1, 5):
            broadcast.emit(event)  # never blocks, even with `slow` full
        assert [slow.receive_nowait() for _ in range(2)] == [1, 2]
        with pytest.raises(anyio.WouldBlock):
            slow.receive_nowait()
        assert [fast.receive_nowait() for _ in range(4)] == [1, 2, 3, 4]
        broadcast.close()
        with pytest.raises(anyio.EndOfStream):
            await fast.receive()
    assert not broadcast
