"""The store database: deposits, tombstones, quotas, expiry, bundles, restarts, and the canary."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from teia.crypto import OneTimePrekey, PrekeyBundle, Session, SignedPrekey
from teia.errors import StoreDatabaseError
from teia.identity import Identity
from teia.store.auth import inbox_for
from teia.store.messages import Status, Tombstone
from teia.store.storage import InboxStore, StoredEnvelope, StoreLimits

T0 = 1_800_000_000_000


def env(inbox: bytes, payload: bytes = b"p", expires: int = T0 + 1000) -> StoredEnvelope:
    return StoredEnvelope(inbox, os.urandom(16), payload, T0, expires)


def test_deposit_fetch_pages_and_remove(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    with InboxStore(tmp_path / "s.db") as store:
        items = [env(inbox) for _ in range(25)]
        assert store.deposit_batch(items) == [Status.OK] * 25
        assert store.deposit_batch(items[:2]) == [Status.DUPLICATE] * 2
        seen = []
        cursor = b""
        for _ in range(10):
            page = store.fetch(inbox, cursor, 10, 1 << 20, T0)
            seen += [e.message_id for e in page.envelopes]
            cursor = page.cursor
            if not page.more:
                break
        assert seen == [e.message_id for e in items]
        unknown = os.urandom(16)
        assert store.remove(inbox, [items[0].message_id, unknown], T0 + 5000) == 1
        # Acknowledged (and even never-seen) IDs stay refused until the tombstone expires.
        assert store.deposit_batch([items[0], StoredEnvelope(inbox, unknown, b"", T0, T0 + 9)]) == [
            Status.GONE,
            Status.GONE,
        ]
        assert store.usage(inbox) == (24, 24)
        assert store.envelope_count == 24


def test_fetch_pages_stop_at_the_byte_limit(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    with InboxStore(tmp_path / "s.db") as store:
        store.deposit_batch([env(inbox, b"x" * 1000) for _ in range(5)])
        page = store.fetch(inbox, b"", 100, 2500, T0)
        assert len(page.envelopes) == 2
        assert page.more


def test_quotas(tmp_path: Path) -> None:
    limits = StoreLimits(max_inbox_envelopes=3, max_inbox_bytes=100, max_total_bytes=150)
    a, b = os.urandom(32), os.urandom(32)
    with InboxStore(tmp_path / "s.db", limits=limits) as store:
        first = [env(a, b"x" * 10) for _ in range(4)]
        assert store.deposit_batch(first) == [Status.OK] * 3 + [Status.INBOX_FULL]
        # A duplicate of a held envelope is still recognised when the inbox is full.
        assert store.deposit_batch([first[0]]) == [Status.DUPLICATE]
        assert store.deposit_batch([env(b, b"x" * 101)]) == [Status.INBOX_FULL]
        c = os.urandom(32)
        assert store.deposit_batch([env(b, b"x" * 90), env(c, b"x" * 90)]) == [
            Status.OK,
            Status.STORE_FULL,
        ]
        assert store.total_bytes == 120
        # Acknowledging frees quota.
        store.remove(a, [first[0].message_id], T0 + 10)
        assert store.deposit_batch([env(a, b"y")]) == [Status.OK]


def test_expiry_purges_envelopes_then_tombstones(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    with InboxStore(tmp_path / "s.db") as store:
        short, long = env(inbox, expires=T0 + 100), env(inbox, expires=T0 + 10_000)
        store.deposit_batch([short, long])
        store.remove(inbox, [long.message_id], T0 + 99_999)
        assert store.fetch(inbox, b"", 10, 1 << 20, T0 + 100).envelopes == []
        assert store.purge_expired(T0 + 100) == (1, 0)
        assert store.inbox_count == 0
        # The tombstone lives as long as the envelope it covers would have.
        assert store.deposit_batch([long]) == [Status.GONE]
        assert store.purge_expired(T0 + 10_000) == (0, 1)
        assert store.deposit_batch([long]) == [Status.OK]


def test_tombstones_from_replicas_and_digests(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    with InboxStore(tmp_path / "a.db") as a, InboxStore(tmp_path / "b.db") as b:
        items = [env(inbox) for _ in range(3)]
        a.deposit_batch(items)
        b.deposit_batch(items)
        assert a.digests([inbox], T0) == b.digests([inbox], T0)
        b.remove(inbox, [items[1].message_id], T0 + 1000)
        assert a.digests([inbox], T0) != b.digests([inbox], T0)
        _, tombs = b.inbox_state(inbox, T0)
        assert a.apply_tombstones(inbox, tombs) == 1
        assert a.digests([inbox], T0) == b.digests([inbox], T0)
        assert a.forget(inbox, [items[0].message_id], [items[1].message_id]) == 1
        assert a.inbox_state(inbox, T0) == ([items[2].message_id], [])
        assert a.inboxes() == [inbox]


def test_bundles_hand_each_one_time_prekey_out_once(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    with InboxStore(tmp_path / "s.db", limits=StoreLimits(max_one_time_prekeys=3)) as store:
        assert store.take_bundle(inbox) is None
        assert store.put_bundle(inbox, b"B1", [b"k1", b"k2"], replace=False, now_ms=T0) == 2
        assert store.put_bundle(inbox, b"B2", [b"k3", b"k4"], replace=False, now_ms=T0) == 3
        taken = [store.take_bundle(inbox) for _ in range(4)]
        assert taken == [(b"B2", b"k2", 2), (b"B2", b"k3", 1), (b"B2", b"k4", 0), (b"B2", b"", 0)]
        assert store.put_bundle(inbox, b"B3", [b"k5"], replace=True, now_ms=T0) == 1


def test_restart_keeps_everything(tmp_path: Path) -> None:
    inbox = os.urandom(32)
    path = tmp_path / "data" / "s.db"
    with InboxStore(path) as store:
        items = [env(inbox, b"abc") for _ in range(5)]
        store.deposit_batch(items)
        store.remove(inbox, [items[0].message_id], T0 + 1000)
        store.put_bundle(inbox, b"B", [b"k"], replace=False, now_ms=T0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with InboxStore(path) as store:
        assert store.usage(inbox) == (4, 12)
        assert [e.message_id for e in store.fetch(inbox, b"", 10, 1 << 20, T0).envelopes] == [
            e.message_id for e in items[1:]
        ]
        assert store.deposit_batch([items[0]]) == [Status.GONE]
        assert store.take_bundle(inbox) == (b"B", b"k", 0)


def test_unusable_files_are_typed_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreDatabaseError, match="move it aside"):
        InboxStore(garbage)
    store = InboxStore(tmp_path / "s.db")
    store.close()
    with pytest.raises(StoreDatabaseError, match="closed"):
        store.deposit_batch([env(os.urandom(32))])
    other = tmp_path / "other.db"
    import sqlite3

    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreDatabaseError, match="some other"):
        InboxStore(other)


def test_canary_plaintext_never_reaches_the_database(tmp_path: Path) -> None:
    """Real sealed messages (X3DH + Double Ratchet): the file holds ciphertext only."""
    alice, bob = Identity.generate(), Identity.generate()
    signed = SignedPrekey.generate(bob.private_seed, 1)
    one_time = OneTimePrekey.generate(7)
    bundle = PrekeyBundle(
        bob.public_key, 1, signed.public_key, signed.signature, 7, one_time.public_key
    )
    session = Session.initiate(alice.private_seed, bundle)
    canaries = [f"CANARY-{i}-{os.urandom(8).hex()}-meet at the mill".encode() for i in range(50)]
    inbox = inbox_for(bob.public_key)
    path = tmp_path / "s.db"
    with InboxStore(path) as store:
        items = [
            StoredEnvelope(inbox, os.urandom(16), session.encrypt(text), T0, T0 + 1000)
            for text in canaries
        ]
        assert store.deposit_batch(items) == [Status.OK] * 50
        page = store.fetch(inbox, b"", 100, 1 << 20, T0)
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("s.db"))
        assert page.envelopes[0].payload in raw  # the ciphertext is there...
        for text in canaries:
            assert text not in raw  # ...the plaintext never
            assert b"CANARY" not in raw
        # And the recipient reads them back.
        bob_session, first = Session.accept(
            bob.private_seed, signed, one_time, page.envelopes[0].payload
        )
        assert first == canaries[0]
        assert [bob_session.decrypt(e.payload) for e in page.envelopes[1:]] == canaries[1:]


def test_tombstone_type_round_trip() -> None:
    assert Tombstone(b"x" * 16, 5).expires_at_ms == 5


def test_nonces_are_kept_refused_twice_purged_on_expiry_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    first, second = os.urandom(16), os.urandom(16)
    with InboxStore(path) as store:
        assert store.nonces_complete is False  # a new database knows no earlier nonce
        assert store.remember_nonce(first, T0 + 60_000, T0)
        assert not store.remember_nonce(first, T0 + 60_000, T0 + 10)  # a replay
        assert store.remember_nonce(second, T0 + 90_000, T0 + 10)
    with InboxStore(path) as store:
        assert store.nonces_complete is True
        assert store.nonces(T0 + 20, 10) == [(second, T0 + 90_000), (first, T0 + 60_000)]
        assert store.nonces(T0 + 20, 1) == [(second, T0 + 90_000)]
        assert not store.remember_nonce(first, T0 + 60_000, T0 + 20)
        # An expired nonce that was not purged yet does not count as a replay.
        third = os.urandom(16)
        assert store.remember_nonce(third, T0 + 30, T0 + 25)
        assert store.remember_nonce(third, T0 + 100_000, T0 + 31)
        assert store.nonce_count == 3
        # Expired: no longer in force, gone at the next purge.
        assert store.nonces(T0 + 60_001, 10) == [(third, T0 + 100_000), (second, T0 + 90_000)]
        assert store.purge_expired(T0 + 60_001) == (0, 0)
        assert store.nonce_count == 2
        # Or on the way, at most once a second.
        assert store.remember_nonce(os.urandom(16), T0 + 200_000, T0 + 95_000)
        assert store.nonce_count == 2


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    inbox = os.urandom(32)
    with InboxStore(path) as store:
        store.deposit_batch([env(inbox)])
    with sqlite3.connect(path) as db:  # as version 1 left it
        db.execute("DROP TABLE auth_nonces")
        db.execute("PRAGMA user_version = 1")
    db.close()
    with InboxStore(path) as store:
        assert store.nonces_complete is False  # the old node's nonces are unknown
        assert store.usage(inbox)[0] == 1
        assert store.remember_nonce(os.urandom(16), T0 + 1000, T0)
    with InboxStore(path) as store:
        assert store.nonces_complete is True
        assert store.nonce_count == 1
