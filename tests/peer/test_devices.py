"""Multi-device accounts, peers in one process on loopback: fan-out to every device of both
accounts (each device sees each message once), linking with a short code (history handed over;
wrong, expired, replayed and over-tried codes refused), removal, and forged or stale lists and
devices not on the list refused."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import anyio
import pytest

from teia.errors import DeviceError, InvalidLinkCode, LinkRefused, UnknownAccount
from teia.identity import Identity, PeerId
from teia.peer import Peer
from teia.peer.devicewire import (
    APP_LIST,
    APP_MESSAGE,
    KIND_MESSAGE,
    DeviceList,
    DeviceMessage,
    LinkCode,
    ListPush,
)

from .conftest import TIMEOUT, introduce, make_profile, online
from .test_direct import receive


@asynccontextmanager
async def peers(tmp_path: Path, *names: str) -> AsyncIterator[dict[str, Peer]]:
    """Peers online, each knowing where every other one is."""
    async with AsyncExitStack() as stack:
        out = {
            n: await stack.enter_async_context(online(make_profile(tmp_path / n))) for n in names
        }
        for a, b in itertools.permutations(out.values(), 2):
            await introduce(a, b)
        yield out


async def until(peer: Peer, condition: Callable[[], bool]) -> None:
    while not condition():
        await peer.devices.changed()


async def texts(peer: Peer, account: PeerId) -> list[tuple[bool, str]]:
    return [(row.outgoing, row.text) for row in await peer.history(account)]


async def has_texts(peer: Peer, account: PeerId, count: int) -> bool:
    return len(await texts(peer, account)) >= count


async def link(primary: Peer, new: Peer) -> DeviceList:
    granted = await new.devices.link(primary.devices.link_code())
    await new.devices.wait_history()
    return granted


@pytest.mark.anyio
async def test_every_device_of_both_accounts_sees_every_message_once(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, "a1", "a2", "b1", "b2") as p:
            a1, a2, b1, b2 = p["a1"], p["a2"], p["b1"], p["b2"]
            alice = await a1.devices.create_account()
            bob = await b1.devices.create_account()
            with pytest.raises(UnknownAccount):
                await a1.devices.send(bob, "too early")
            assert (await link(a1, a2)).devices == tuple(
                sorted([a1.peer_id, a2.peer_id], key=PeerId.to_bytes)
            )
            await link(b1, b2)
            assert a2.devices.account == alice
            assert not a2.devices.is_primary
            await a1.devices.introduce(b1.peer_id)
            for device in (a1, a2):
                await device.devices.wait_account(bob, version=2)
            for device in (b1, b2):
                await device.devices.wait_account(alice, version=2)

            conversation = [(a1, "hello bob"), (b2, "hello alice"), (a2, "from my laptop")]
            for sender, text in conversation:
                other = bob if sender.devices.account == alice else alice
                sent = await sender.devices.send(other, text)
                copies = await sender.devices.wait_sent(sent)
                assert len(copies) == 3  # two devices of theirs, our other one
                assert all(row.state == "delivered" for row in copies.values())
                assert sender.peer_id not in copies
            # Everything arrives; each device shows each message once, in the right direction.
            want_alice = [(True, "hello bob"), (False, "hello alice"), (True, "from my laptop")]
            want_bob = [(not out, text) for out, text in want_alice]
            for device, account, want in ((a1, bob, want_alice), (a2, bob, want_alice)):
                await device.devices.until(partial(has_texts, device, account, 3))
                assert sorted(await texts(device, account)) == sorted(want)
            for device in (b1, b2):
                await device.devices.until(partial(has_texts, device, alice, 3))
                assert sorted(await texts(device, alice)) == sorted(want_bob)
            # Readers of Peer.messages see account messages, under the account.
            assert (await receive(b1, 1, since=0)) == ["hello bob"]
            # The same logical message handed twice (a retry by another path): shown once.
            mine = await a1.devices.device_list()
            assert mine is not None
            again = DeviceMessage(
                KIND_MESSAGE, bytes(16), 1, (await b1.devices.device_list()).account_key,  # type: ignore[union-attr]
                mine, "twice",
            )  # fmt: skip
            taken = b1.devices.taken[APP_MESSAGE]
            for _ in range(2):
                await a1.wait_delivered(await a1.send_app(b1.peer_id, APP_MESSAGE, again.encode()))
            await until(b1, lambda: b1.devices.taken[APP_MESSAGE] >= taken + 2)
            assert [t for _, t in await texts(b1, alice)].count("twice") == 1
            assert sum(b1.devices.refusals.values()) == 0
            with pytest.raises(DeviceError):
                await a1.devices.send(alice, "to myself")


@pytest.mark.anyio
async def test_linking_with_the_code_hands_over_history_and_bad_codes_are_refused(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, "a1", "bob", "a2", "a3") as p:
            a1, bob, a2, a3 = p["a1"], p["bob"], p["a2"], p["a3"]
            account = await a1.devices.create_account()
            # Some history on the primary, both directions, with a plain (account-less) peer.
            await a1.wait_delivered(await a1.send(bob.peer_id, "before the link"))
            await bob.wait_delivered(await bob.send(a1.peer_id, "answer before"))
            await receive(a1, 1)
            with pytest.raises(DeviceError):
                a2.devices.link_code()  # no account: nothing to link to
            with pytest.raises(InvalidLinkCode):
                await a2.devices.link("ABCD-EFGH")

            code = a1.devices.link_code()
            real = LinkCode.parse(code)
            wrong = replace(real, secret=bytes(x ^ 0x5A for x in real.secret)).format()
            with pytest.raises(LinkRefused, match="wrong code"):
                await a2.devices.link(wrong)
            assert a2.devices.account is None
            granted = await a2.devices.link(code)  # one wrong attempt does not spend it
            assert granted.version == 2
            assert set(granted.devices) == {a1.peer_id, a2.peer_id}
            assert await a2.devices.wait_history() == 2
            moved = await a2.history(bob.peer_id)
            assert [(r.outgoing, r.text) for r in moved] == [
                (True, "before the link"),
                (False, "answer before"),
            ]
            assert (await a1.devices.device_list()) == granted
            with pytest.raises(DeviceError):
                await a2.devices.link(code)  # already on an account

            # Replayed: the code was spent by its success.
            with pytest.raises(LinkRefused, match="expired, already used"):
                await a3.devices.link(code)
            # Expired.
            code = a1.devices.link_code(ttl=60)
            start = a1.devices.clock()
            a1.devices.clock = lambda: start + 61
            with pytest.raises(LinkRefused, match="expired, already used"):
                await a3.devices.link(code)
            a1.devices.clock = lambda: start
            # Three wrong attempts kill the code: the right one is refused after them.
            code = a1.devices.link_code()
            real = LinkCode.parse(code)
            for flip in (1, 2, 3):
                bad = replace(real, secret=bytes(x ^ flip for x in real.secret)).format()
                with pytest.raises(LinkRefused, match="wrong code"):
                    await a3.devices.link(bad)
            with pytest.raises(LinkRefused, match="expired, already used"):
                await a3.devices.link(code)
            assert a3.devices.account is None
            assert (await a1.devices.device_list()) == granted
            # A fresh code still works.
            await link(a1, a3)
            assert a3.devices.account == account
            assert len((await a1.devices.device_list()).devices) == 3  # type: ignore[union-attr]
            await a2.devices.wait_account(account, version=3)


@pytest.mark.anyio
async def test_a_removed_device_stops_receiving_and_its_old_list_is_refused(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, "a1", "a2", "b1") as p:
            a1, a2, b1 = p["a1"], p["a2"], p["b1"]
            alice = await a1.devices.create_account()
            bob = await b1.devices.create_account()
            await link(a1, a2)
            old = await a1.devices.device_list()
            assert old is not None
            await a1.devices.introduce(b1.peer_id)
            await a2.devices.wait_account(bob)
            await b1.devices.wait_account(alice, version=2)
            await b1.devices.wait_sent(await b1.devices.send(alice, "to both"))
            for device in (a1, a2):
                await device.devices.until(partial(has_texts, device, bob, 1))

            with pytest.raises(DeviceError):
                await a2.devices.remove(a1.peer_id)  # only the primary holds the key
            with pytest.raises(DeviceError):
                await a1.devices.remove(a1.peer_id)
            updated = await a1.devices.remove(a2.peer_id)
            assert updated.version == 3
            assert a2.peer_id not in updated
            await b1.devices.wait_account(alice, version=3)
            await until(a2, lambda: a2.devices.removed)
            with pytest.raises(DeviceError, match="removed"):
                await a2.devices.send(bob, "still here?")

            # After the removal nothing goes to it: not Bob's message, not Alice's transcript.
            copies = await b1.devices.wait_sent(await b1.devices.send(alice, "after"))
            assert set(copies) == {a1.peer_id}
            copies = await a1.devices.wait_sent(await a1.devices.send(bob, "mine after"))
            assert set(copies) == {b1.peer_id}
            await a1.devices.until(partial(has_texts, a1, bob, 3))
            assert (False, "after") not in await texts(a2, bob)
            assert (True, "mine after") not in await texts(a2, bob)

            # The removed device speaking with the old list it still holds: refused.
            forged = DeviceMessage(KIND_MESSAGE, bytes(range(16)), 1, updated.account_key, old, "x")
            forged = replace(forged, peer_account=(await b1.devices.device_list()).account_key)  # type: ignore[union-attr]
            await a2.send_app(b1.peer_id, APP_MESSAGE, forged.encode())
            # The old list pushed again (a replay, by a device that is on it): refused as stale.
            await a1.send_app(b1.peer_id, APP_LIST, ListPush(False, old).encode())
            await until(
                b1,
                lambda: (
                    b1.devices.refusals["DeviceNotListed"] >= 1
                    and b1.devices.refusals["StaleDeviceList"] >= 1
                ),
            )
            assert (await b1.devices.device_list(alice)) == updated
            assert "x" not in [t for _, t in await texts(b1, alice)]


@pytest.mark.anyio
async def test_forged_lists_and_devices_not_on_the_list_are_refused(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, "alice", "bob", "mallory") as p:
            a, b, m = p["alice"], p["bob"], p["mallory"]
            alice = await a.devices.create_account()
            await b.devices.create_account()
            await m.devices.create_account()
            await a.devices.introduce(b.peer_id)
            await a.devices.introduce(m.peer_id)
            await b.devices.wait_account(alice)
            genuine = await m.devices.wait_account(alice)
            bob_key = (await b.devices.device_list()).account_key  # type: ignore[union-attr]

            # Mallory replays Alice's genuine list in a message from Mallory's device.
            claim = DeviceMessage(KIND_MESSAGE, bytes(16), 1, bob_key, genuine, "I am Alice")
            await m.send_app(b.peer_id, APP_MESSAGE, claim.encode())
            # A list naming Mallory's device under Alice's key, signed by another key.
            forger = Identity.generate()
            fake = DeviceList.sign(forger, 9, [a.peer_id, m.peer_id])
            raw = fake.encode()
            forged = raw[:4] + genuine.account_key + raw[36:]
            await m.send_app(b.peer_id, APP_LIST, ListPush(False, fake).encode()[:5] + forged)
            # Mallory's account's list pushed by a device that is not on it.
            mallory = await m.devices.device_list()
            assert mallory is not None
            await a.send_app(b.peer_id, APP_LIST, ListPush(False, mallory).encode())
            await until(
                b,
                lambda: (
                    b.devices.refusals["DeviceNotListed"] >= 2
                    and b.devices.refusals["BadDeviceListSignature"] >= 1
                ),
            )
            assert await texts(b, alice) == []
            assert (await b.devices.device_list(alice)) == genuine
            assert await b.devices.device_list(fake.account) is None
            assert await b.devices.device_list(mallory.account) is None


@pytest.mark.anyio
async def test_a_fan_out_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    from typing import Any

    from teia.peer.devices import _fanouts

    names = ("a1", "b1", "b2")
    dirs = {name: make_profile(tmp_path / name) for name in names}
    with anyio.fail_after(TIMEOUT * 2):
        async with AsyncExitStack() as stack:
            p = {n: await stack.enter_async_context(online(d)) for n, d in dirs.items()}
            for a, b in itertools.permutations(p.values(), 2):
                await introduce(a, b)
            a1, b1, b2 = p["a1"], p["b1"], p["b2"]
            alice = await a1.devices.create_account()
            bob = await b1.devices.create_account()
            await link(b1, b2)
            await a1.devices.introduce(b1.peer_id)
            await a1.devices.wait_account(bob, version=2)
            reached = anyio.Event()
            send_app = a1.send_app

            async def stuck(to: Any, app: str, data: bytes) -> str:
                if to == b2.peer_id and app == APP_MESSAGE:
                    reached.set()
                    await anyio.sleep_forever()
                return await send_app(to, app, data)

            a1.send_app = stuck  # type: ignore[method-assign]
            async with anyio.create_task_group() as tg:
                tg.start_soon(a1.devices.send, bob, "half sent")
                await reached.wait()
                tg.cancel_scope.cancel()  # the process "dies" in the middle of the fan-out
            a1.send_app = send_app  # type: ignore[method-assign]
            assert [t for _, t in await texts(a1, bob)] == ["half sent"]
            assert len(await a1.run_db(_fanouts, a1.profile.db)) == 1
            assert await texts(b2, alice) == []
        async with AsyncExitStack() as stack:
            p = {n: await stack.enter_async_context(online(d)) for n, d in dirs.items()}
            a1, b1, b2 = p["a1"], p["b1"], p["b2"]
            for a, b in itertools.permutations(p.values(), 2):
                await introduce(a, b)  # new ports after the restart
            for device in (b1, b2):
                await device.devices.until(partial(has_texts, device, alice, 1))
                assert await texts(device, alice) == [(False, "half sent")]
            assert await a1.run_db(_fanouts, a1.profile.db) == []
