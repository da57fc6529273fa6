"""``--check-config`` and ``--print-peer-id``: what deployment tools ask a service before
starting it (the Ansible handlers validate a config before a restart; the playbooks read each
node's peer ID to wire the others' bootstrap addresses)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from teia.cli import main
from teia.errors import ConfigError
from teia.identity import PeerId
from teia.service.config import ServiceConfig, add_arguments, setting
from teia.service.runner import main as service_main


@dataclass
class DemoConfig(ServiceConfig):
    port: int = setting(4001, "a port", check=lambda v: None if v < 65536 else "too big")


def test_check_config_accepts_a_good_file_without_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'listen = "127.0.0.1:3478"\nauth-secret-file = "{secret}"\ndata-dir = "{tmp_path}/r"\n'
    )
    assert main(["relay", "--config", str(config), "--check-config"]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()  # nothing created, nothing bound


@pytest.mark.parametrize(
    ("service", "toml", "reason"),
    [
        ("relay", 'listen = "127.0.0.1:3478"\n', "no credentials"),
        ("relay", 'user = ["a:b"]\nauth-secret-file = "/nonexistent/secret"\n', "auth-secret-file"),
        ("relay", 'user = ["a:b"]\nrelay-port-min = 50000\n', "relay-port-min"),
        ("relay", 'user = ["a:b"]\nlisten = "nowhere"\n', "listen"),
        ("store", "min-ttl-days = 10\ndefault-ttl-days = 8\n", "min-ttl-days"),
        ("store", 'bootstrap = ["/ip4/10.0.0.1/udp/1/quic-v1"]\n', "bootstrap"),
        ("discovery", "k = 0\n", "k "),
        ("discovery", "unknown = 1\n", "unknown setting"),
        ("homeserver", "unknown = 1\n", "unknown setting"),
    ],
)
def test_check_config_refuses_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], service: str, toml: str, reason: str
) -> None:
    config = tmp_path / "service.toml"
    config.write_text(toml)
    assert main([service, "--config", str(config), "--check-config"]) == 1
    err = capsys.readouterr().err
    assert f"teia {service}: error:" in err
    assert reason in err


@pytest.mark.parametrize("service", ["discovery", "store"])
def test_print_peer_id_creates_the_identity_once_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], service: str
) -> None:
    data_dir = tmp_path / service
    argv = [service, "--data-dir", str(data_dir), "--print-peer-id"]
    assert main(argv) == 0
    first = capsys.readouterr().out.strip()
    PeerId.from_string(first)
    (key,) = data_dir.iterdir()
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == first


def test_print_peer_id_only_where_a_service_has_an_identity() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--print-peer-id"])
    args = parser.parse_args(["--check-config", "--port", "70000"])

    async def never(ctx: object) -> None:  # pragma: no cover - check-config never runs it
        raise AssertionError

    with pytest.raises(ConfigError, match="port"):
        service_main("demo", DemoConfig, args, never)
