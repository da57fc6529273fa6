"""The Ansible deployment on real hosts: podman containers running systemd.

`make test` runs this as root on a machine with podman (scripts/bootstrap-system.sh installs
it, scripts/podman-image.sh builds the bare-host image once). The molecule ``cluster`` scenario
creates the lab's containers on a podman network of its own, converges them with the site
playbook, converges again expecting no change, runs the testinfra and controller checks
(ansible/molecule/cluster/tests) and destroys them. Nothing here addresses any other host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"

pytestmark = pytest.mark.slow


def _run(argv: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1", PY_COLORS="0", ANSIBLE_FORCE_COLOR="0")
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs it (dev extra, bootstrap-system.sh)"
    return path


def test_roles_and_playbooks_pass_ansible_lint_production_profile() -> None:
    lint = _run(
        [_tool("ansible-lint"), "--profile", "production", "--offline", "ansible", "inventories"],
        cwd=REPO,
        timeout=600,
    )
    assert lint.returncode == 0, lint.stdout[-6000:] + lint.stderr[-3000:]


def test_cluster_scenario_converges_idempotently_and_serves_peers() -> None:
    _tool("podman")
    image = _run(["bash", "scripts/podman-image.sh"], cwd=REPO, timeout=900)
    assert image.returncode == 0, image.stderr[-3000:]
    wheels = _run(["make", "--no-print-directory", "wheelhouse"], cwd=REPO, timeout=900)
    assert wheels.returncode == 0, wheels.stdout[-3000:] + wheels.stderr[-3000:]
    molecule = _run([_tool("molecule"), "test", "-s", "cluster"], cwd=ANSIBLE, timeout=1800)
    output = molecule.stdout + molecule.stderr
    (REPO / "target").mkdir(exist_ok=True)
    (REPO / "target" / "molecule-cluster.log").write_text(output)
    assert molecule.returncode == 0, output[-12000:]
    assert "idempotence: Executed: Successful" in output
    assert re.search(r"=+ \d+ passed in ", output), "the verifier ran no test"
