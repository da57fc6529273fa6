"""``teia relay``: the STUN/TURN relay service.

Settings come from flags and ``--config FILE`` (TOML; the same names, e.g. ``auth-secret``,
``user = ["alice:…"]``, ``allow-peer = ["127.0.0.0/8"]``). The nonce secret lives in
``DATA_DIR/relay-nonce.key`` (created 0600 on first start), so nonces survive restarts.
Passwords, the REST secret and keys are never logged; the configuration's repr hides them.

Metrics (metadata only): the data plane's counters (datagrams, bytes, packets, drops by
reason, allocations) and the control plane's answers by method and code.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from teia.errors import ConfigError
from teia.relay.auth import DEFAULT_NONCE_LIFETIME, RelayAuthenticator
from teia.relay.policy import RelayPolicy, parse_networks
from teia.relay.server import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    DataPlane,
    RelayServer,
    TurnServerCore,
    TurnSettings,
)
from teia.service import ServiceConfig, ServiceContext, add_arguments, setting
from teia.service.runner import main

__all__ = ["RelayConfig", "build_server", "register", "serve"]

_NONCE_KEY_FILE = "relay-nonce.key"
_MAX_SECRET_FILE = 4096


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); `ValueError` if not."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with an IP address (e.g. 0.0.0.0:3478)")
    ipaddress.ip_address(host)
    return host, int(port)


def _listen(value: Any) -> str | None:
    try:
        split_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def _ip_or_empty(value: Any) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IP address"
    return None


def _cidr(value: Any) -> str | None:
    try:
        parse_networks([value])
    except ValueError as exc:
        return str(exc)
    return None


def _user(value: Any) -> str | None:
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        return "must be NAME:PASSWORD"
    return None


def _port(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0-65535)"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


_SECRET_FIELDS = ("auth_secret", "user")


@dataclass
class RelayConfig(ServiceConfig):
    listen: str = setting(
        "0.0.0.0:3478",
        "UDP and TCP address for STUN/TURN clients",
        metavar="HOST:PORT",
        check=_listen,
    )
    relay_ip: str = setting(
        "", "address relayed sockets bind (default: the listen address)", check=_ip_or_empty
    )
    relay_port_min: int = setting(0, "lowest relayed port (0: the OS chooses)", check=_port)
    relay_port_max: int = setting(0, "highest relayed port (0: the OS chooses)", check=_port)
    realm: str = setting("teia", "realm for long-term credentials", metavar="REALM")
    auth_secret: str = setting(
        "", "shared secret for time-limited (REST) credentials", metavar="SECRET"
    )
    auth_secret_file: Path | None = setting(
        None, "read the REST secret from FILE (first line) instead", metavar="FILE"
    )
    user: list[str] = setting(
        [], "a static user for long-term credentials", metavar="NAME:PASSWORD", check=_user
    )
    allow_peer: list[str] = setting(
        [], "relay to this network even if private/loopback", metavar="CIDR", check=_cidr
    )
    deny_peer: list[str] = setting([], "never relay to this network", metavar="CIDR", check=_cidr)
    data_dir: Path = setting(Path("/var/lib/teia/relay"), "state directory", metavar="DIR")
    max_allocations: int = setting(10_000, "allocations on this relay", check=_positive)
    max_allocations_per_user: int = setting(32, "allocations per user", check=_non_negative)
    max_allocations_per_ip: int = setting(32, "allocations per client IP", check=_non_negative)
    bandwidth: int = setting(
        0, "bytes per second per allocation, each direction (0: unlimited)", check=_non_negative
    )
    nonce_lifetime: float = setting(
        DEFAULT_NONCE_LIFETIME, "seconds before a nonce is stale (438)", check=_positive
    )
    tcp: bool = setting(True, "also serve TURN over TCP on the listen port")
    udp_gso: bool = setting(
        True, "send runs of equal-sized datagrams to one peer as one UDP GSO buffer"
    )

    def validate(self) -> None:
        self.rest_secret()
        if not self.user and not self.auth_secret and self.auth_secret_file is None:
            raise ConfigError("no credentials: give --user NAME:PASSWORD and/or --auth-secret")
        if (self.relay_port_min == 0) != (self.relay_port_max == 0) or (
            self.relay_port_min > self.relay_port_max
        ):
            raise ConfigError(
                "relay-port-min and relay-port-max: give both, min <= max, or neither"
            )

    def rest_secret(self) -> bytes | None:
        """The REST secret, from auth-secret-file if given (read now), else auth-secret."""
        if self.auth_secret_file is not None:
            return _read_secret_file(self.auth_secret_file)
        return self.auth_secret.encode() if self.auth_secret else None

    def __repr__(self) -> str:
        shown = {
            f.name: ("<hidden>" if f.name in _SECRET_FIELDS and getattr(self, f.name) else None)
            or getattr(self, f.name)
            for f in fields(self)
        }
        return "RelayConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _read_secret_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read auth-secret-file {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_SECRET_FILE:
        raise ConfigError(f"auth-secret-file {path} is larger than {_MAX_SECRET_FILE} bytes")
    secret = data.split(b"\n", 1)[0].strip()
    if not secret:
        raise ConfigError(f"auth-secret-file {path} is empty")
    return secret


def _nonce_secret(data_dir: Path) -> bytes:
    """The persistent nonce secret (created once, 0600, written atomically)."""
    path = data_dir / _NONCE_KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            secret = path.read_bytes()
            if len(secret) >= 32:
                return secret[:32]
        secret = secrets.token_bytes(32)
        partial = path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
        os.replace(partial, path)
    except OSError as exc:
        raise ConfigError(
            f"data-dir {data_dir}: cannot keep the nonce secret there: {exc.strerror or exc}"
        ) from None
    return secret


def build_server(config: RelayConfig) -> RelayServer:
    """The relay described by ``config``: data plane bound, not yet serving."""
    from teia._native import RelayDataPlane

    host, port = split_host_port(config.listen)
    config.validate()
    rest_secret = config.rest_secret()
    users = dict(entry.split(":", 1) for entry in config.user)
    authenticator = RelayAuthenticator(
        config.realm,
        nonce_secret=_nonce_secret(config.data_dir),
        users=users,
        rest_secret=rest_secret,
        nonce_lifetime=config.nonce_lifetime,
    )
    relay_ip = config.relay_ip or host
    own = {ipaddress.ip_address(relay_ip), ipaddress.ip_address(host)}
    policy = RelayPolicy(
        allow_peers=parse_networks(config.allow_peer),
        deny_peers=parse_networks(config.deny_peer),
        relay_addresses=frozenset(own),
        max_allocations=config.max_allocations,
        max_allocations_per_user=config.max_allocations_per_user,
        max_allocations_per_ip=config.max_allocations_per_ip,
        bandwidth_per_allocation=config.bandwidth,
    )
    family = FAMILY_IPV4 if ipaddress.ip_address(relay_ip).version == 4 else FAMILY_IPV6
    core = TurnServerCore(authenticator, policy, TurnSettings(relay_families=frozenset({family})))
    try:
        data_plane: DataPlane = RelayDataPlane(
            host,
            port,
            relay_ip=config.relay_ip or None,
            relay_port_min=config.relay_port_min,
            relay_port_max=config.relay_port_max,
            own_ips=policy.guarded_own_ips(),
            udp_gso=config.udp_gso,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    return RelayServer(core, data_plane, host, tcp=config.tcp)


class RelayCollector(Collector):
    """Prometheus view of a running relay, read at scrape time."""

    def __init__(self, server: RelayServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        data_plane: Any = self._server.data_plane
        try:
            stats: dict[str, int] = data_plane.stats()
        except (ValueError, AttributeError):
            stats = {}
        dropped = CounterMetricFamily(
            "teia_relay_dropped_datagrams",
            "datagrams the data plane did not forward, by reason",
            labels=["reason"],
        )
        for key, value in sorted(stats.items()):
            if key.startswith("dropped_"):
                dropped.add_metric([key.removeprefix("dropped_")], value)
            elif key == "allocations":
                yield GaugeMetricFamily("teia_relay_allocations", "live allocations", value=value)
            elif key != "dropped":
                yield CounterMetricFamily(f"teia_relay_{key}", f"data plane: {key}", value=value)
        yield dropped
        core = self._server.core
        answers = CounterMetricFamily(
            "teia_relay_responses",
            "control-plane answers by method and code",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(core.responses.items()):
            answers.add_metric([method, str(code)], count)
        yield answers
        ignored = CounterMetricFamily(
            "teia_relay_control_dropped",
            "control-plane input dropped, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(core.dropped.items()):
            ignored.add_metric([reason], count)
        yield ignored


async def serve(ctx: ServiceContext) -> None:
    """The service body: serve until cancelled."""
    config = ctx.config
    assert isinstance(config, RelayConfig)
    server = build_server(config)
    async with server:
        ctx.registry.register(RelayCollector(server))
        ctx.ready(
            listen=f"{server.host}:{server.port}",
            tcp=server.tcp,
            realm=config.realm,
            users=len(config.user),
            rest=bool(config.auth_secret or config.auth_secret_file),
            allow_peer=",".join(config.allow_peer) or "none",
        )
        await anyio.sleep_forever()


def _run(args: argparse.Namespace) -> int:
    return main("relay", RelayConfig, args, serve)


def register(sub: Any) -> None:
    """Register ``teia relay`` on the top-level subparsers."""
    parser = sub.add_parser(
        "relay",
        help="run a STUN/TURN relay (RFC 8489 / RFC 8656)",
        description="Serve STUN and TURN over UDP and TCP: peers that cannot reach each other "
        "directly relay opaque datagrams through this node. Long-term credentials (--user) "
        "and time-limited REST credentials (--auth-secret) authenticate clients; private, "
        "loopback and the relay's own addresses are never relayed to unless --allow-peer "
        "says so.",
    )
    add_arguments(parser, RelayConfig)
    parser.set_defaults(handler=_run)
