"""``teia homeserver`` as a process: --help, ready on loopback, a client registers and talks,
metrics scraped, SIGTERM stops it cleanly and the data survives a restart; config errors."""

from __future__ import annotations

import json
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


def command(data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "teia", "homeserver", "--server-name", "hs.test",
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


def test_help_lists_the_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "teia", "homeserver", "--help"], capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    for flag in ("--server-name", "--listen", "--data-dir", "--config", "--database"):
        assert flag in out.stdout


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
            async with await anyio.open_process(
                command(tmp_path / "data"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ) as process:
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
