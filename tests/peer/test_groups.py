"""Groups end to end, several peers in one process on loopback: create, add, remove, rename,
send; keys rotated on removal (a removed member cannot read what comes after, even holding the
ciphertext); forged, replayed and out-of-order changes; a non-member's message; a member
offline served through the store; state kept across a restart."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from teia.crypto import GroupReceiverKey, GroupSenderKey
from teia.errors import (
    CryptoError,
    GroupChangeRefused,
    GroupError,
    NotGroupMember,
    UnknownGroup,
)
from teia.identity import Identity
from teia.peer import AppMessage, Peer
from teia.peer.groups import GroupInfo, check_chain
from teia.peer.groupwire import (
    GROUP_APP,
    GroupHeader,
    GroupJoin,
    GroupLeave,
    GroupMessage,
    GroupPayload,
    GroupState,
    GroupText,
    KeyDistribution,
    derive_group_id,
)

from .conftest import TIMEOUT, introduce, make_profile, online
from .infra import store_nodes

MARKER = "test.marker"


class Marker:
    """Payloads named ``test.marker``: the ones before them on the same pairwise channel were
    handled when a marker arrives (handlers run in arrival order)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._changed = anyio.Event()

    async def __call__(self, message: AppMessage) -> None:
        self.seen.add(message.data)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self, data: bytes) -> None:
        while data not in self.seen:
            await self._changed.wait()


class Tap:
    """Wraps a peer's group handler to keep every group message it is handed."""

    def __init__(self, peer: Peer) -> None:
        self.messages: list[GroupMessage] = []
        self._inner = peer.groups._handle
        peer.on_app(GROUP_APP, self)

    async def __call__(self, message: AppMessage) -> None:
        body = GroupPayload.decode(message.data).body
        if isinstance(body, GroupMessage):
            self.messages.append(body)
        await self._inner(message)


@asynccontextmanager
async def peers(tmp_path: Path, count: int, **settings: Any) -> AsyncIterator[list[Peer]]:
    """``count`` peers online, each knowing where the others are."""
    async with AsyncExitStack() as stack:
        out = []
        for index in range(count):
            directory = tmp_path / f"p{index}"
            if not directory.exists():
                make_profile(directory, **settings)
            out.append(await stack.enter_async_context(online(directory)))
        for a in out:
            a.on_app(MARKER, Marker())
            for b in out:
                if a is not b:
                    await introduce(a, b)
        yield out


async def receive(peer: Peer, conversation: str, count: int) -> list[tuple[str, str]]:
    """The next ``count`` texts of ``conversation`` that reach ``peer``: (sender, text)."""
    got: list[tuple[str, str]] = []
    async for message in peer.messages(since_seq=0):
        if message.conversation == conversation:
            got.append((str(message.sender), message.text))
            if len(got) == count:
                return got
    return got


async def texts(peer: Peer, group: GroupInfo) -> list[str]:
    return [row.text for row in await peer.groups.history(group)]


async def flushed(sender: Peer, receiver: Peer) -> None:
    """Wait until ``receiver`` handled everything ``sender`` queued for it so far."""
    data = os.urandom(16)
    marker = receiver._apps[MARKER]
    assert isinstance(marker, Marker)
    await sender.send_app(receiver.peer_id, MARKER, data)
    await marker.wait(data)


