"""The peer's database commits on every message's path (issue 7), measured alone.

`queue_many` is what `Peer.send` commits before the envelope leaves (history row, outbox entry,
session state), `mark_delivered` what the acknowledgement commits, `record_incoming` what the
recipient commits before it acknowledges; one message at a time (the latency path) and 64 at a
time (what concurrent senders share). The profile already holds `HISTORY` messages in one
conversation, the sessions are the size of a real pair's, texts have five words. `extra_info`
has the WAL pages one commit writes (``wal pages``): what a commit costs the disk and every
checkpoint after it. `merge_search` (2,048 tokens into the index) runs on the database thread
when nobody waits; it is timed too.

Figures go to ``extra_info`` and the benchmark table; nothing asserts a timing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teia.identity.keystore import KdfParams
from teia.peer import PeerConfig, Profile
from teia.peer.db import PeerDatabase
from teia.peer.peer import _MessageIds

PASSPHRASE = "benchmark passphrase"
HISTORY = 20_000
PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
SESSION = os.urandom(728)  # a serialised session after a few hundred messages
_ids = _MessageIds()
_version = [0]


def _records(count: int, db: PeerDatabase) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        stamp = db.next_timestamp()
        out.append(
            {
                "message_id": _ids.take(),
                "sent_ms": stamp,
                "text": f"lunch at noon number {stamp}",
                "kind": 1,
                "plaintext": b"",
                "envelope": os.urandom(180),
                "conversation": PEER,
            }
        )
    return out


def _sessions() -> tuple[int, list[bytes]]:
    _version[0] += 1
    return _version[0], [SESSION]


def _incoming(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "message_id": r["message_id"],
            "conversation": PEER,
            "sent_ms": r["sent_ms"],
            "text": r["text"],
            "receipts": (),
            "used_one_time_prekey": None,
            "base_key": None,
            "app": None,
        }
        for r in records
    ]


@pytest.fixture(scope="module")
def db() -> Iterator[PeerDatabase]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "p"
        Profile.create(
            directory, PASSPHRASE, kdf=KdfParams(memory_kib=8, iterations=1), config=PeerConfig()
        ).close()
        with Profile.open(directory, PASSPHRASE) as profile:
            database = profile.db
            for _ in range(HISTORY // 128):
                sent = _records(64, database)
                database.queue_many(PEER, PEER, sent, _sessions())
                database.mark_delivered(PEER, [(r["message_id"], "direct", 1.0) for r in sent])
                database.record_incoming(
                    peer_id=PEER,
                    identity_key=bytes(32),
                    records=_incoming(_records(64, database)),
                    sessions=_sessions(),
                    path="direct",
                )
            database.merge_search()
            yield database


def _wal_pages(db: PeerDatabase, call: Callable[[], object], label: str) -> float:
    """WAL frames one call appends (the WAL is emptied first; autocheckpoint cannot run)."""
    db.read("PRAGMA wal_checkpoint(TRUNCATE)")
    call()
    wal = db.path.with_name(db.path.name + "-wal")
    pages = max(0, wal.stat().st_size - 32) / (24 + 4096)
    print(f"{label}: {pages:.0f} WAL pages per commit")
    return pages


@pytest.mark.benchmark(group="peer-db")
@pytest.mark.parametrize("batch", [1, 64])
def test_send_commit(benchmark: Any, db: PeerDatabase, batch: int) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (PEER, PEER, _records(batch, db), _sessions()), {}

    benchmark.pedantic(db.queue_many, setup=setup, rounds=200 if batch == 1 else 40)
    benchmark.extra_info["messages per commit"] = batch
    benchmark.extra_info["wal pages"] = _wal_pages(
        db, lambda: db.queue_many(PEER, PEER, _records(batch, db), _sessions()), f"send {batch}"
    )


@pytest.mark.benchmark(group="peer-db")
@pytest.mark.parametrize("batch", [1, 64])
def test_delivered_commit(benchmark: Any, db: PeerDatabase, batch: int) -> None:
    def queued() -> list[tuple[bytes, str, float]]:
        records = _records(batch, db)
        db.queue_many(PEER, PEER, records, _sessions())
        return [(r["message_id"], "direct", 1.0) for r in records]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (PEER, queued()), {}

    benchmark.pedantic(db.mark_delivered, setup=setup, rounds=200 if batch == 1 else 40)
    benchmark.extra_info["messages per commit"] = batch
    deliveries = queued()
    benchmark.extra_info["wal pages"] = _wal_pages(
        db, lambda: db.mark_delivered(PEER, deliveries), f"delivered {batch}"
    )


@pytest.mark.benchmark(group="peer-db")
@pytest.mark.parametrize("batch", [1, 64])
def test_receive_commit(benchmark: Any, db: PeerDatabase, batch: int) -> None:
    def arguments() -> dict[str, Any]:
        return {
            "peer_id": PEER,
            "identity_key": bytes(32),
            "records": _incoming(_records(batch, db)),
            "sessions": _sessions(),
            "path": "direct",
        }

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), arguments()

    benchmark.pedantic(db.record_incoming, setup=setup, rounds=200 if batch == 1 else 40)
    benchmark.extra_info["messages per commit"] = batch
    kwargs = arguments()
    benchmark.extra_info["wal pages"] = _wal_pages(
        db, lambda: db.record_incoming(**kwargs), f"receive {batch}"
    )


@pytest.mark.benchmark(group="peer-db")
def test_search_merge(benchmark: Any, db: PeerDatabase) -> None:
    """2,048 recent tokens (≈ 400 messages) moved into the index, sorted."""

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        db.merge_search()
        while not db.search_merge_due:
            db.queue_many(PEER, PEER, _records(16, db), _sessions())
        return (), {}

    benchmark.pedantic(db.merge_search, setup=setup, rounds=10)
