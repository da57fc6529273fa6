"""``teia homeserver`` (and ``python -m teia.homeserver``) as a process: --help, ready on
loopback, a client registers and talks, metrics scraped, SIGTERM stops it cleanly and the data
survives a restart; config errors; what the process imports and its malloc settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import pytest
from anyio.streams.text import TextReceiveStream

pytestmark = pytest.mark.anyio
TIMEOUT = 60
C = "/_matrix/client/v3"


TEIA_HOMESERVER = [sys.executable, "-m", "teia", "homeserver"]
MODULE = [sys.executable, "-m", "teia.homeserver"]


def command(data_dir: Path, *extra: str, entry: list[str] = TEIA_HOMESERVER) -> list[str]:
    return [
        *entry, "--server-name", "hs.test",
        "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--metrics", "127.0.0.1:0",
        "--log-format", "json", "--password-memory-kib", "1024", "--password-iterations", "1",
        *extra,
    ]  # fmt: skip


async def _ready(stream: TextReceiveStream) -> dict[str, object]:
    buffered = ""
    seen = []
    async for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split("\n")
        seen += lines
        for line in lines:
            if '"event": "ready"' in line:
                return dict(json.loads(line))
    raise AssertionError(f"never ready; saw {seen}")


@pytest.mark.parametrize("entry", [TEIA_HOMESERVER, MODULE], ids=["teia", "module"])
def test_help_lists_the_settings(entry: list[str]) -> None:
    out = subprocess.run([*entry, "--help"], capture_output=True, text=True, check=True, timeout=60)
    for flag in ("--server-name", "--listen", "--data-dir", "--config", "--database",
                 "--password-hashes-at-once"):  # fmt: skip
        assert flag in out.stdout


def test_the_module_entry_point_loads_the_homeserver_alone() -> None:
    # every module here is memory the homeserver would hold without using it (issue 10: RSS)
    code = "import sys, teia.homeserver.__main__; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(out.stdout.split())
    assert "teia.homeserver.service" in loaded
    # Ed25519 and Argon2id come from teia's own extension, 2 MiB against cryptography's 6.7
    assert "teia._native" in loaded
    for unused in ("teia.peer", "teia.dht", "teia.store", "teia.relay", "teia.identity",
                   "teia.homeserver.federation", "teia.homeserver.identity",
                   "httpx", "psycopg", "cryptography"):  # fmt: skip
        assert unused not in loaded


def test_teia_homeserver_parses_alone_and_teia_help_lists_every_subcommand() -> None:
    # `teia homeserver` builds a parser with the homeserver's subcommand only (teia.cli._ALONE)
    code = (
        "import sys; from teia.cli import build_parser; build_parser(['homeserver']); "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(out.stdout.split())
    assert "teia.homeserver.service" in loaded
    for unused in ("teia.peer", "teia.dht", "teia.store", "teia.relay", "teia.identity",
                   "teia.host", "teia.demo", "cryptography"):  # fmt: skip
        assert unused not in loaded

    from teia.cli import build_parser

    argv = ["homeserver", "--server-name", "hs.test", "--data-dir", "/nonexistent"]
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))
    listed = subprocess.run(
        [sys.executable, "-m", "teia", "--help"], capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout  # fmt: skip
    for name in ("init", "id", "ping", "identify", "discovery", "lookup", "relay", "store",
                 "homeserver", "contacts", "send", "inbox", "chat", "peer", "group", "device",
                 "file", "demo"):  # fmt: skip
        assert f"    {name} " in listed or f"    {name}\n" in listed, name


def _in_subprocess(code: str, **env: str) -> str:
    """What ``code`` prints, run by a fresh interpreter (malloc settings are process-wide)."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        env={**environ, **env},
    )  # fmt: skip
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings are glibc's")
def test_malloc_arenas_are_capped_unless_the_operator_set_them() -> None:
    code = "from teia.homeserver.memory import limit_arenas as f; print(f(2))"
    assert _in_subprocess(code) == "True"
    assert _in_subprocess(code, MALLOC_ARENA_MAX="4") == "False"


def test_bad_config_is_an_error(tmp_path: Path) -> None:
    out = subprocess.run(
        command(tmp_path, "--database", "mysql://x"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "database" in out.stderr


async def test_service_serves_counts_stops_and_keeps_data(tmp_path: Path) -> None:
    token = ""
    with anyio.fail_after(TIMEOUT):
        for run in range(2):
            # the restart through the module entry point: the same flags, the same data
            entry = TEIA_HOMESERVER if run == 0 else MODULE
            async with await anyio.open_process(
                command(tmp_path / "data", entry=entry), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as process:  # fmt: skip
                assert process.stderr is not None
                ready = await _ready(TextReceiveStream(process.stderr))
                url = str(ready["listen"])
                async with aiohttp.ClientSession() as http:
                    if run == 0:
                        async with http.post(url + C + "/register", json={
                            "username": "ana", "password": "segredo",
                            "auth": {"type": "m.login.dummy"},
                        }) as response:  # fmt: skip
                            assert response.status == 200
                            token = (await response.json())["access_token"]
                        async with http.get(
                            f"http://127.0.0.1:{ready['metrics_port']}/metrics"
                        ) as response:
                            metrics = await response.text()
                        assert 'teia_homeserver_logins_total{kind="register",outcome="ok"} 1.0' in (
                            metrics
                        )
                        assert "segredo" not in metrics
                    else:
                        headers = {"Authorization": f"Bearer {token}"}
                        async with http.get(url + C + "/account/whoami",
                                            headers=headers) as response:  # fmt: skip
                            assert (await response.json())["user_id"] == "@ana:hs.test"
                process.terminate()
                assert await process.wait() == 0
    key = (tmp_path / "data" / "signing.key").stat()
    assert key.st_mode & 0o777 == 0o600
