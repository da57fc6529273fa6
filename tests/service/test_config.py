"""Service configuration: defaults < TOML file < flags, with typed, named errors."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import ConfigError
from teia.service.config import MAX_CONFIG_SIZE, ServiceConfig, add_arguments, load, setting


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number"


@dataclass
class DemoConfig(ServiceConfig):
    listen: list[str] = setting(["/ip4/127.0.0.1/udp/0/quic-v1"], "listen address")
    data_dir: Path = setting(Path("/var/lib/teia"), "state directory")
    port: int = setting(4001, "a port", check=_port)
    ratio: float = setting(0.5, "a ratio")
    enabled: bool = setting(True, "on or off")
    secret_only_in_file: str = setting("", "not a flag", flag=False)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig)
    return parser.parse_args(argv)


def test_defaults_file_and_flags_in_order(tmp_path: Path) -> None:
    assert load(DemoConfig, parse([])) == DemoConfig()
    config_file = tmp_path / "teia.toml"
    config_file.write_text(
        'listen = ["/ip4/0.0.0.0/udp/4001/quic-v1"]\n'
        'data-dir = "~/teia"\nport = 5000\nratio = 1\nenabled = false\n'
        'log_level = "debug"\nsecret_only_in_file = "x"\n'
    )
    from_file = load(DemoConfig, parse(["--config", str(config_file)]))
    assert from_file.listen == ["/ip4/0.0.0.0/udp/4001/quic-v1"]
    assert from_file.data_dir == Path("~/teia").expanduser()
    assert (from_file.port, from_file.ratio, from_file.enabled) == (5000, 1.0, False)
    assert from_file.log_level == "debug"
    assert from_file.secret_only_in_file == "x"
    flags = parse(
        ["--config", str(config_file), "--port", "6000", "--listen", "/ip4/1.2.3.4/udp/1/quic-v1",
         "--listen", "/ip6/::1/udp/1/quic-v1", "--enabled", "--ratio", "0.25"]
    )  # fmt: skip
    merged = load(DemoConfig, flags)
    assert merged.port == 6000
    assert merged.listen == ["/ip4/1.2.3.4/udp/1/quic-v1", "/ip6/::1/udp/1/quic-v1"]
    assert merged.enabled is True
    assert merged.ratio == 0.25
    assert merged.data_dir == Path("~/teia").expanduser()


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ("nonsense = 1", "unknown setting 'nonsense'"),
        ('port = "4001"', "port .*must be an integer"),
        ("port = true", "port .*must be an integer"),
        ("port = 70000", "port .*must be a port number"),
        ("listen = '/ip4/1.2.3.4'", "listen .*must be a list"),
        ("listen = [1]", "listen .*must be a string"),
        ("enabled = 1", "enabled .*true or false"),
        ('log_format = "xml"', "log-format .*'text' or 'json'"),
        ('metrics = "nowhere"', "metrics .*HOST:PORT"),
        ("shutdown_timeout = 0", "shutdown-timeout .*positive"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, toml: str, match: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load(DemoConfig, parse(["--config", str(config_file)]))


def test_bad_flags_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--port \(flag\): must be an integer"):
        load(DemoConfig, parse(["--port", "many"]))
    with pytest.raises(ConfigError, match="cannot read config"):
        load(DemoConfig, parse(["--config", str(tmp_path / "missing.toml")]))
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"# " + b"x" * MAX_CONFIG_SIZE)
    with pytest.raises(ConfigError, match="larger than"):
        load(DemoConfig, parse(["--config", str(huge)]))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(DemoConfig, parse(["--config", str(binary)]))
    with pytest.raises(SystemExit):
        parse(["--secret-only-in-file", "x"])


@given(st.binary(max_size=300))
def test_arbitrary_files_give_a_config_or_a_config_error(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return
    import tomllib

    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(ConfigError):
        load(DemoConfig, file_values=values)


def test_the_shared_address_checks() -> None:
    from teia.service.checks import announce_address, dht_node_address

    node = (
        "/ip4/127.0.0.1/udp/4001/quic-v1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    )
    assert dht_node_address(node) is None
    assert "full address" in (dht_node_address("/ip4/127.0.0.1/udp/4001/quic-v1") or "")
    assert "full address" in (dht_node_address("/ip4/127.0.0.1/tcp/4001") or "")
    assert dht_node_address("not a multiaddr") is not None
    assert announce_address("/ip4/127.0.0.1/udp/4001/quic-v1") is None
    assert "must not carry /p2p" in (announce_address(node) or "")
    assert announce_address("/nonsense") is not None
