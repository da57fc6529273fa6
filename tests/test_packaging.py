"""The abi3 wheel installs with pip into a clean virtualenv, with no compiler involved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    maturin = Path(sys.executable).with_name("maturin")
    subprocess.run(
        [str(maturin), "build", "--release", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("teia-*.whl")
    return built


def test_wheel_is_abi3_and_carries_the_extension_and_stubs(wheel: Path) -> None:
    assert "-cp311-abi3-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("teia/_native") and n.endswith(".so") for n in names)
    assert "teia/_native.pyi" in names
    assert "teia/py.typed" in names


def test_wheel_installs_and_runs_without_a_compiler(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Only the venv and the system's basic tools on PATH: no cargo, no rustc, no C compiler.
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": str(tmp_path), "CC": "/bin/false", "CARGO": "/bin/false"}
    for var in ("PIP_FIND_LINKS", "PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if var in os.environ:
            env[var] = os.environ[var]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--only-binary=:all:"]
    # Dependencies come from the index as wheels (or from the running interpreter's cache).
    subprocess.run([*pip, str(wheel)], check=True, env=env, cwd=tmp_path)
    assert shutil.which("teia", path=str(venv / "bin"))
    run = subprocess.run(
        [str(venv / "bin" / "teia"), "--help"], check=True, env=env, capture_output=True, text=True
    )
    assert "usage: teia" in run.stdout
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import teia._native as n, teia.crypto; print(n.__version__)",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip()
