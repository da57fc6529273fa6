"""The SQLite file a service keeps (the DHT node's table and records, the store node's inboxes).

Each service wraps these helpers in its own class and error type: the file is created 0600
before SQLite opens it (so no byte of it is ever readable by others; its -wal and -shm files
take its mode), opened in WAL mode with ``synchronous=NORMAL`` (a commit survives the process
dying, not a power cut), checked with ``PRAGMA quick_check`` when it is opened again, and
written in ``BEGIN IMMEDIATE`` transactions under the service's lock. Every SQLite failure
surfaces as the service's error, with the file's name and nothing of its content.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "check_integrity",
    "create_schema",
    "open_private",
    "reading",
    "transaction",
    "use_wal",
]


def open_private(path: Path, error: type[Exception], what: str) -> sqlite3.Connection:
    """Create ``path`` (mode 0600, its folder 0700) unless it exists, and connect to it for
    one thread at a time under the caller's lock; ``what`` names the file in errors ("the DHT
    store"). Nothing is read yet: `use_wal` is the first statement, which fails on a file that
    is not a database."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as exc:
        raise error(f"cannot create {what} {path}: {exc}") from None
    try:
        return sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    except sqlite3.Error as exc:
        raise error(f"cannot open {what} {path}: {exc}") from None


def use_wal(connection: sqlite3.Connection) -> None:
    """WAL mode, ``synchronous=NORMAL``."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


def check_integrity(connection: sqlite3.Connection, path: Path, error: type[Exception]) -> None:
    """``PRAGMA quick_check``; the service's error when the file fails it."""
    result = connection.execute("PRAGMA quick_check").fetchone()[0]
    if result != "ok":
        raise error(f"{path} failed SQLite's integrity check ({result}); move it aside")


def create_schema(connection: sqlite3.Connection, schema: str, version: int) -> None:
    """Run ``schema`` (statements separated by ``;``) and set ``user_version`` to ``version``,
    in one transaction."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in schema.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {int(version)}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


@contextmanager
def transaction(
    lock: threading.Lock,
    current: Callable[[], sqlite3.Connection | None],
    error: type[Exception],
    name: str,
) -> Iterator[sqlite3.Connection]:
    """Under ``lock``, a ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled
    back when it raises. ``current`` gives the connection, read under the lock (None once the
    service closed its file); ``name`` ("the DHT store /path") starts the error messages."""
    with reading(lock, current, error, name) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


@contextmanager
def reading(
    lock: threading.Lock,
    current: Callable[[], sqlite3.Connection | None],
    error: type[Exception],
    name: str,
) -> Iterator[sqlite3.Connection]:
    """Under ``lock``, the connection for reads (each statement its own snapshot)."""
    with lock:
        connection = current()
        if connection is None:
            raise error(f"{name} is closed")
        try:
            yield connection
        except sqlite3.Error as exc:
            raise error(f"{name}: {exc}") from None