@pytest.mark.anyio
async def test_create_send_rename_and_add(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 4) as (alice, bob, carol, dave):
            group = await alice.groups.create("friends", [bob.peer_id, carol.peer_id])
            assert group.version == 0
            assert group.admins == (alice.peer_id,)
            assert set(group.members) == {alice.peer_id, bob.peer_id, carol.peer_id}
            for member in (bob, carol):
                seen = await member.groups.wait_version(group, 0)
                assert seen == group
            sent = await alice.groups.send(group, "hello group")
            assert set(sent.deliveries) == {bob.peer_id, carol.peer_id}
            for member in (bob, carol):
                got = await receive(member, group.conversation, 1)
                assert got == [(str(alice.peer_id), "hello group")]
            await bob.groups.send(group, "hi from bob")
            assert (await receive(carol, group.conversation, 2))[1] == (
                str(bob.peer_id),
                "hi from bob",
            )
            assert (await receive(alice, group.conversation, 1)) == [
                (str(bob.peer_id), "hi from bob")
            ]
            # One message ID for everyone: ours in our history, the same in theirs.
            assert next(r.message_id.hex() for r in await alice.groups.history(group)) == (
                sent.message_id
            )
            assert next(r.message_id.hex() for r in await carol.groups.history(group)) == (
                sent.message_id
            )

            renamed = await alice.groups.rename(group, "best friends")
            assert renamed.version == 1
            assert (await carol.groups.wait_version(group, 1)).name == "best friends"

            added = await alice.groups.add(group, [dave.peer_id])
            assert added.version == 2
            joined = await dave.groups.wait_version(group, 2)
            assert joined.joined
            assert joined.name == "best friends"
            await carol.groups.send(group, "welcome dave")
            assert await receive(dave, group.conversation, 1) == [
                (str(carol.peer_id), "welcome dave")
            ]
            # Dave cannot read what was said before he joined: it was never sent to him.
            assert await texts(dave, group) == ["welcome dave"]
            await dave.groups.send(group, "thanks")
            for member in (alice, bob, carol):
                got = await receive(member, group.conversation, 3)
                assert got[-1] == (str(dave.peer_id), "thanks")
            assert [g.group_id for g in await dave.groups.list()] == [group.group_id]

            # Only admins change the group.
            with pytest.raises(NotGroupMember):
                await bob.groups.rename(group, "bob's group")
            with pytest.raises(UnknownGroup):
                await bob.groups.get("00" * 16)
            with pytest.raises(GroupError):
                await alice.groups.rename(group, "x" * 257)


@pytest.mark.anyio
async def test_removed_member_cannot_read_what_follows(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, carol):
            group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
            tap = Tap(bob)
            for member in (bob, carol):
                await member.groups.wait_version(group, 0)
            await alice.groups.send(group, "before")
            await carol.groups.send(group, "carol was here")
            for member in (bob, carol):
                await receive(member, group.conversation, 1)
            await receive(bob, group.conversation, 2)
            await flushed(bob, carol)
            assert carol.groups.stats["keys"] == 2
            # What Carol holds before she is removed: every chain she was given.
            carol_keys = await carol.run_db(
                carol.groups._tables.receiver_keys, bytes.fromhex(group.group_id)
            )
            assert {peer for peer, _ in carol_keys} == {str(alice.peer_id), str(bob.peer_id)}

            after = await alice.groups.remove(group, [carol.peer_id])
            assert carol.peer_id not in after.members
            left = await carol.groups.wait_version(group, 1)
            assert not left.joined
            await bob.groups.wait_version(group, 1)
            sent_a = await alice.groups.send(group, "after, from alice")
            sent_b = await bob.groups.send(group, "after, from bob")
            assert carol.peer_id not in sent_a.deliveries
            assert carol.peer_id not in sent_b.deliveries
            assert await receive(alice, group.conversation, 2) == [
                (str(carol.peer_id), "carol was here"),
                (str(bob.peer_id), "after, from bob"),
            ]
            got = await receive(bob, group.conversation, 3)
            assert got[-1] == (str(alice.peer_id), "after, from alice")

            # Even with the ciphertext in hand, Carol's keys do not open it: new chains.
            later = [m for m in tap.messages if m.message_id.hex() == sent_a.message_id]
            assert len(later) == 1
            chains = {GroupReceiverKey.from_bytes(k).chain_id for _, k in carol_keys}
            assert later[0].chain_id not in chains
            for _, key in carol_keys:
                with pytest.raises(CryptoError):
                    GroupReceiverKey.from_bytes(key).decrypt(later[0].ciphertext)
            # Handed to her over a pairwise session, the payload is refused.
            refused = carol.groups.stats["refused"]
            await alice.send_app(carol.peer_id, GROUP_APP, GroupPayload(later[0]).encode())
            await flushed(alice, carol)
            assert carol.groups.stats["refused"] == refused + 1
            assert sorted(await texts(carol, group)) == ["before", "carol was here"]
            # She kept no key for the group, and cannot send to it.
            assert await carol.run_db(carol.groups._tables.receiver_keys, later[0].group_id) == []
            with pytest.raises(NotGroupMember):
                await carol.groups.send(group, "am I still here?")


