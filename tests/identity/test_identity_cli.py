"""``teia init`` and ``teia id``, in process and as a subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from teia.cli import main
from teia.identity import PeerId, keystore
from teia.identity.keystore import KdfParams, load_identity

PASS = "s3cret passphrase"
TEIA = Path(sys.executable).with_name("teia")


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEIA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TEIA_PASSPHRASE", raising=False)
    monkeypatch.setattr(keystore, "DEFAULT_KDF", KdfParams(memory_kib=8, iterations=1))


class _Terminal:
    def isatty(self) -> bool:
        return True


def _prompts(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    asked: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return asked


# --- in process -----------------------------------------------------------------------------


def test_init_then_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEIA_PASSPHRASE", PASS)
    assert main(["init"]) == 0
    out, err = capsys.readouterr()
    path = tmp_path / "home" / "identity.key"
    assert f"created {path}" in err
    peer_id = PeerId.from_string(out.strip())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path, PASS).peer_id == peer_id
    assert PASS not in out + err

    assert main(["id"]) == 0
    assert capsys.readouterr().out.strip() == str(peer_id)
    assert main(["id", "--cid"]) == 0
    assert capsys.readouterr().out.strip() == peer_id.to_cid()


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEIA_PASSPHRASE", PASS)
    path = tmp_path / "k.key"
    assert main(["init", "--keystore", str(path)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["init", "--keystore", str(path)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["init", "--keystore", str(path), "--force"]) == 0
    second = capsys.readouterr().out.strip()
    assert first != second
    assert str(load_identity(path, PASS).peer_id) == second


def test_wrong_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEIA_PASSPHRASE", PASS)
    assert main(["init"]) == 0
    monkeypatch.setenv("TEIA_PASSPHRASE", "not it")
    capsys.readouterr()
    assert main(["id"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("teia id: error: wrong passphrase")
    assert "not it" not in err


def test_passphrase_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "pass.txt"
    file.write_text(PASS + "\r\nsecond line ignored\n")
    monkeypatch.setenv("TEIA_PASSPHRASE", "ignored")
    assert main(["init", "--passphrase-file", str(file)]) == 0
    capsys.readouterr()
    monkeypatch.delenv("TEIA_PASSPHRASE")
    assert load_identity(tmp_path / "home" / "identity.key", PASS)
    assert main(["id", "--passphrase-file", str(file)]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\n", "is empty"), (b"\xff\xfe", "not UTF-8"), (None, "cannot read")],
)
def test_bad_passphrase_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    file = tmp_path / "pass.txt"
    if content is not None:
        file.write_bytes(content)
    assert main(["init", "--passphrase-file", str(file)]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_empty_environment_passphrase(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEIA_PASSPHRASE", "")
    assert main(["init"]) == 1
    assert "TEIA_PASSPHRASE is set but empty" in capsys.readouterr().err


def test_no_passphrase_and_no_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class _Pipe:
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stdin", _Pipe())
    assert main(["init"]) == 1
    assert "no passphrase: set TEIA_PASSPHRASE" in capsys.readouterr().err


def test_interactive_init_asks_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = _prompts(monkeypatch, [PASS, PASS, PASS])
    assert main(["init"]) == 0
    assert len(asked) == 2
    assert main(["id"]) == 0
    assert len(asked) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1]


@pytest.mark.parametrize(
    ("answers", "message"),
    [([PASS, "typo"], "do not match"), ([""], "is empty")],
)
def test_interactive_init_failures(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answers: list[str],
    message: str,
) -> None:
    _prompts(monkeypatch, answers)
    assert main(["init"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "home" / "identity.key").exists()


def test_interactive_end_of_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr("getpass.getpass", eof)
    assert main(["init"]) == 1
    assert "no passphrase entered" in capsys.readouterr().err


def test_id_without_keystore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "--keystore", str(tmp_path / "none.key")]) == 1
    assert "create one with `teia init`" in capsys.readouterr().err


def test_id_refuses_an_exposed_keystore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TEIA_PASSPHRASE", PASS)
    assert main(["init"]) == 0
    (tmp_path / "home" / "identity.key").chmod(0o644)
    assert main(["id"]) == 1
    assert "chmod 600" in capsys.readouterr().err


# --- as a subprocess -------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TEIA), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEIA_")}
    env["TEIA_HOME"] = str(tmp_path / "sub")
    return env


def test_subprocess_help() -> None:
    for args in (["--help"], ["init", "--help"], ["id", "--help"]):
        result = _run(args, dict(os.environ))
        assert result.returncode == 0, result.stderr
        assert "usage: teia" in result.stdout
    assert "--passphrase-file" in _run(["init", "--help"], dict(os.environ)).stdout
    assert "--cid" in _run(["id", "--help"], dict(os.environ)).stdout


def test_subprocess_init_id_and_errors(tmp_path: Path, child_env: dict[str, str]) -> None:
    # No passphrase source and stdin not a terminal: a clear error, no traceback.
    result = _run(["init"], child_env)
    assert result.returncode == 1
    assert "no passphrase" in result.stderr
    assert "Traceback" not in result.stderr

    child_env["TEIA_PASSPHRASE"] = PASS
    result = _run(["init"], child_env)
    assert result.returncode == 0, result.stderr
    peer_id = PeerId.from_string(result.stdout.strip())
    path = tmp_path / "sub" / "identity.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path, PASS).peer_id == peer_id  # default (64 MiB) parameters

    result = _run(["id"], child_env)
    assert (result.returncode, result.stdout.strip()) == (0, str(peer_id))

    result = _run(["init"], child_env)
    assert result.returncode == 1
    assert "already exists" in result.stderr

    child_env["TEIA_PASSPHRASE"] = "wrong"
    result = _run(["id"], child_env)
    assert result.returncode == 1
    assert "wrong passphrase" in result.stderr
    assert "Traceback" not in result.stderr
    assert PASS not in result.stdout + result.stderr
