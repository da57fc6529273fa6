"""``teia demo`` (what ``make demo`` runs) ends by itself with every message intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEIA = str(Path(sys.executable).with_name("teia"))


def test_network_demo_delivers_every_path_intact() -> None:
    done = subprocess.run(
        [TEIA, "demo", "--messages", "2", "--seed", "7", "--timeout", "150"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "alice→bob: direct" in out
    assert "alice→carol: stored" in out
    assert "carol→bob: relayed" in out
    assert "bob→carol: relayed" in out
    assert "demo finished: 10 messages delivered, every one intact" in out
    assert "Traceback" not in done.stderr


def test_crypto_tour() -> None:
    done = subprocess.run(
        [TEIA, "demo", "--crypto", "--messages", "5", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every message arrived intact" in done.stdout
