"""Paths other than a known direct address: the DHT finds the peer, a relay carries the
conversation, the store holds it for an offline peer."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from .conftest import TIMEOUT, make_profile, online
from .infra import discovery_node, relay, store_nodes
from .test_direct import receive


@pytest.mark.anyio
async def test_recipient_offline_for_the_whole_send_gets_it_from_the_store(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            a_dir = make_profile(tmp_path / "a", **settings)
            b_dir = make_profile(tmp_path / "b", **settings)
            # Bob goes online once: his bundle and one-time prekeys land on the store nodes.
            async with online(b_dir) as bob:
                bob_id = bob.peer_id
            # Alice has never met Bob and has no address for him: X3DH from the store's bundle,
            # sealed envelopes deposited on the store.
            async with online(a_dir) as alice:
                ids = [await alice.send(bob_id, f"stored {i}") for i in range(5)]
                for message_id in ids:
                    row = await alice.wait_delivered(message_id)
                    assert row.state == "stored"
                    assert row.path == "stored"
                # Bob comes back: fetch, decrypt, persist, ack; receipts go back to Alice
                # (through the store as well: Bob has no address for her either).
                async with online(b_dir) as bob:
                    assert await receive(bob, 5) == [f"stored {i}" for i in range(5)]
                    history = await bob.history(alice.peer_id)
                    assert {m.path for m in history} == {"stored"}
                    with anyio.fail_after(20):
                        while {m.state for m in await alice.history(bob_id)} != {"delivered"}:
                            await alice.fetch_stored()
                    # Nothing is fetched twice.
                    assert await bob.fetch_stored() == 0
                    assert len(await bob.history(alice.peer_id)) == 5
                    # Now that they know each other, Bob answers (stored again: no address).
                    await bob.wait_delivered(await bob.send(alice.peer_id, "got them"))
                    with anyio.fail_after(20):
                        while not [m for m in await alice.history(bob_id) if not m.outgoing]:
                            await alice.fetch_stored()


@pytest.mark.anyio
async def test_the_dht_tells_where_a_peer_is(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with discovery_node() as bootstrap:
            a_dir = make_profile(tmp_path / "a", bootstrap=[bootstrap])
            b_dir = make_profile(tmp_path / "b", bootstrap=[bootstrap])
            async with online(b_dir) as bob, online(a_dir) as alice:
                with anyio.fail_after(20):
                    await bob.wait_published()
                # No contact, no address: only the peer ID.
                row = await alice.wait_delivered(await alice.send(bob.peer_id, "found you"))
                assert row.path == "direct"
                assert await receive(bob, 1) == ["found you"]


@pytest.mark.anyio
async def test_a_conversation_through_the_relay(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with relay(tmp_path) as table:
            a_dir = make_profile(tmp_path / "a", relays=[table], direct=False)
            b_dir = make_profile(tmp_path / "b", relays=[table], direct=False)
            async with online(a_dir) as alice, online(b_dir) as bob:
                with anyio.fail_after(10):
                    (b_relayed,) = await bob.host.wait_relayed_addrs()
                    await alice.host.wait_relayed_addrs()
                await alice.add_contact(bob.peer_id, "bob", [str(b_relayed)])
                row = await alice.wait_delivered(await alice.send("bob", "via the relay"))
                assert row.path == "relayed"
                assert await receive(bob, 1) == ["via the relay"]
                reply = await bob.wait_delivered(await bob.send(alice.peer_id, "and back"))
                assert reply.path == "relayed"
                assert await receive(alice, 1) == ["and back"]
                assert (await bob.history(alice.peer_id))[0].path == "relayed"