def forge(
    base: GroupState,
    signer: Peer,
    *,
    version: int | None = None,
    prev_hash: bytes | None = None,
    members: tuple[Any, ...] | None = None,
    admins: tuple[Any, ...] | None = None,
    name: str | None = None,
) -> GroupState:
    return GroupState(
        base.group_id,
        base.version + 1 if version is None else version,
        base.digest() if prev_hash is None else prev_hash,
        base.name if name is None else name,
        base.members if members is None else members,
        base.admins if admins is None else admins,
        signer.peer_id,
        base.timestamp_ms + 1,
    ).signed(signer.identity)


@pytest.mark.anyio
async def test_forged_replayed_and_out_of_order_changes(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 4) as (alice, bob, carol, mallory):
            group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
            await carol.groups.wait_version(group, 0)
            gid = bytes.fromhex(group.group_id)
            held = await carol.run_db(carol.groups._tables.load, gid)
            assert held is not None
            v0 = held.state

            async def deliver(sender: Peer, state: GroupState | bytes) -> None:
                data = state if isinstance(state, bytes) else GroupPayload(state).encode()
                await sender.send_app(carol.peer_id, GROUP_APP, data)
                await flushed(sender, carol)

            refused = carol.groups.stats["refused"]
            # A member who is not an admin adds someone, or makes herself admin.
            await deliver(bob, forge(v0, bob, members=(*v0.members, mallory.peer_id)))
            await deliver(bob, forge(v0, bob, admins=(alice.peer_id, bob.peer_id)))
            # An admin's signature over something else (the name changed after signing).
            signed = forge(v0, alice, name="signed name")
            tampered = bytearray(GroupPayload(signed).encode())
            at = tampered.index(b"signed name")
            tampered[at : at + 6] = b"SIGNED"
            await deliver(alice, bytes(tampered))
            # Signed by an admin but not extending the chain (wrong previous hash).
            await deliver(alice, forge(v0, alice, prev_hash=bytes(32), name="fork"))
            # An outsider makes up a group with Carol in it, under the real group's ID.
            fake = GroupState(
                v0.group_id, 0, b"", "fake", (*v0.members, mallory.peer_id),
                (mallory.peer_id,), mallory.peer_id, 1, v0.nonce,
            )  # fmt: skip
            await deliver(mallory, fake.signed(mallory.identity))
            assert carol.groups.stats["refused"] == refused + 5
            assert (await carol.groups.get(group)).version == 0

            # Out of order: version 2 arrives before version 1; held back, then both apply.
            v1 = forge(v0, alice, name="one")
            v2 = forge(v1, alice, name="two")
            await deliver(alice, v2)
            assert carol.groups.stats["parked"] == 1
            assert (await carol.groups.get(group)).version == 0
            await deliver(alice, v1)
            now = await carol.groups.get(group)
            assert (now.version, now.name) == (2, "two")
            # Replays: the state held is ignored, an older one refused.
            refused = carol.groups.stats["refused"]
            await deliver(alice, v2)
            assert carol.groups.stats["refused"] == refused
            await deliver(alice, v1)
            assert carol.groups.stats["refused"] == refused + 1
            assert (await carol.groups.get(group)).version == 2


@pytest.mark.anyio
async def test_a_non_members_group_message_is_refused(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, mallory):
            group = await alice.groups.create("g", [bob.peer_id])
            await alice.groups.send(group, "members only")
            await receive(bob, group.conversation, 1)
            gid = bytes.fromhex(group.group_id)
            key = GroupSenderKey.generate()
            distribution = KeyDistribution(gid, 0, key.distribution_message())
            message_id = b"\x01" * 16
            ciphertext = key.encrypt(GroupText(gid, message_id, "let me in").encode())
            refused = bob.groups.stats["refused"]
            for body in (distribution, GroupMessage(gid, 0, message_id, ciphertext)):
                await mallory.send_app(bob.peer_id, GROUP_APP, GroupPayload(body).encode())
            await flushed(mallory, bob)
            assert bob.groups.stats["refused"] == refused + 2
            assert await texts(bob, group) == ["members only"]
            # Garbage is refused too, and nothing moves.
            await mallory.send_app(bob.peer_id, GROUP_APP, b"\xff\x00garbage")
            await flushed(mallory, bob)
            assert bob.groups.stats["refused"] == refused + 3


