"""The SQLite helpers the DHT and store nodes share: private files, schema creation in one
transaction, transactions and reads under the service's lock with the service's error."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from teia.service import sqlite as service_sqlite


class ServiceError(Exception):
    pass


def test_the_file_is_private_from_its_first_byte(tmp_path: Path) -> None:
    path = tmp_path / "node" / "data.db"
    connection = service_sqlite.open_private(path, ServiceError, "the test database")
    try:
        service_sqlite.use_wal(connection)
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        connection.close()
    (tmp_path / "blocked").write_text("a file where the folder should be")
    with pytest.raises(ServiceError, match="cannot create the test database"):
        service_sqlite.open_private(
            tmp_path / "blocked" / "data.db", ServiceError, "the test database"
        )


def test_a_schema_is_created_whole_or_not_at_all(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "data.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        service_sqlite.create_schema(connection, "CREATE TABLE a (x); CREATE TABLE (", 3)
    assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 0
    service_sqlite.create_schema(connection, "CREATE TABLE a (x); CREATE TABLE b (y);", 3)
    assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 2
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 3
    connection.execute("INSERT INTO a VALUES (1)")
    service_sqlite.check_integrity(connection, tmp_path / "data.db", ServiceError)
    connection.close()


def test_transactions_commit_roll_back_and_speak_the_services_error(tmp_path: Path) -> None:
    lock = threading.Lock()
    connection: sqlite3.Connection | None = sqlite3.connect(
        tmp_path / "data.db", isolation_level=None, check_same_thread=False
    )
    assert connection is not None
    connection.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")

    def current() -> sqlite3.Connection | None:
        return connection

    name = "the test database"

    def write(*statements: str, fail: bool = False) -> None:
        with service_sqlite.transaction(lock, current, ServiceError, name) as db:
            for statement in statements:
                db.execute(statement)
            if fail:
                raise RuntimeError("a later step failed")

    def read(statement: str) -> list[tuple[int]]:
        with service_sqlite.reading(lock, current, ServiceError, name) as db:
            return db.execute(statement).fetchall()

    write("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError):
        write("INSERT INTO t VALUES (2)", fail=True)
    with pytest.raises(ServiceError, match="the test database: UNIQUE"):
        write("INSERT INTO t VALUES (3)", "INSERT INTO t VALUES (1)")  # the whole of it goes
    assert read("SELECT x FROM t") == [(1,)]
    with pytest.raises(ServiceError, match="no such table"):
        read("SELECT * FROM missing")
    assert not lock.locked()
    connection.close()
    connection = None
    with pytest.raises(ServiceError, match="the test database is closed"):
        write("INSERT INTO t VALUES (4)")
    with pytest.raises(ServiceError, match="the test database is closed"):
        read("SELECT x FROM t")
