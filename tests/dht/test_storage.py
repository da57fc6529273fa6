"""DhtStore: real SQLite files — rules, quotas, reopen, corruption, threads."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import anyio
import pytest

from teia.dht.records import PeerRecord, record_key
from teia.dht.storage import (
    SCHEMA_VERSION,
    DhtStore,
    ProviderEntry,
    RoutingEntry,
    StoredRecord,
)
from teia.errors import DhtQuotaExceeded, DhtStoreError
from teia.identity import Identity, Multiaddr

NOW = 1_700_000_000_000
PEERS = [Identity.from_seed(bytes([index]) * 32) for index in range(1, 6)]
ADDR = Multiaddr("/ip4/192.0.2.1/udp/4001/quic-v1")
RELAYED = Multiaddr(f"/ip4/198.51.100.7/udp/4001/quic-v1/p2p/{PEERS[0].peer_id}/p2p-circuit")
ADDR6 = Multiaddr("/ip6/2001:db8::1/udp/4001/quic-v1")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "dht.sqlite3"


def put(store: DhtStore, identity: Identity, seq: int, expires_at_ms: int = NOW + 1000) -> bool:
    key = record_key(identity.peer_id)
    return store.put_record(key, identity.peer_id, seq, expires_at_ms, b"envelope %d" % seq)


def test_file_and_directory_permissions_and_pragmas(path: Path) -> None:
    with DhtStore(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        connection.close()


def test_records_higher_seq_wins(path: Path) -> None:
    with DhtStore(path) as store:
        alice = PEERS[0]
        assert store.get_record(record_key(alice.peer_id)) is None
        assert put(store, alice, 10)
        assert not put(store, alice, 10)  # equal: the held one stays
        assert not put(store, alice, 9)
        assert put(store, alice, 11)
        stored = store.get_record(record_key(alice.peer_id))
        assert stored == StoredRecord(
            record_key(alice.peer_id), alice.peer_id, 11, NOW + 1000, b"envelope 11"
        )
        assert store.count_records() == 1


def test_expiry_and_purge(path: Path) -> None:
    with DhtStore(path) as store:
        put(store, PEERS[0], 1, expires_at_ms=NOW)
        put(store, PEERS[1], 1, expires_at_ms=NOW + 10)
        store.add_provider(b"cid", PEERS[2].peer_id, [ADDR], NOW - 1)
        store.add_provider(b"cid", PEERS[3].peer_id, [ADDR], NOW + 10)
        key = record_key(PEERS[0].peer_id)
        assert store.get_record(key, now_ms=NOW) is not None
        assert store.get_record(key, now_ms=NOW + 1) is None
        assert store.get_record(key) is not None  # no clock: whatever is held
        assert [r.peer_id for r in store.iter_records(NOW + 1)] == [PEERS[1].peer_id]
        assert len(store.iter_records()) == 2
        assert store.purge_expired(NOW + 1) == 2  # one record, one provider
        assert store.count_records() == 1
        assert [p.provider for p in store.get_providers(b"cid", NOW - 100)] == [PEERS[3].peer_id]


def test_record_quota(path: Path) -> None:
    with DhtStore(path, max_records=2) as store:
        put(store, PEERS[0], 1)
        put(store, PEERS[1], 1)
        with pytest.raises(DhtQuotaExceeded):
            put(store, PEERS[2], 1)
        assert put(store, PEERS[0], 2)  # replacing a held record is not a new one
        assert store.count_records() == 2
        store.purge_expired(NOW + 10_000)
        assert put(store, PEERS[2], 1)


def test_routing_replace_and_reload(path: Path) -> None:
    first = [
        RoutingEntry(PEERS[0].peer_id, (ADDR, RELAYED), NOW),
        RoutingEntry(PEERS[1].peer_id, (), NOW + 5),
    ]
    second = [RoutingEntry(PEERS[2].peer_id, (ADDR6,), NOW + 1)]
    with DhtStore(path) as store:
        store.save_routing(first)
        assert store.load_routing() == [first[1], first[0]]  # most recently seen first
        store.save_routing(second)
        assert store.load_routing() == second
        store.save_routing(first)
    with DhtStore(path, max_routing_entries=1) as store:
        assert store.load_routing() == [first[1], first[0]]
        with pytest.raises(DhtQuotaExceeded):
            store.save_routing(first)
        assert len(store.load_routing()) == 2  # nothing was written


def test_providers(path: Path) -> None:
    with DhtStore(path, max_providers_per_key=2) as store:
        store.add_provider(b"cid", PEERS[0].peer_id, [ADDR], NOW + 10)
        store.add_provider(b"cid", PEERS[1].peer_id, [ADDR6, RELAYED], NOW + 20)
        store.add_provider(b"cid", PEERS[0].peer_id, [ADDR6], NOW + 30)  # a refresh
        with pytest.raises(DhtQuotaExceeded):
            store.add_provider(b"cid", PEERS[2].peer_id, [], NOW + 10)
        store.add_provider(b"other", PEERS[2].peer_id, [], NOW + 10)
        assert store.get_providers(b"cid", NOW) == [
            ProviderEntry(b"cid", PEERS[0].peer_id, (ADDR6,), NOW + 30),
            ProviderEntry(b"cid", PEERS[1].peer_id, (ADDR6, RELAYED), NOW + 20),
        ]
        assert len(store.get_providers(b"cid", NOW, limit=1)) == 1
        assert store.get_providers(b"cid", NOW + 25) == [
            ProviderEntry(b"cid", PEERS[0].peer_id, (ADDR6,), NOW + 30)
        ]
        assert store.get_providers(b"none", NOW) == []


def test_everything_survives_reopen(path: Path) -> None:
    record = PeerRecord.create(PEERS[0].peer_id, [ADDR, RELAYED], ["/teia/chat/1.0.0"]).sign(
        PEERS[0]
    )
    routing = [RoutingEntry(PEERS[1].peer_id, (ADDR,), NOW)]
    store = DhtStore(path)
    assert store.put_record(
        record.key, record.peer_id, record.seq, record.expires_at_ms, record.envelope
    )
    store.save_routing(routing)
    store.add_provider(b"cid", PEERS[2].peer_id, [ADDR6], NOW + 10)
    store.close()
    store.close()  # idempotent
    with pytest.raises(DhtStoreError, match="closed"):
        store.count_records()

    with DhtStore(path) as reopened:
        stored = reopened.get_record(record.key)
        assert stored is not None
        assert stored.envelope == record.envelope
        assert stored.seq == record.seq
        assert reopened.load_routing() == routing
        assert [p.provider for p in reopened.get_providers(b"cid", NOW)] == [PEERS[2].peer_id]
        assert not reopened.put_record(record.key, record.peer_id, record.seq, 0, b"older")


def test_garbage_file_is_a_clear_error(path: Path) -> None:
    path.parent.mkdir()
    path.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(DhtStoreError, match="not a usable DHT store"):
        DhtStore(path)


def test_corrupted_pages_are_a_clear_error(path: Path) -> None:
    with DhtStore(path) as store:
        for index in range(300):
            key = b"key %d" % index
            store.put_record(key, PEERS[0].peer_id, 1, NOW, b"x" * 500)
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:8192] = b"\xa5" * 4096  # smash a page in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(DhtStoreError, match="move it aside"):
        DhtStore(path)  # the integrity check at open finds it


def test_other_database_and_newer_schema(path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE messages (id INTEGER)")
    connection.commit()
    connection.close()
    with pytest.raises(DhtStoreError, match="other SQLite database"):
        DhtStore(other)

    DhtStore(path).close()
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.commit()
    connection.close()
    with pytest.raises(DhtStoreError, match="upgrade teia"):
        DhtStore(path)


def test_tampered_rows_are_a_clear_error(path: Path) -> None:
    with DhtStore(path) as store:
        put(store, PEERS[0], 1)
        store.save_routing([RoutingEntry(PEERS[1].peer_id, (ADDR,), NOW)])
    connection = sqlite3.connect(path)
    connection.execute("UPDATE records SET peer_id = x'0102'")
    connection.execute("UPDATE routing SET addrs = x'05ff'")
    connection.commit()
    connection.close()
    with DhtStore(path) as store:
        with pytest.raises(DhtStoreError, match="peer ID"):
            store.get_record(record_key(PEERS[0].peer_id))
        with pytest.raises(DhtStoreError, match="address"):
            store.load_routing()


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(DhtStoreError, match="cannot create"):
        DhtStore(blocker / "dht.sqlite3")


def test_threads_share_one_store(path: Path) -> None:
    with DhtStore(path) as store:
        errors: list[BaseException] = []

        def writer(offset: int) -> None:
            try:
                for seq in range(50):
                    store.put_record(b"key %d" % offset, PEERS[0].peer_id, seq, NOW, b"e")
                    store.add_provider(b"cid %d" % offset, PEERS[1].peer_id, [ADDR], NOW)
                    store.count_records()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert store.count_records() == 8
        assert all(store.get_record(b"key %d" % n).seq == 49 for n in range(8))  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_from_worker_threads(path: Path) -> None:
    store = await anyio.to_thread.run_sync(DhtStore, path)
    try:
        async with anyio.create_task_group() as group:
            for index, identity in enumerate(PEERS):
                group.start_soon(anyio.to_thread.run_sync, put, store, identity, index + 1)
        assert await anyio.to_thread.run_sync(store.count_records) == len(PEERS)
    finally:
        await anyio.to_thread.run_sync(store.close)
