"""The profile on disk: keystore, config, the database sealed at rest, contacts, search."""

from __future__ import annotations

import hmac
import os
import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia import _native
from teia.errors import ConfigError, InvalidChatMessage, ProfileError, WrongPassphrase
from teia.identity import Identity
from teia.peer import PeerConfig, Profile, format_safety_number, safety_number
from teia.peer import db as peer_db
from teia.peer.db import PeerDatabase, RowCipher
from teia.peer.wire import (
    AckStatus,
    ChatAck,
    ChatEnvelope,
    Kind,
    Plaintext,
    open_sealed,
    seal_to,
)

from .conftest import FAST_KDF, PASSPHRASE, make_profile


def test_create_open_and_refuse(tmp_path: Path) -> None:
    directory = make_profile(tmp_path / "p", listen=["/ip4/127.0.0.1/udp/4001/quic-v1"])
    assert directory.stat().st_mode & 0o077 == 0
    with Profile.open(directory, PASSPHRASE) as profile:
        assert profile.config.listen == ["/ip4/127.0.0.1/udp/4001/quic-v1"]
        assert profile.config.retry_interval == 0.2
    for name in ("identity.key", "config.toml", "peer.db"):
        assert (directory / name).stat().st_mode & 0o077 == 0, name
    with pytest.raises(WrongPassphrase):
        Profile.open(directory, "not it")
    with pytest.raises(ProfileError, match="already holds"):
        Profile.create(directory, PASSPHRASE, kdf=FAST_KDF)
    with pytest.raises(ProfileError, match="teia init"):
        Profile.open(tmp_path / "nothing", PASSPHRASE)
    (directory / "config.toml").write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        Profile.open(directory, PASSPHRASE)
    (directory / "config.toml").write_text("attachment_accept = 'friends'\n")
    with pytest.raises(ConfigError, match="attachment_accept"):
        Profile.open(directory, PASSPHRASE)


def test_a_keystore_alone_becomes_a_profile(tmp_path: Path) -> None:
    from teia.identity import keystore

    identity = Identity.generate()
    keystore.save_identity(identity, tmp_path / "identity.key", PASSPHRASE, kdf=FAST_KDF)
    with Profile.open(tmp_path, PASSPHRASE) as profile:
        assert profile.identity == identity
        assert profile.config == PeerConfig()
    assert (tmp_path / "config.toml").exists()


def test_sealed_rows_and_search(tmp_path: Path) -> None:
    directory = make_profile(tmp_path / "p")
    other = Identity.generate()
    with Profile.open(directory, PASSPHRASE) as profile:
        db = profile.db
        for i, text in enumerate(["Lunch at noon?", "noon works", "Zebra crossing"]):
            db.queue_outgoing(
                peer_id=str(other.peer_id),
                conversation=str(other.peer_id),
                message_id=bytes([i]) * 16,
                sent_ms=i,
                text=text,
                kind=int(Kind.TEXT),
                plaintext=Plaintext(text).encode(),
            )
        assert [m.text for m in db.search("NOON")] == ["noon works", "Lunch at noon?"]
        assert [m.text for m in db.search("lunch noon")] == ["Lunch at noon?"]
        assert db.search("noo") == []
        assert db.search("  ") == []
        assert [m.text for m in db.history(str(other.peer_id))] == [
            "Lunch at noon?",
            "noon works",
            "Zebra crossing",
        ]
        assert len(db.outbox()) == 3
    raw = b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())
    assert b"Zebra" not in raw
    assert b"zebra" not in raw
    assert b"noon" not in raw
    # A sealed value moved to another row does not open there.
    connection = sqlite3.connect(directory / "peer.db")
    connection.execute("UPDATE messages SET body = (SELECT body FROM messages WHERE seq = 1)")
    connection.commit()
    connection.close()
    with Profile.open(directory, PASSPHRASE) as profile, pytest.raises(ProfileError):
        profile.db.history(str(other.peer_id))


def _queue(db: PeerDatabase, peer: str, index: int, text: str) -> None:
    db.queue_outgoing(
        peer_id=peer,
        conversation=peer,
        message_id=index.to_bytes(16, "big"),
        sent_ms=index,
        text=text,
        kind=int(Kind.TEXT),
        plaintext=Plaintext(text).encode(),
    )


def _unindexed(db: PeerDatabase) -> int:
    return int(db.read("SELECT count(*) FROM search_recent")[0][0])


def test_search_reads_recent_and_merged_tokens_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_db, "_RECENT_TOKENS", 6)
    monkeypatch.setattr(peer_db, "_RECENT_TOKENS_CAP", 12)
    peer = str(Identity.generate().peer_id)
    with Profile.open(make_profile(tmp_path / "p"), PASSPHRASE) as profile:
        db = profile.db
        _queue(db, peer, 1, "alpha beta")
        _queue(db, peer, 2, "beta gamma")
        assert _unindexed(db) == 4
        assert not db.search_merge_due
        _queue(db, peer, 3, "gamma alpha")
        assert db.search_merge_due
        db.merge_search()
        assert _unindexed(db) == 0
        assert not db.search_merge_due
        _queue(db, peer, 4, "alpha delta")  # "alpha": merged for 1 and 3, recent for 4
        assert [m.text for m in db.search("alpha")] == ["alpha delta", "gamma alpha", "alpha beta"]
        assert [m.text for m in db.search("delta alpha")] == ["alpha delta"]
        assert [m.text for m in db.search("beta")] == ["beta gamma", "alpha beta"]
        # Nobody merges: the transaction that reaches the cap does it.
        for index in range(5, 12):
            _queue(db, peer, index, f"word{index} other{index}")
        assert _unindexed(db) < 12
        assert [m.text for m in db.search("word5")] == ["word5 other5"]
        assert len(db.search("alpha")) == 3


