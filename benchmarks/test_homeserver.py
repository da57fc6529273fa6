"""Homeserver benchmark (issue 10): the same matrix-nio load against teia's homeserver-lite and
against Synapse (the ``matrix-synapse`` package, SQLite), each started here on 127.0.0.1 in its
own process.

The load (`load`), identical for both: ``ROOMS`` rooms, each with one sending and one
receiving user (matrix-nio ``AsyncClient``s in this process, one asyncio loop). Every sender
awaits ``room_send`` for ``MESSAGES`` messages in a row; every receiver long-polls ``/sync``
(``timeout`` 30 s, timeline limit 100, so no message is skipped) and notes when each message
arrives. ``WARMUP`` messages per room come first and are not counted.

- **messages/s**: counted messages over the time from the first counted send to the last
  counted arrival in a receiver's sync;
- **p50/p99 latency**: from just before ``room_send`` to the receiver's sync answer that
  carries the message;
- **RSS**: the server process's ``VmRSS`` right after the load, and its peak (``VmHWM``), from
  ``/proc/<pid>/status``; that resident set split into private and shared pages (from
  ``smaps_rollup``), and ``VmRSS`` once started, before the load.

Both servers get their rate limits raised out of the way (the load would otherwise measure
them) and neither federates: Synapse's config has no listeners but the client API on
127.0.0.1, an empty federation whitelist and no trusted key servers, stats reporting, URL
previews or presence (teia has no presence), so it contacts no other host. Synapse comes from
its own virtualenv (``make bench`` builds ``.venv-synapse``; ``TEIA_SYNAPSE_PYTHON`` names its
interpreter); without it the Synapse half is skipped and teia's figures still reported.

Figures go to ``extra_info`` and stdout; nothing asserts a timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOMS = int(os.environ.get("TEIA_BENCH_HS_ROOMS", "8"))
MESSAGES = int(os.environ.get("TEIA_BENCH_HS_MESSAGES", "250"))
WARMUP = 10
TIMEOUT = 600.0
LIMITS = "100000"
RESULTS: dict[str, dict[str, float]] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def memory_split_mib(pid: int) -> dict[str, float]:
    """The resident set split, in MiB, from ``/proc/<pid>/smaps_rollup``: *private* pages (this
    process's alone: its heap, stacks, written pages of libraries) and *shared* ones (library
    and file pages other processes map too); ``TEIA_BENCH_HS_SMAPS=DIR`` also keeps the
    process's full ``smaps`` there, for a breakdown by mapping."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    keep = os.environ.get("TEIA_BENCH_HS_SMAPS")
    if keep:
        target = Path(keep) / f"smaps-{pid}.txt"
        target.write_text(Path(f"/proc/{pid}/smaps").read_text())
    private = values["Private_Clean"] + values["Private_Dirty"]
    shared = values["Shared_Clean"] + values["Shared_Dirty"]
    return {"private_mib": private / 1024, "shared_mib": shared / 1024}


@dataclass
class Server:
    name: str
    url: str
    server_name: str
    pid: int


async def _wait_for_line(stream: Any, needle: str, seen: list[str]) -> str:
    """Read ``stream`` (a subprocess pipe) until a line containing ``needle``."""
    buffered = b""
    while True:
        chunk = await stream.receive()
        buffered += chunk
        *lines, rest = buffered.split(b"\n")
        buffered = rest
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            seen.append(line)
            if needle in line:
                return line


async def _drain(stream: Any) -> None:
    """Keep reading a pipe so that a chatty server never blocks on it."""
    try:
        async for _ in stream:
            pass
    except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
        pass


@asynccontextmanager
async def running(
    name: str, command: list[str], needle: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Any, str]]:
    """Start ``command``; yield (process, the stderr line containing ``needle``); stop it."""
    process = await anyio.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    seen: list[str] = []
    try:
        async with anyio.create_task_group() as tg:
            assert process.stderr is not None
            try:
                with anyio.fail_after(120):
                    line = await _wait_for_line(process.stderr, needle, seen)
            except (TimeoutError, anyio.EndOfStream):
                raise RuntimeError(f"{name} did not start:\n" + "\n".join(seen[-40:])) from None
            tg.start_soon(_drain, process.stderr)
            yield process, line
            tg.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def compile_teia() -> None:
    """Write the teia package's bytecode, as installing it does (pip compiles what it installs;
    Synapse's virtualenv has its bytecode). This source tree may run with
    ``PYTHONDONTWRITEBYTECODE``, and a server compiling its modules at every start carries the
    compiler's leftovers: 1.5 to 2 MiB of its RSS."""
    import compileall

    import teia

    compileall.compile_dir(Path(teia.__file__).parent, quiet=1)