@pytest.mark.anyio
async def test_offline_member_gets_group_messages_from_the_store(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 3):
        async with store_nodes(tmp_path) as stores:
            settings = {"store_nodes": stores, "store_poll_interval": 0.3}
            async with peers(tmp_path, 3, **settings) as (alice, bob, carol):
                group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
                await alice.groups.send(group, "everyone here")
                for member in (bob, carol):
                    await receive(member, group.conversation, 1)
                await carol.groups.send(group, "carol leaves for a while")
                for member in (alice, bob):
                    await receive(member, group.conversation, 1 + (member is bob))
            # Carol is offline; Alice and Bob talk in the group.
            async with peers(tmp_path, 2, **settings) as (alice, bob):
                sent = await alice.groups.send(group, "while you were away")
                row = await alice.wait_delivered(sent.deliveries[carol.peer_id])
                assert row.state == "stored"
                sent = await bob.groups.send(group, "and from bob")
                await bob.wait_delivered(sent.deliveries[carol.peer_id])
            async with online(tmp_path / "p2") as carol_again:
                got = await receive(carol_again, group.conversation, 3)
                assert got[1:] == [
                    (str(alice.peer_id), "while you were away"),
                    (str(bob.peer_id), "and from bob"),
                ]
                assert (await carol_again.groups.get(group)).joined


@pytest.mark.anyio
async def test_groups_and_keys_survive_a_restart(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 2) as (alice, bob):
            group = await alice.groups.create("kept", [bob.peer_id])
            await bob.groups.wait_keys(group, 1)
            await alice.groups.wait_keys(group, 1)
            await alice.groups.send(group, "first")
            await receive(bob, group.conversation, 1)
        async with peers(tmp_path, 2) as (alice, bob):
            assert [g.name for g in await alice.groups.list()] == ["kept"]
            await alice.groups.send(group, "after a restart")
            await bob.groups.send(group, "me too")
            assert (await receive(bob, group.conversation, 2))[1] == (
                str(alice.peer_id),
                "after a restart",
            )
            assert await receive(alice, group.conversation, 1) == [(str(bob.peer_id), "me too")]
            assert await texts(alice, group) == ["first", "after a restart", "me too"]


class Gate:
    """Holds a peer's group payloads until opened (its dispatcher waits meanwhile)."""

    def __init__(self, peer: Peer) -> None:
        self.arrived = anyio.Event()
        self.open = anyio.Event()
        self._inner = peer.groups._handle
        peer.on_app(GROUP_APP, self)

    async def __call__(self, message: AppMessage) -> None:
        self.arrived.set()
        await self.open.wait()
        await self._inner(message)


@pytest.mark.anyio
async def test_two_admins_changing_at_once_end_on_the_same_state(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, carol):
            group = await alice.groups.create(
                "g", [bob.peer_id, carol.peer_id], admins=[bob.peer_id]
            )
            for member in (bob, carol):
                await member.groups.wait_version(group, 0)
            # Alice's rename reaches Bob only after Bob made his own change of version 1.
            gate = Gate(bob)
            await alice.groups.rename(group, "alice's name")
            await gate.arrived.wait()
            await bob.groups.rename(group, "bob's name")  # his own version 1
            gate.open.set()
            for sender, receiver in ((alice, bob), (alice, carol), (bob, alice), (bob, carol)):
                await flushed(sender, receiver)
            held = [
                await p.run_db(p.groups._tables.load, bytes.fromhex(group.group_id))
                for p in (alice, bob, carol)
            ]
            states = [h.state for h in held if h is not None]
            assert len(states) == 3
            assert len({s.digest() for s in states}) == 1
            winner = states[0]
            assert winner.version == 1
            assert winner.name in ("alice's name", "bob's name")
            # The loser was refused where it came second, and the keys still work.
            assert alice.groups.stats["refused"] + bob.groups.stats["refused"] >= 1
            await carol.groups.send(group, "which name?")
            for member in (alice, bob):
                assert await receive(member, group.conversation, 1) == [
                    (str(carol.peer_id), "which name?")
                ]


