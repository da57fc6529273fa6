"""The peer's database thread (`teia.peer.peer._DatabaseThread`): calls run one at a time, in
the order they were queued, on one thread that is not the event loop's; outcomes reach the
caller; a cancelled call that has not started never runs, a started one is waited for; `close`
stops the thread after what is queued; asyncio works as well as trio. And the message IDs the
peer draws from a buffered read of the system's CSPRNG."""

from __future__ import annotations

import threading
import time
from functools import partial

import anyio
import pytest

from teia.peer.peer import _DatabaseThread, _MessageIds

pytestmark = pytest.mark.anyio


async def test_calls_run_in_order_on_one_thread_that_is_not_the_loop() -> None:
    database = _DatabaseThread()
    seen: list[tuple[int, int]] = []

    def call(index: int) -> int:
        seen.append((index, threading.get_ident()))
        return index * 10

    calls = [database.submit(partial(call, i)) for i in range(50)]
    for index, queued in enumerate(calls):
        await database.wait(queued)
        assert queued.finished
        assert queued.result == index * 10
        assert queued.error is None
    assert [i for i, _ in seen] == list(range(50))
    threads = {t for _, t in seen}
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    assert await database.run(lambda: "last") == "last"
    await database.close()


async def test_an_error_reaches_its_caller_and_the_next_calls_still_run() -> None:
    database = _DatabaseThread()

    def fail() -> None:
        raise ValueError("broken call")

    failing = database.submit(fail)
    after = database.submit(lambda: "fine")
    with pytest.raises(ValueError, match="broken call"):
        await database.run(fail)
    await database.wait(failing)
    assert isinstance(failing.error, ValueError)
    await database.wait(after)
    assert after.result == "fine"
    await database.close()


async def test_cancelled_before_it_starts_a_call_never_runs() -> None:
    database = _DatabaseThread()
    release = threading.Event()
    token_set = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        token_set.set()
        release.wait(10)

    blocking = database.submit(blocker)
    await anyio.to_thread.run_sync(token_set.wait, 10)  # the thread is inside blocker now
    withdrawn = database.submit(lambda: ran.append("withdrawn"))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await database.wait(withdrawn)
    assert scope.cancelled_caught
    release.set()
    await database.wait(blocking)

    def after() -> str:
        ran.append("after")
        return "done"

    assert await database.run(after) == "done"
    assert ran == ["after"]
    await database.close()


async def test_cancelled_while_running_the_caller_waits_for_the_call() -> None:
    database = _DatabaseThread()
    inside = threading.Event()
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> str:
        inside.set()
        release.wait(10)
        finished.append(True)
        return "slow"

    call = database.submit(slow)
    await anyio.to_thread.run_sync(inside.wait, 10)

    async def release_once_the_waiter_is_parked() -> None:
        await anyio.lowlevel.checkpoint()
        release.set()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            scope.cancel()
            tg.start_soon(release_once_the_waiter_is_parked)
            await database.wait(call)
        # Checked before the releaser could run, were the wait not to wait for the call.
        assert call.finished
    assert scope.cancelled_caught
    assert finished == [True]
    assert call.finished
    assert call.result == "slow"
    await database.close()


async def test_close_runs_what_is_queued_then_stops_and_a_later_call_starts_again() -> None:
    database = _DatabaseThread()
    ran: list[int] = []
    calls = [database.submit(partial(ran.append, i)) for i in range(5)]
    thread = database._thread
    assert thread is not None
    await database.close()
    assert not thread.is_alive()
    assert ran == [0, 1, 2, 3, 4]
    assert all(c.finished for c in calls)
    assert await database.run(lambda: "again") == "again"
    assert database._thread is not None
    assert database._thread is not thread
    await database.close()
    await database.close()  # twice is harmless


async def test_no_call_waits_forever_when_it_races_the_thread_going_idle() -> None:
    # The thread is signalled only when it has found nothing queued: calls queued while it
    # works, as it finishes, and after it went idle must all run.
    database = _DatabaseThread()
    with anyio.fail_after(30):
        for index in range(400):
            assert await database.run(partial(int.__add__, index, 0)) == index
            gate = threading.Event()
            first = database.submit(gate.wait)
            burst = [database.submit(partial(int, i)) for i in range(index % 4)]
            gate.set()
            late = database.submit(partial(int, -1))
            for call in (first, *burst, late):
                await database.wait(call)
                assert call.error is None
    await database.close()


def test_asyncio_programs_get_their_outcomes_too() -> None:
    async def main() -> list[int]:
        database = _DatabaseThread()
        try:
            return [await database.run(partial(int.__add__, i, 1)) for i in range(20)]
        finally:
            await database.close()

    assert anyio.run(main, backend="asyncio") == list(range(1, 21))


def test_message_ids_are_time_ordered_with_80_random_bits_that_do_not_repeat() -> None:
    ids = _MessageIds()
    before = time.time_ns() // 1_000_000
    taken = [ids.take() for _ in range(3 * 409 + 7)]  # four reads of the system's CSPRNG
    after = time.time_ns() // 1_000_000
    assert all(len(message_id) == 16 for message_id in taken)
    stamps = [int.from_bytes(message_id[:6], "big") for message_id in taken]
    assert before <= stamps[0]
    assert stamps[-1] <= after
    assert stamps == sorted(stamps)  # history indexes grow at their end
    assert len({message_id[6:] for message_id in taken}) == len(taken)
    assert len({_MessageIds().take()[6:] for _ in range(64)}) == 64  # nothing shared or fixed


def test_message_ids_do_not_go_back_with_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _MessageIds()
    clock = [2_000_000_000_000_000_000]
    monkeypatch.setattr(time, "time_ns", lambda: clock[0])
    first = ids.take()
    clock[0] -= 3_600 * 10**9  # the clock is set back an hour
    second = ids.take()
    assert second[:6] == first[:6] == (2_000_000_000_000).to_bytes(6, "big")
    assert second != first