@asynccontextmanager
async def teia_server(tmp: Path) -> AsyncIterator[Server]:
    await anyio.to_thread.run_sync(compile_teia)
    # ``python -m teia.homeserver`` is ``teia homeserver`` without the other roles' modules (the
    # entry point docs/homeserver.md gives for a service unit), as Synapse runs from its module
    command = [
        sys.executable, "-m", "teia.homeserver", "--server-name", "localhost",
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp / "teia"), "--log-format", "json",
        "--no-federation", "--ip-rate", LIMITS, "--ip-burst", LIMITS, "--user-rate", LIMITS,
        "--user-burst", LIMITS,
    ]  # fmt: skip
    async with running("teia", command, '"event": "ready"') as (process, line):
        ready = json.loads(line)
        yield Server("teia", str(ready["listen"]), "localhost", process.pid)


def synapse_python() -> str | None:
    python = os.environ.get("TEIA_SYNAPSE_PYTHON")
    if python is None:
        local = Path(__file__).resolve().parents[1] / ".venv-synapse" / "bin" / "python"
        python = str(local) if local.exists() else None
    return python if python and Path(python).exists() else None


def synapse_config(directory: Path, port: int) -> Path:
    """A Synapse configuration for loopback only, SQLite, open registration, relaxed limits."""
    directory.mkdir(parents=True, exist_ok=True)
    log_config = directory / "log.yaml"
    # Synapse's own startup line goes to stderr (the benchmark waits for it); the rest warns.
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "formatters": {"plain": {"format": "%(asctime)s %(name)s %(message)s"}},
                "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
                "loggers": {"synapse.app": {"level": "INFO"}},
                "root": {"level": "WARNING", "handlers": ["console"]},
                "disable_existing_loggers": False,
            }
        )
    )
    relaxed = {"per_second": 100000, "burst_count": 100000}
    config = {
        "server_name": "localhost",
        "pid_file": str(directory / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(log_config),
        "media_store_path": str(directory / "media"),
        "signing_key_path": str(directory / "signing.key"),
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "registration_shared_secret": secrets.token_urlsafe(32),
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "report_stats": False,
        "enable_metrics": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "url_preview_enabled": False,
        "presence": {"enabled": False},
        "rc_message": relaxed,
        "rc_registration": relaxed,
        "rc_login": {"address": relaxed, "account": relaxed, "failed_attempts": relaxed},
        "rc_joins": {"local": relaxed, "remote": relaxed},
        "rc_joins_per_room": relaxed,
        "rc_invites": {"per_room": relaxed, "per_user": relaxed, "per_issuer": relaxed},
        "rc_admin_redaction": relaxed,
        "rc_3pid_validation": relaxed,
        "rc_room_creation": relaxed,
    }
    path = directory / "homeserver.yaml"
    path.write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
    return path


@asynccontextmanager
async def synapse_server(tmp: Path, python: str) -> AsyncIterator[Server]:
    port = free_port()
    config = synapse_config(tmp / "synapse", port)
    with anyio.fail_after(120):
        await anyio.run_process(
            [python, "-m", "synapse.app.homeserver", "-c", str(config), "--generate-keys"],
            cwd=tmp,
        )
    command = [python, "-m", "synapse.app.homeserver", "-c", str(config)]
    async with running("synapse", command, "Synapse now listening") as (process, _):
        yield Server("synapse", f"http://127.0.0.1:{port}", "localhost", process.pid)


# the load (matrix-nio) -----------------------------------------------------------------------


async def _client(url: str, name: str) -> Any:
    from nio import AsyncClient, AsyncClientConfig, RegisterResponse

    client = AsyncClient(url, name, config=AsyncClientConfig(encryption_enabled=False))
    response = await client.register(name, "benchmark password")
    if not isinstance(response, RegisterResponse):
        raise RuntimeError(f"register {name}: {response}")
    return client


async def load(server: Server) -> dict[str, float]:
    """The load script: the same for both servers (see the module docstring)."""
    from nio import JoinResponse, RoomCreateResponse, RoomSendResponse, SyncResponse

    senders = [await _client(server.url, f"s{i}") for i in range(ROOMS)]
    receivers = [await _client(server.url, f"r{i}") for i in range(ROOMS)]
    rooms: list[str] = []
    for sender, receiver in zip(senders, receivers, strict=True):
        created = await sender.room_create(invite=[receiver.user_id])
        assert isinstance(created, RoomCreateResponse), created
        joined = await receiver.join(created.room_id)
        assert isinstance(joined, JoinResponse), joined
        rooms.append(created.room_id)

    total = WARMUP + MESSAGES
    sent_at: dict[str, float] = {}
    arrived_at: dict[str, float] = {}
    done = [asyncio.Event() for _ in range(ROOMS)]
    sync_filter = {"room": {"timeline": {"limit": 100}}}

    async def receive(index: int) -> None:
        client = receivers[index]
        first = await client.sync(timeout=0, sync_filter=sync_filter)
        assert isinstance(first, SyncResponse), first
        ready[index].set()
        seen = 0
        while seen < total:
            response = await client.sync(timeout=30_000, sync_filter=sync_filter)
            now = time.perf_counter()
            if not isinstance(response, SyncResponse):
                raise RuntimeError(f"sync: {response}")
            room = response.rooms.join.get(rooms[index])
            if room is None:
                continue
            for event in room.timeline.events:
                body = getattr(event, "body", None)
                if isinstance(body, str) and body.startswith("m "):
                    arrived_at.setdefault(body, now)
                    seen += 1
        done[index].set()

    async def send(index: int) -> None:
        client = senders[index]
        await ready[index].wait()
        for n in range(total):
            body = f"m {index} {n}"
            sent_at[body] = time.perf_counter()
            response = await client.room_send(
                rooms[index], "m.room.message", {"msgtype": "m.text", "body": body}
            )
            if not isinstance(response, RoomSendResponse):
                raise RuntimeError(f"send: {response}")

    ready = [asyncio.Event() for _ in range(ROOMS)]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(receive(i) for i in range(ROOMS)), *(send(i) for i in range(ROOMS))),
            TIMEOUT,
        )
    finally:
        for client in senders + receivers:
            await client.close()
    counted = [f"m {i} {n}" for i in range(ROOMS) for n in range(WARMUP, total)]
    missing = [body for body in counted if body not in arrived_at]
    if missing:
        raise RuntimeError(f"{len(missing)} messages never arrived in a sync")
    latencies = sorted(arrived_at[b] - sent_at[b] for b in counted)
    start = min(sent_at[b] for b in counted)
    end = max(arrived_at[b] for b in counted)
    rss, peak = memory_kib(server.pid)
    split = memory_split_mib(server.pid)
    return {
        "messages": len(counted),
        "messages_per_s": len(counted) / (end - start),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "rss_mib": rss / 1024,
        "peak_rss_mib": peak / 1024,
        **split,
    }