@pytest.mark.anyio
async def test_a_fan_out_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, carol):
            group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
            for member in (bob, carol):
                await flushed(alice, member)
            reached, bob_queued = anyio.Event(), anyio.Event()
            send_app = alice.send_app

            async def stuck(to: Any, app: str, data: bytes) -> str:
                if to == carol.peer_id and app == GROUP_APP:
                    await bob_queued.wait()
                    reached.set()
                    await anyio.sleep_forever()
                message_id = await send_app(to, app, data)
                bob_queued.set()
                return message_id

            alice.send_app = stuck  # type: ignore[method-assign]
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice.groups.send, group, "half sent")
                await reached.wait()
                tg.cancel_scope.cancel()  # the process "dies" in the middle of the fan-out
            alice.send_app = send_app  # type: ignore[method-assign]
            assert await receive(bob, group.conversation, 1) == [(str(alice.peer_id), "half sent")]
            assert await texts(carol, group) == []
        async with peers(tmp_path, 3) as (alice, bob, carol):
            assert await receive(carol, group.conversation, 1) == [
                (str(alice.peer_id), "half sent")
            ]
            await flushed(alice, bob)  # Bob was handed it again, and kept one
            assert await texts(bob, group) == ["half sent"]
            assert await alice.run_db(alice.groups._tables.fanouts) == []


def _link(
    before: GroupState | None,
    signer: Identity,
    members: tuple[Identity, ...],
    admins: tuple[Identity, ...],
    *,
    group_id: bytes = b"",
    nonce: bytes = b"",
    prev_hash: bytes | None = None,
) -> GroupState:
    return GroupState(
        before.group_id if before is not None else group_id,
        0 if before is None else before.version + 1,
        b"" if before is None else (before.digest() if prev_hash is None else prev_hash),
        "g",
        tuple(m.peer_id for m in members),
        tuple(a.peer_id for a in admins),
        signer.peer_id,
        0 if before is None else before.timestamp_ms + 1,
        nonce,
    ).signed(signer)


def test_the_chain_is_checked_back_to_the_creator() -> None:
    creator, admin, member, newcomer, mallory = (Identity.generate() for _ in range(5))
    nonce = os.urandom(16)
    gid = derive_group_id(creator.peer_id, nonce)
    v0 = _link(None, creator, (creator, admin, member), (creator,), group_id=gid, nonce=nonce)
    v1 = _link(v0, creator, (creator, admin, member), (creator, admin))  # admin made admin
    v2 = _link(v1, admin, (creator, admin, member), (creator, admin))  # by the new admin
    v3 = _link(v2, admin, (creator, admin, member, newcomer), (creator, admin))
    headers = [v.header() for v in (v0, v1, v2)]
    check_chain(headers, v3)
    check_chain([], v0)
    refusals = {
        "no version 0": (headers[1:], v3),
        "out of order": ([headers[0], headers[2], headers[1]], v3),
        "a gap": ([headers[0], headers[2]], v3),
        # Version 0 under the real group's ID, by someone else: not the creator's.
        "another creator": (
            [
                _link(
                    None, mallory, (mallory, member), (mallory,), group_id=gid, nonce=nonce
                ).header(),
                *headers[1:],
            ],
            v3,
        ),
        # A member who is not an admin (of the version before) changes the group.
        "not an admin": (headers, _link(v2, member, (creator, admin, member, newcomer), (member,))),
        "an outsider": (headers, _link(v2, mallory, (mallory, newcomer), (mallory,))),
        "a fork": (headers, _link(v2, admin, (admin, newcomer), (admin,), prev_hash=bytes(32))),
        "another group": (
            [
                _link(
                    None,
                    creator,
                    (creator,),
                    (creator,),
                    group_id=derive_group_id(creator.peer_id, bytes(16)),
                    nonce=bytes(16),
                ).header(),
                *headers[1:],
            ],
            v3,
        ),
    }
    for reason, (links, state) in refusals.items():
        with pytest.raises(GroupChangeRefused):  # noqa: PT012 (the reason names the case)
            check_chain(links, state)
            pytest.fail(reason)


