"""`Broadcast`: events handed to every subscriber without ever blocking the emitter."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["Broadcast"]

T = TypeVar("T")


class Broadcast(Generic[T]):
    """Subscribers each get every event emitted while they listen; one that falls ``buffer``
    events behind loses the newest instead of slowing the emitter down."""

    def __init__(self) -> None:
        self._subscribers: list[MemoryObjectSendStream[T]] = []

    def __bool__(self) -> bool:
        """Whether anyone listens (to skip building events nobody reads)."""
        return bool(self._subscribers)

    @asynccontextmanager
    async def subscribe(self, buffer: int) -> AsyncIterator[anyio.abc.ObjectReceiveStream[T]]:
        """``async with broadcast.subscribe(256) as events: async for event in events:``."""
        send, receive = anyio.create_memory_object_stream[T](buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(send)
            send.close()

    def emit(self, event: T) -> None:
        """Hand ``event`` to every subscriber that has room for it."""
        for subscriber in list(self._subscribers):
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                subscriber.send_nowait(event)

    def close(self) -> None:
        """End every subscription (their loops finish)."""
        for subscriber in self._subscribers:
            subscriber.close()