def test_a_rolled_back_message_leaves_no_tokens_and_the_count_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_db, "_RECENT_TOKENS", 4)
    peer = str(Identity.generate().peer_id)
    with Profile.open(make_profile(tmp_path / "p"), PASSPHRASE) as profile:
        db = profile.db
        _queue(db, peer, 1, "one two three")

        def fails_after_the_history_row() -> None:
            with db.transaction() as conn:
                db.insert_history(
                    conn,
                    message_id=bytes(16),
                    peer_id=peer,
                    conversation=peer,
                    outgoing=True,
                    sent_ms=5,
                    text="four five six",
                    state="pending",
                )
                raise RuntimeError("a later step of the same transaction failed")

        with pytest.raises(RuntimeError):
            fails_after_the_history_row()
        assert _unindexed(db) == 3
        assert not db.search_merge_due  # 3 tokens, not 6
        assert db.search("five") == []
        _queue(db, peer, 2, "seven")
        assert db.search_merge_due


def test_a_version_2_profile_database_is_upgraded(tmp_path: Path) -> None:
    directory = make_profile(tmp_path / "p")
    peer = str(Identity.generate().peer_id)
    with Profile.open(directory, PASSPHRASE) as profile:
        _queue(profile.db, peer, 1, "kept through the upgrade")
        profile.db.merge_search()
    connection = sqlite3.connect(directory / "peer.db")  # as schema version 2 left it
    connection.executescript("DROP TABLE search_recent; PRAGMA user_version = 2;")
    connection.close()
    with Profile.open(directory, PASSPHRASE) as profile:
        assert profile.db.read("PRAGMA user_version")[0][0] == peer_db.SCHEMA_VERSION == 3
        assert [m.text for m in profile.db.search("upgrade")] == ["kept through the upgrade"]
        _queue(profile.db, peer, 2, "after the upgrade")
        assert [m.text for m in profile.db.search("upgrade")] == [
            "after the upgrade",
            "kept through the upgrade",
        ]


@given(st.binary(min_size=32, max_size=32), st.lists(st.text(max_size=40), max_size=20))
def test_search_tokens_are_truncated_hmac_sha256_of_each_word(
    seed: bytes, words: list[str]
) -> None:
    cipher = RowCipher(seed)
    key = cipher._search_key
    expected = [hmac.digest(key, w.encode(), "sha256")[:16] for w in words]
    assert _native.search_tokens(key, words) == expected
    assert [cipher.token(w) for w in words] == expected
    text = " ".join(words)
    assert cipher.tokens(text) == {
        hmac.digest(key, w.casefold().encode(), "sha256")[:16] for w in re.findall(r"\w+", text)
    }


def test_contacts_rebinding_a_name_marks_the_change(tmp_path: Path) -> None:
    first, second = Identity.generate(), Identity.generate()
    with Profile.open(make_profile(tmp_path / "p"), PASSPHRASE) as profile:
        db = profile.db
        contact, previous = db.upsert_contact(
            str(first.peer_id), first.public_key, name="bob", addrs=["/ip4/1.2.3.4/udp/1/quic-v1"]
        )
        assert previous is None
        assert contact.trust == "unverified"
        db.set_trust(contact.peer_id, "verified")
        contact, previous = db.upsert_contact(str(first.peer_id), first.public_key, name="bob")
        assert previous is None
        assert contact.trust == "verified"
        assert contact.addrs == ("/ip4/1.2.3.4/udp/1/quic-v1",)
        contact, previous = db.upsert_contact(str(second.peer_id), second.public_key, name="bob")
        assert previous is not None
        assert previous.peer_id == str(first.peer_id)
        assert contact.trust == "unverified-changed"
        assert contact.previous_peer_id == str(first.peer_id)
        old = db.contact(str(first.peer_id))
        assert old is not None
        assert old.name is None


def test_safety_numbers() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()

    def number(x: Identity, y: Identity) -> str:
        return safety_number(x.public_key, x.peer_id.to_bytes(), y.public_key, y.peer_id.to_bytes())

    assert number(a, b) == number(b, a)
    assert len(number(a, b)) == 60
    assert number(a, b).isdigit()
    assert number(a, c) != number(a, b)
    shown = format_safety_number(number(a, b))
    assert len(shown.splitlines()) == 3
    assert all(len(g) == 5 for g in shown.split())


def test_wire_codecs_round_trip_and_refuse() -> None:
    envelope = ChatEnvelope(os.urandom(16), b"\x00\x24" + os.urandom(36), "", 7, Kind.TEXT, b"x")
    assert ChatEnvelope.decode(envelope.encode()) == envelope
    ack = ChatAck(envelope.message_id, AckStatus.REFUSED)
    assert ChatAck.decode(ack.encode()) == ack
    text = Plaintext("olá", (os.urandom(16),))
    assert Plaintext.decode(text.encode()) == text
    for bad in (b"", b"\xff", envelope.encode()[:-1], envelope.encode() + envelope.encode()):
        with pytest.raises(InvalidChatMessage):
            ChatEnvelope.decode(bad)
    with pytest.raises(InvalidChatMessage):
        Plaintext("x" * 70_000).encode()
    me, them = Identity.generate(), Identity.generate()
    sealed = seal_to(me.public_key, b"inner")
    assert open_sealed(me.private_seed, sealed) == b"inner"
    with pytest.raises(InvalidChatMessage):
        open_sealed(them.private_seed, sealed)
    with pytest.raises(InvalidChatMessage):
        open_sealed(me.private_seed, sealed[:-1] + bytes([sealed[-1] ^ 1]))