@pytest.mark.anyio
async def test_a_joiner_takes_a_group_only_with_its_chain(tmp_path: Path) -> None:
    """A member who is no admin forges the version adding someone, with the real headers it
    holds: refused; the same state alone is held back and never applies; the real addition,
    with its chain, is taken."""
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 4) as (alice, bob, mallory, dave):
            group = await alice.groups.create("g", [bob.peer_id, mallory.peer_id])
            await alice.groups.rename(group, "renamed")
            await mallory.groups.wait_version(group, 1)
            gid = bytes.fromhex(group.group_id)
            held = await mallory.run_db(mallory.groups._tables.load, gid)
            assert held is not None
            chain = await mallory.run_db(mallory.groups._tables.headers, gid, 2)
            assert chain is not None
            assert [h.version for h in chain] == [0, 1]
            forged = forge(held.state, mallory, members=(*held.state.members, dave.peer_id))
            refused, parked = dave.groups.stats["refused"], dave.groups.stats["parked"]
            join = GroupPayload(GroupJoin(forged, tuple(chain))).encode()
            await mallory.send_app(dave.peer_id, GROUP_APP, join)
            await mallory.send_app(dave.peer_id, GROUP_APP, GroupPayload(forged).encode())
            await flushed(mallory, dave)
            assert dave.groups.stats["refused"] == refused + 1
            assert dave.groups.stats["parked"] == parked + 1
            with pytest.raises(UnknownGroup):
                await dave.groups.get(group)
            added = await alice.groups.add(group, [dave.peer_id])
            joined = await dave.groups.wait_version(group, 2)
            assert joined == added
            assert joined.joined
            assert joined.name == "renamed"
            # The forged version 2 that waited is refused against the real one.
            assert (await dave.groups.get(group)).admins == (alice.peer_id,)
            await alice.groups.send(group, "welcome")
            assert await receive(dave, group.conversation, 1) == [(str(alice.peer_id), "welcome")]


@pytest.mark.anyio
async def test_an_add_whose_proof_is_over_the_limit_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teia.peer import groups as groups_module

    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 2) as (alice, bob):
            group = await alice.groups.create("g", [])
            for index in range(3):
                group = await alice.groups.rename(group, f"name {index}")
            monkeypatch.setattr(groups_module, "MAX_JOIN_PROOF", 700)  # ~2 headers' worth
            with pytest.raises(GroupError, match="too long to prove"):
                await alice.groups.add(group, [bob.peer_id])
            assert await alice.groups.get(group) == group
            with pytest.raises(UnknownGroup):
                await bob.groups.get(group)
            monkeypatch.setattr(groups_module, "MAX_JOIN_PROOF", 8 * 1024 * 1024)
            added = await alice.groups.add(group, [bob.peer_id])
            assert (await bob.groups.wait_version(group, added.version)).joined


@pytest.mark.anyio
async def test_a_long_lived_group_is_joined_through_pages(tmp_path: Path) -> None:
    """800 versions: their headers (~225 KB) do not fit one payload (192 KiB), so the join
    comes in pages; the newcomer checks the whole chain, joins, and can add members in turn."""
    with anyio.fail_after(TIMEOUT * 4):
        async with peers(tmp_path, 3) as (alice, bob, carol):
            group = await alice.groups.create("g", [])
            for index in range(800):
                group = await alice.groups.rename(group, f"name {index}")
            added = await alice.groups.add(group, [bob.peer_id], admin=True)
            joined = await bob.groups.wait_version(group, added.version)
            assert joined.joined
            assert joined.name == "name 799"
            assert bob.groups.stats["join_pages"] >= 1
            assert await bob.run_db(bob.groups._tables.join_pages) == 0
            await alice.groups.send(group, "welcome")
            assert await receive(bob, group.conversation, 1) == [(str(alice.peer_id), "welcome")]
            # Bob holds the headers now: he proves the chain to the next newcomer himself.
            again = await bob.groups.add(group, [carol.peer_id])
            assert (await carol.groups.wait_version(group, again.version)).joined
            assert carol.groups.stats["join_pages"] >= 1