async def measure(which: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        if which == "teia":
            async with teia_server(tmp) as server:
                idle = memory_kib(server.pid)[0] / 1024
                figures = await load(server)
        else:
            python = synapse_python()
            if python is None:
                pytest.skip("no Synapse virtualenv (make bench builds .venv-synapse)")
            async with synapse_server(tmp, python) as server:
                idle = memory_kib(server.pid)[0] / 1024
                figures = await load(server)
        return {**figures, "idle_rss_mib": idle}


def report(benchmark: Any, which: str, figures: dict[str, float]) -> None:
    benchmark.extra_info.update(figures)
    RESULTS[which] = figures
    for key, value in figures.items():
        print(f"{which} {key}: {value:,.2f}")
    if "teia" in RESULTS and "synapse" in RESULTS:
        teia, synapse = RESULTS["teia"], RESULTS["synapse"]
        print(f"throughput teia/synapse: {teia['messages_per_s'] / synapse['messages_per_s']:.2f}x")
        print(f"p99 latency synapse/teia: {synapse['p99_ms'] / teia['p99_ms']:.2f}x")
        print(f"RSS after load teia/synapse: {teia['rss_mib'] / synapse['rss_mib']:.2f}")


@pytest.mark.benchmark(group="homeserver")
@pytest.mark.parametrize("which", ["teia", "synapse"])
def test_homeserver_send_sync(benchmark: Any, which: str) -> None:
    figures = benchmark.pedantic(
        lambda: anyio.run(measure, which, backend="asyncio"), rounds=1, iterations=1
    )
    report(benchmark, which, figures)
