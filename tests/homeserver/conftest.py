"""Homeserver tests: a real homeserver-lite on loopback (Hypercorn on trio, in a thread) on
each storage backend, driven by matrix-nio (an asyncio client) and raw HTTP (aiohttp)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from teia.homeserver.identity import IdentityService
from teia.homeserver.server import Homeserver
from teia.homeserver.service import HomeserverConfig, running_homeserver

from .pg import PostgresCluster, postgres_cluster

BACKENDS = ["sqlite", "postgresql"]
_counter = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # matrix-nio and aiohttp are asyncio libraries


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    with postgres_cluster() as cluster:
        yield cluster


@dataclass
class ServerHandle:
    url: str
    server_name: str
    hs: Homeserver
    config: HomeserverConfig
    stop: Callable[[], None]
    trio_token: Any = None
    identity: IdentityService | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await fn(*args)`` on the server's trio loop, from the test's thread."""
        return trio.from_thread.run(fn, *args, trio_token=self.trio_token)


@contextlib.contextmanager
def serve_in_thread(config: HomeserverConfig) -> Iterator[ServerHandle]:
    """Serve ``config`` on trio in a background thread until the block ends."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            state["scope"] = scope
            state["token"] = trio.lowlevel.current_trio_token()
            async with running_homeserver(config) as running:
                state["running"] = running
                started.set()
                await trio.sleep_forever()

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test thread
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=target, name="homeserver", daemon=True)
    thread.start()
    assert started.wait(60), "homeserver did not start"
    if "error" in state:
        raise state["error"]

    def stop() -> None:
        if thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
            thread.join(30)
        if "error" in state:
            raise state["error"]

    running = state["running"]
    handle = ServerHandle(
        running.url, config.server_name, running.hs, config, stop, state["token"], running.identity
    )
    try:
        yield handle
    finally:
        stop()


def base_config(tmp_path: Path, database: str, **overrides: Any) -> HomeserverConfig:
    config = HomeserverConfig(
        server_name="localhost",
        listen="127.0.0.1:0",
        data_dir=tmp_path / f"hs{next(_counter)}",
        database=database,
        password_memory_kib=1024,  # Argon2id, cheap for tests
        password_iterations=1,
        log_level="warning",
    )
    return replace(config, **overrides)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_for(request: pytest.FixtureRequest, backend: str) -> Callable[[], str]:
    """Makes a fresh database on the backend under test (a new PostgreSQL database each)."""

    def make() -> str:
        if backend == "sqlite":
            return "sqlite"
        cluster: PostgresCluster = request.getfixturevalue("pg")
        return cluster.create_database(f"hs_{next(_counter)}_{threading.get_ident() % 10000}")

    return make


@pytest.fixture
def server(tmp_path: Path, database_for: Callable[[], str]) -> Iterator[ServerHandle]:
    with serve_in_thread(base_config(tmp_path, database_for())) as handle:
        yield handle


@contextlib.asynccontextmanager
async def nio_client(url: str, user: str) -> AsyncIterator[Any]:
    from nio import AsyncClient, AsyncClientConfig

    client = AsyncClient(url, user, config=AsyncClientConfig(encryption_enabled=False))
    try:
        yield client
    finally:
        await client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_config(tmp_path: Path, name: str) -> HomeserverConfig:
    """A SQLite homeserver named after its own loopback address (so others can reach it)."""
    address = f"127.0.0.1:{_free_port()}"
    return base_config(tmp_path / name, "sqlite", server_name=address, listen=address)


@contextlib.contextmanager
def two_servers(tmp_path: Path) -> Iterator[tuple[ServerHandle, ServerHandle]]:
    """Two federating homeservers on loopback: (A, B)."""
    config_a, config_b = server_config(tmp_path, "a"), server_config(tmp_path, "b")
    with serve_in_thread(config_b) as server_b, serve_in_thread(config_a) as server_a:
        yield server_a, server_b


async def http_user(http: Any, user: str, device_id: str | None = None) -> dict[str, str]:
    """Register ``user`` over plain HTTP; the ``Authorization`` header of its session."""
    body: dict[str, Any] = {"username": user, "password": "pw", "auth": {"type": "m.login.dummy"}}
    if device_id is not None:
        body["device_id"] = device_id
    reply = await http.post("/_matrix/client/v3/register", json=body)
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}