@pytest.mark.anyio
async def test_join_pages_are_taken_in_any_order_kept_apart_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teia.peer import groups as groups_module

    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, mallory):
            group, held, chain = await long_group(alice, "g", 30)
            state = forge(held, alice, members=(alice.peer_id, bob.peer_id))
            pages = GroupJoin.paged(state, chain, 2_000)
            assert len(pages) >= 4
            tables = bob.groups._tables
            # Mallory replays Alice's pages: a join is only taken from the state's signer.
            refused = bob.groups.stats["refused"]
            await mallory.send_app(bob.peer_id, GROUP_APP, GroupPayload(pages[0]).encode())
            await flushed(mallory, bob)
            assert bob.groups.stats["refused"] == refused + 1
            # Every page but the first, last first, one twice: kept, nothing joined yet.
            for page in [*reversed(pages[1:]), pages[-1]]:
                await alice.send_app(bob.peer_id, GROUP_APP, GroupPayload(page).encode())
            await flushed(alice, bob)
            assert await bob.run_db(tables.join_pages) == len(pages) - 1
            with pytest.raises(UnknownGroup):
                await bob.groups.get(group)
            await alice.send_app(bob.peer_id, GROUP_APP, GroupPayload(pages[0]).encode())
            joined = await bob.groups.wait_version(group, state.version)
            assert joined.joined
            assert await bob.run_db(tables.join_pages) == 0

            # Pages that complete a broken chain (version 5 forged): refused, none kept.
            other, base, links = await long_group(alice, "h", 12)
            # Signed by an admin, in its place, but naming the wrong version before it.
            links[5] = forge(base, alice, version=5, prev_hash=bytes(32)).header()
            broken = forge(base, alice, members=(alice.peer_id, bob.peer_id))
            broken_pages = GroupJoin.paged(broken, links, 2_000)
            assert len(broken_pages) >= 2
            refused = bob.groups.stats["refused"]
            for page in broken_pages:
                await alice.send_app(bob.peer_id, GROUP_APP, GroupPayload(page).encode())
            await flushed(alice, bob)
            assert bob.groups.stats["refused"] == refused + 1
            assert await bob.run_db(tables.join_pages) == 0
            with pytest.raises(UnknownGroup):
                await bob.groups.get(other)

            # Limits, straight on the table: two unfinished joins per sender, the proof size.
            first_pages = [
                GroupJoin.paged(forge(base, alice, name=f"s{n}"), links, 2_000)[0] for n in range(3)
            ]
            sender = str(alice.peer_id)
            for page in first_pages[:2]:
                assert await bob.run_db(tables.add_join_page, page, sender) is None
            with pytest.raises(GroupError, match="too many"):
                await bob.run_db(tables.add_join_page, first_pages[2], sender)
            assert await bob.run_db(tables.add_join_page, first_pages[2], "other") is None
            monkeypatch.setattr(groups_module, "MAX_PENDING_JOINS", 3)
            with pytest.raises(GroupError, match="too many"):
                await bob.run_db(tables.add_join_page, first_pages[0], "a third sender")
            monkeypatch.setattr(groups_module, "MAX_PENDING_JOINS", 8)
            monkeypatch.setattr(groups_module, "MAX_JOIN_PROOF", 1_000)
            with pytest.raises(GroupError, match="over the limit"):
                await bob.run_db(tables.add_join_page, first_pages[0], "a third sender")
            assert await bob.run_db(tables.join_pages) == 3


@pytest.mark.anyio
async def test_a_member_leaves_and_an_admin_removes_it(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 4) as (alice, bob, carol, dave):
            group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
            await alice.groups.add(group, [dave.peer_id], admin=True)
            for peer in (bob, carol, dave):
                await peer.groups.wait_version(group, 1)
            left = await bob.groups.leave(group)
            assert not left.joined
            assert left.version == 1  # bob signs nothing: an admin does
            with pytest.raises(NotGroupMember):
                await bob.groups.send(group, "still here?")
            # Both admins get the request; one removes bob, the other finds it done.
            removed = await carol.groups.wait_version(group, 2)
            assert bob.peer_id not in removed.members
            assert removed.joined
            for admin in (alice, dave):
                assert (await admin.groups.wait_version(group, 2)).members == removed.members
            assert alice.groups.stats["left"] + dave.groups.stats["left"] >= 1
            # Texts after the removal reach the others and not bob, who keeps his history.
            await alice.groups.send(group, "after bob left")
            assert await receive(carol, group.conversation, 1) == [
                (str(alice.peer_id), "after bob left")
            ]
            await flushed(alice, bob)
            assert "after bob left" not in await texts(bob, group)
            assert not (await bob.groups.get(group)).joined
            # Leaving again does nothing; bob's removal parked nothing on his side.
            assert (await bob.groups.leave(group)).version == 1
            assert await bob.run_db(bob.groups._tables.parked_count) == 0


