"""Device lists through the DHT: a device reaches an account it was never introduced to by the
account ID alone, a removal reaches strangers through the DHT, a removed device cannot put the
old list back, and the primary re-signs its list before the DHT would let it expire. Peers and a
discovery node on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from teia.dht.devicelists import DEVICE_LIST_LIFETIME_MS, DeviceListRecord
from teia.identity import PeerId
from teia.peer import Peer
from teia.peer import devices as devices_module

from .conftest import TIMEOUT, make_profile, online
from .infra import discovery_node
from .test_devices import has_texts, link, texts


@asynccontextmanager
async def on_dht(tmp_path: Path, *names: str) -> AsyncIterator[dict[str, Peer]]:
    """A discovery node and peers that know nothing of each other but its address."""
    async with discovery_node() as bootstrap, AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(
                online(make_profile(tmp_path / name, bootstrap=[bootstrap]))
            )
            for name in names
        }


async def in_dht(peer: Peer) -> int:
    """Until the DHT holds the list ``peer`` holds for its account; its version."""
    held = await peer.devices.device_list()
    assert held is not None
    await peer.devices.until(lambda: peer.devices.published_version >= held.version)
    return held.version


def having(peer: Peer, account: PeerId, count: int) -> Callable[[], Awaitable[bool]]:
    return lambda: has_texts(peer, account, count)


@pytest.mark.anyio
async def test_an_account_is_reached_by_its_id_alone(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with on_dht(tmp_path, "a1", "a2", "b1") as p:
            a1, a2, b1 = p["a1"], p["a2"], p["b1"]
            alice = await a1.devices.create_account()
            bob = await b1.devices.create_account()
            await link(a1, a2)
            # The list with both devices is in the DHT (published again after the link).
            assert await in_dht(a1) == 2
            # Bob's device was never introduced to Alice's: the account ID is enough.
            assert await b1.devices.device_list(alice) is None
            message_id = await b1.devices.send(alice, "found you by your account")
            await b1.devices.wait_sent(message_id)
            for device in (a1, a2):
                await device.devices.until(having(device, bob, 1))
                assert await texts(device, bob) == [(False, "found you by your account")]
            # Alice answers the account that wrote (its list came with the message).
            await a2.devices.send(bob, "hello back")
            await b1.devices.until(having(b1, alice, 2))
            assert await texts(b1, alice) == [
                (True, "found you by your account"),
                (False, "hello back"),
            ]


@pytest.mark.anyio
async def test_a_removal_reaches_strangers_and_the_old_list_stays_out(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with on_dht(tmp_path, "a1", "a2", "c1") as p:
            a1, a2, c1 = p["a1"], p["a2"], p["c1"]
            alice = await a1.devices.create_account()
            await c1.devices.create_account()
            old = await link(a1, a2)
            assert await in_dht(a1) == 2
            removed = await a1.devices.remove(a2.peer_id)
            assert await in_dht(a1) == 3
            # The removed device puts the old list (which names it) back: every node refuses.
            dht = a2.dht
            assert dht is not None
            assert await dht.put_value(DeviceListRecord.of(old)) == 0
            # A stranger looks Alice up and gets the list without the removed device.
            found = await c1.devices.lookup(alice)
            assert found == removed
            assert a2.peer_id not in found
            message_id = await c1.devices.send(alice, "only for the devices still listed")
            copies = await c1.devices.wait_sent(message_id)
            assert set(copies) == {a1.peer_id}


@pytest.mark.anyio
async def test_the_primary_re_signs_a_list_past_half_its_lifetime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with on_dht(tmp_path, "a1", "a2", "b1") as p:
            a1, a2, b1 = p["a1"], p["a2"], p["b1"]
            alice = await a1.devices.create_account()
            await b1.devices.create_account()
            await link(a1, a2)
            await in_dht(a1)
            first = await a1.devices.device_list()
            assert first is not None
            # Bob finds and keeps Alice's list.
            assert await b1.devices.lookup(alice) == first
            # Four days on (the devices' clock only: the DHT node checks the real time,
            # which the new signature carries).
            later = first.issued_ms + DEVICE_LIST_LIFETIME_MS // 2 + 60_000
            monkeypatch.setattr(devices_module, "now_ms", lambda: later)
            assert await a1.devices.publish() >= 1
            resigned = await a1.devices.device_list()
            assert resigned is not None
            assert resigned.version == first.version + 1
            assert resigned.devices == first.devices
            # The other device takes it too.
            await a2.devices.wait_account(alice, version=resigned.version)
            # Bob's list is old now, but he asked the DHT less than an hour ago: no new lookup.
            await b1.devices.send(alice, "still there?")
            assert await b1.devices.device_list(alice) == first
            # An hour on, his next send asks the DHT first, and gets the new one.
            b1.devices.clock = lambda: time.monotonic() + 3600
            await b1.devices.send(alice, "and now?")
            assert await b1.devices.device_list(alice) == resigned
            # A device whose list is past its DHT lifetime no longer publishes it.
            monkeypatch.setattr(
                devices_module, "now_ms", lambda: resigned.issued_ms + DEVICE_LIST_LIFETIME_MS + 1
            )
            assert await a2.devices.publish() == 0
