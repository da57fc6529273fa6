"""Device lists as DHT values: what a node accepts under ``/teia-devices/`` keys (sans-IO, with
explicit time), every refusal, property tests of the validator on hostile bytes, snapshots, and
a put/get through real discovery nodes on loopback."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.dht.core import DhtCore, Mode
from teia.dht.devicelists import (
    DEVICE_LIST_KEY_PREFIX,
    DEVICE_LIST_LIFETIME_MS,
    DeviceListRecord,
    account_from_key,
    device_list_key,
)
from teia.dht.messages import Message, MessageType, Record
from teia.dht.records import record_key
from teia.dht.storage import DhtStore
from teia.errors import (
    BadRecordSignature,
    ExpiredRecord,
    FutureRecord,
    InvalidRecord,
    MalformedRecord,
    OversizeRecord,
    RecordKeyMismatch,
    StaleRecord,
)
from teia.identity import Identity, PeerId
from teia.identity.devicelist import MAX_DEVICE_LIST_SIZE, DeviceList

from .test_node import dial_addr, running_node, start_servers

NOW = 1_700_000_000_000


def identity(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"devices" + n.to_bytes(4, "big")).digest())


ACCOUNT = identity(0)
DEVICES = [identity(n).peer_id for n in (1, 2, 3)]


def listed(
    version: int = 1, devices: list[PeerId] | None = None, *, issued: int = NOW
) -> DeviceList:
    return DeviceList.sign(ACCOUNT, version, devices or DEVICES[:2], issued_ms=issued)


def put(data: bytes, key: bytes) -> Message:
    return Message(MessageType.PUT_VALUE, key=key, record=Record(key=key, value=data))


def get(key: bytes) -> Message:
    return Message(MessageType.GET_VALUE, key=key)


KEY = device_list_key(ACCOUNT.peer_id)
SENDER = identity(99).peer_id


def test_a_genuine_list_is_a_value_under_its_account_key() -> None:
    device_list = listed(3)
    record = DeviceListRecord.decode(device_list.encode(), now_ms=NOW, key=KEY)
    assert record == DeviceListRecord.of(device_list)
    assert record.device_list == device_list
    assert record.peer_id == ACCOUNT.peer_id
    assert record.seq == 3
    assert record.key == KEY == DEVICE_LIST_KEY_PREFIX + ACCOUNT.peer_id.to_bytes()
    assert account_from_key(KEY) == ACCOUNT.peer_id
    assert record.expires_at_ms == NOW + DEVICE_LIST_LIFETIME_MS
    assert not record.is_expired(NOW + DEVICE_LIST_LIFETIME_MS)
    assert record.is_expired(NOW + DEVICE_LIST_LIFETIME_MS + 1)


def test_every_refusal_has_its_reason() -> None:
    genuine = listed().encode()
    # Signed by another key with this account's key written in: the signature fails.
    forged = DeviceList.sign(identity(7), 1, DEVICES[:2], issued_ms=NOW).encode()
    forged = forged[:4] + ACCOUNT.public_key + forged[36:]
    flipped = bytearray(genuine)
    flipped[-1] ^= 1
    cases: list[tuple[bytes, bytes, int, type[InvalidRecord]]] = [
        (forged, KEY, NOW, BadRecordSignature),
        (bytes(flipped), KEY, NOW, BadRecordSignature),
        (genuine[:-1], KEY, NOW, MalformedRecord),
        (genuine + b"\0", KEY, NOW, MalformedRecord),
        (b"\0" * (MAX_DEVICE_LIST_SIZE + 1), KEY, NOW, OversizeRecord),
        (genuine, device_list_key(identity(5).peer_id), NOW, RecordKeyMismatch),
        (genuine, DEVICE_LIST_KEY_PREFIX + b"\x00\x01", NOW, RecordKeyMismatch),
        (listed(issued=NOW + 6 * 60_000).encode(), KEY, NOW, FutureRecord),
        (genuine, KEY, NOW + DEVICE_LIST_LIFETIME_MS + 1, ExpiredRecord),
    ]
    for data, key, now, error in cases:
        with pytest.raises(error):
            DeviceListRecord.decode(data, now_ms=now, key=key)
        # A node refuses it the same way and stores nothing.
        core = DhtCore(SENDER, mode=Mode.SERVER)
        with pytest.raises(error):
            core.handle_request(identity(98).peer_id, put(data, key), now)
        assert len(core.store) == 0


@given(st.binary(max_size=MAX_DEVICE_LIST_SIZE + 64))
def test_garbage_is_refused_with_a_typed_error(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        DeviceListRecord.decode(data, now_ms=NOW, key=KEY)


@given(st.data())
def test_truncated_or_corrupted_lists_are_refused(data: st.DataObject) -> None:
    genuine = listed(2, DEVICES).encode()
    cut = data.draw(st.integers(0, len(genuine) - 1))
    with pytest.raises((MalformedRecord, BadRecordSignature)):
        DeviceListRecord.decode(genuine[:cut], now_ms=NOW, key=KEY)
    at = data.draw(st.integers(0, len(genuine) - 1))
    bit = data.draw(st.integers(0, 7))
    corrupted = bytearray(genuine)
    corrupted[at] ^= 1 << bit
    with pytest.raises(InvalidRecord):
        DeviceListRecord.decode(bytes(corrupted), now_ms=NOW, key=KEY)


def test_a_node_keeps_the_newest_version_and_serves_it() -> None:
    core = DhtCore(SENDER, mode=Mode.SERVER)
    peer = identity(98).peer_id
    v1, v2 = listed(1), listed(2, DEVICES)
    assert core.handle_request(peer, put(v1.encode(), KEY), NOW).type is MessageType.PUT_VALUE
    assert core.handle_request(peer, put(v2.encode(), KEY), NOW)
    answer = core.handle_request(peer, get(KEY), NOW)
    assert answer.record is not None
    assert answer.record.value == v2.encode()
    # A re-publish of the held version is fine; an older one, or the same version with other
    # devices (a conflict only a forger or a broken primary makes), is refused as stale.
    core.handle_request(peer, put(v2.encode(), KEY), NOW)
    with pytest.raises(StaleRecord):
        core.handle_request(peer, put(v1.encode(), KEY), NOW)
    with pytest.raises(StaleRecord):
        core.handle_request(peer, put(listed(2, DEVICES[:1]).encode(), KEY), NOW)
    answer = core.handle_request(peer, get(KEY), NOW)
    assert answer.record is not None
    assert answer.record.value == v2.encode()
    # Past its lifetime it is no longer served.
    gone = core.handle_request(peer, get(KEY), NOW + DEVICE_LIST_LIFETIME_MS + 1)
    assert gone.record is None
    # A peer record under the account's peer key is another value altogether.
    assert core.handle_request(peer, get(record_key(ACCOUNT.peer_id)), NOW).record is None


def test_lists_survive_a_snapshot_and_expire_in_it(tmp_path: Path) -> None:
    core = DhtCore(SENDER, mode=Mode.SERVER)
    record = DeviceListRecord.of(listed(4))
    assert core.store_record(record, NOW)
    with DhtStore(tmp_path / "dht.db") as store:
        for value in core.store.take_dirty():
            store.put_record(
                value.key, value.peer_id, value.seq, value.expires_at_ms, value.envelope
            )
        rows = store.iter_records(NOW)
    restored = DhtCore(SENDER, mode=Mode.SERVER)
    for row in rows:
        assert restored.restore_record(row.key, row.envelope, NOW)
    assert restored.store.get(KEY, NOW) == record
    late = DhtCore(SENDER, mode=Mode.SERVER)
    assert not late.restore_record(KEY, record.envelope, NOW + DEVICE_LIST_LIFETIME_MS + 1)
    assert len(late.store) == 0


@pytest.mark.anyio
async def test_a_list_put_by_one_peer_is_found_by_a_stranger() -> None:
    with anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            servers = await start_servers(stack, 3, small=True)
            bootstrap = [dial_addr(s) for s in servers]
            owner = await stack.enter_async_context(running_node(mode=Mode.CLIENT, small=True))
            stranger = await stack.enter_async_context(running_node(mode=Mode.CLIENT, small=True))
            await owner.bootstrap(bootstrap)
            await stranger.bootstrap(bootstrap)
            now = servers[0]._clock()
            v1 = DeviceListRecord.of(listed(1, issued=now))
            assert await owner.put_value(v1) == 3
            found = await stranger.get_value(KEY, quorum=0)
            assert found == v1
            # A newer version replaces it everywhere; the stale one is refused by every node.
            v2 = DeviceListRecord.of(listed(2, DEVICES, issued=now))
            assert await owner.put_value(v2) == 3
            assert await stranger.put_value(v1) == 0
            assert await stranger.get_value(KEY, quorum=0) == v2
            # Nothing under an account that published nothing.
            assert await stranger.get_value(device_list_key(identity(6).peer_id)) is None