@pytest.mark.anyio
async def test_an_admin_leaves_by_removing_itself_but_never_as_the_last_one(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 3) as (alice, bob, carol):
            group = await alice.groups.create("g", [bob.peer_id, carol.peer_id])
            await bob.groups.wait_version(group, 0)
            with pytest.raises(GroupError, match="only admin"):
                await alice.groups.leave(group)
            assert (await alice.groups.get(group)).joined
            await alice.groups.add(group, [bob.peer_id], admin=True)
            gone = await alice.groups.leave(group)
            assert gone.version == 2
            assert not gone.joined
            assert alice.peer_id not in gone.members
            after = await carol.groups.wait_version(group, 2)
            assert after.admins == (bob.peer_id,)
            # A request to leave sent to a member that is no admin changes nothing.
            await carol.send_app(
                alice.peer_id,
                GROUP_APP,
                GroupPayload(GroupLeave(bytes.fromhex(group.group_id), 2)).encode(),
            )
            await flushed(carol, alice)
            assert (await alice.groups.get(group)).version == 2
            # A group alone: its only member leaves without a new version.
            solo = await carol.groups.create("solo", [])
            assert not (await carol.groups.leave(solo)).joined


async def long_group(
    admin: Peer, name: str, renames: int
) -> tuple[GroupInfo, GroupState, list[GroupHeader]]:
    """A group of ``admin`` alone, renamed ``renames`` times: its info, its state and the
    headers of every version before it."""
    group = await admin.groups.create(name, [])
    for index in range(renames):
        group = await admin.groups.rename(group, f"name {index}")
    gid = bytes.fromhex(group.group_id)
    held = await admin.run_db(admin.groups._tables.load, gid)
    chain = await admin.run_db(admin.groups._tables.headers, gid, renames + 1)
    assert held is not None
    assert chain is not None
    return group, held.state, chain


@pytest.mark.anyio
async def test_two_admins_changing_one_version_at_once_settle_on_the_smaller_hash(
    tmp_path: Path,
) -> None:
    """Alice and Dave (both admins) each sign a version 2 on the same version 1; Carol and
    Erin get them in opposite orders and both keep the one with the smaller hash."""
    with anyio.fail_after(TIMEOUT * 2):
        async with peers(tmp_path, 4) as (alice, carol, dave, erin):
            group = await alice.groups.create("g", [carol.peer_id, erin.peer_id])
            await alice.groups.add(group, [dave.peer_id], admin=True)
            for member in (carol, dave, erin):
                await member.groups.wait_version(group, 1)
            held = await alice.run_db(alice.groups._tables.load, bytes.fromhex(group.group_id))
            assert held is not None
            base = held.state
            by_alice = forge(base, alice, name="alice's name")
            by_dave = forge(base, dave, name="dave's name")
            winner, loser = sorted((by_alice, by_dave), key=GroupState.digest)
            signer = {by_alice: alice, by_dave: dave}
            for member, order in ((carol, (winner, loser)), (erin, (loser, winner))):
                for state in order:
                    sender = signer[state]
                    await sender.send_app(member.peer_id, GROUP_APP, GroupPayload(state).encode())
                    await flushed(sender, member)
                settled = await member.groups.get(group)
                assert settled.version == 2
                assert settled.name == winner.name
            # A later version built on the loser does not extend what they hold.
            refused = carol.groups.stats["refused"]
            on_loser = forge(loser, signer[loser], name="built on the loser")
            await signer[loser].send_app(carol.peer_id, GROUP_APP, GroupPayload(on_loser).encode())
            await flushed(signer[loser], carol)
            assert carol.groups.stats["refused"] == refused + 1
            assert (await carol.groups.get(group)).name == winner.name
