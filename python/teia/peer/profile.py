"""A peer profile: one directory holding who the peer is and everything it remembers.

::

    DIR/                  mode 0700
      identity.key        the keystore (`teia.identity.keystore`; what ``teia init`` writes)
      config.toml         `PeerConfig` (listen addresses, bootstrap nodes, relays, store nodes …)
      peer.db             `teia.peer.db.PeerDatabase` (history, contacts, sessions, prekeys,
                          outbox; secrets and texts sealed with a key derived from the identity)

The default profile is the directory of the default keystore (``$TEIA_HOME``, else
``$XDG_DATA_HOME/teia``, else ``~/.local/share/teia``), so ``teia init`` followed by
``teia send …`` works with no flags; ``--profile DIR`` (and ``teia init --keystore
DIR/identity.key``) selects another. `Profile.open` creates ``config.toml`` and ``peer.db``
when a directory has only a keystore.
"""

from __future__ import annotations

import fcntl
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from teia.errors import ConfigError, ProfileError, ProfileInUse
from teia.identity import Identity, keystore
from teia.identity.keystore import KdfParams
from teia.peer.db import PeerDatabase, RowCipher
from teia.relay.client import RelayClientConfig

__all__ = ["PeerConfig", "Profile", "default_profile_dir"]

KEYSTORE_NAME = "identity.key"
CONFIG_NAME = "config.toml"
DATABASE_NAME = "peer.db"


def default_profile_dir() -> Path:
    """The directory of the default keystore (see `teia.identity.keystore`)."""
    return keystore.default_keystore_path().parent


@dataclass
class PeerConfig:
    """What ``config.toml`` holds; every field is optional there."""

    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/udp/0/quic-v1"])
    """QUIC listen addresses (``/ip4|ip6/…/udp/PORT/quic-v1``); 0 picks a free port."""
    bootstrap: list[str] = field(default_factory=list)
    """DHT bootstrap nodes (``…/quic-v1/p2p/<id>``): the peer publishes its record and finds
    others through them."""
    store_nodes: list[str] = field(default_factory=list)
    """Store nodes (``…/quic-v1/p2p/<id>``) for prekey bundles and messages to offline peers."""
    relays: list[dict[str, Any]] = field(default_factory=list)
    """Relays to allocate on: tables of `teia.relay.client.RelayClientConfig` fields (``address``
    is ``IP:PORT`` or ``NAME:PORT``, a name resolved at start)."""
    direct: bool = True
    """Try direct dials; false sends everything through the relays (networks that block UDP
    between peers, and the demo's forced relay path)."""
    store_poll_interval: float = 30.0
    """Seconds between fetches of our store inboxes while online (also fetched on start)."""
    signed_prekey_days: float = 7.0
    """Age at which the signed prekey is replaced (the old one is kept 30 more days, for
    first messages still in flight or in a store)."""
    one_time_prekeys: int = 100
    """How many one-time prekeys to keep ready."""
    accept_unknown: bool = True
    """Take messages from peers not in the contacts (they are added as unverified)."""
    retry_interval: float = 5.0
    """Seconds between delivery attempts of what is in the outbox."""
    durable: bool = False
    """fsync every commit (SQLite ``synchronous=FULL``): survive power loss, at a cost."""
    attachment_dir: str = ""
    """Where received files are placed; empty means ``DIR/files``."""
    attachment_store_limit: int = 16 * 1024 * 1024
    """Largest file (bytes) whose chunks go through the store nodes when the recipient is
    unreachable; larger files wait until the peers can connect (0: never through the store)."""
    read_receipts: bool = True
    """Tell a contact which of its texts we read (`Peer.mark_read`); off, reading is marked
    only here."""
    attachment_accept: str = "all"
    """Whose file offers are taken: ``all``, ``contacts`` (anyone in the address book,
    including peers added unverified when they first wrote), ``verified`` (contacts whose safety
    number was checked) or ``none``. A refused offer is answered with a cancel notice."""

    @classmethod
    def from_toml(cls, data: dict[str, Any], origin: str) -> PeerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{origin}: unknown setting(s) {', '.join(unknown)}")
        config = cls(**data)
        config.relay_configs()  # validate now, not at first use
        if (
            config.one_time_prekeys < 1
            or config.retry_interval <= 0
            or config.store_poll_interval <= 0
        ):
            raise ConfigError(
                f"{origin}: one_time_prekeys, retry_interval and store_poll_interval must be "
                "positive"
            )
        if config.attachment_store_limit < 0:
            raise ConfigError(f"{origin}: attachment_store_limit must not be negative")
        if config.attachment_accept not in ("all", "contacts", "verified", "none"):
            raise ConfigError(f"{origin}: attachment_accept is all, contacts, verified or none")
        return config

    def relay_configs(self) -> list[RelayClientConfig]:
        try:
            return [RelayClientConfig(**relay) for relay in self.relays]
        except TypeError as exc:
            raise ConfigError(f"bad relay table: {exc}") from None

    def to_toml(self) -> str:
        def value(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, int | float):
                return repr(v)
            if isinstance(v, str):
                return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            if isinstance(v, dict):
                return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
            raise TypeError(type(v))

        lines = ["# teia peer profile settings (see docs/peer.md)"]
        lines += [f"{f.name} = {value(getattr(self, f.name))}" for f in fields(self)]
        return "\n".join(lines) + "\n"


class Profile:
    """An opened profile: identity, settings and database. Close it (or use ``with``)."""

    def __init__(self, directory: Path, identity: Identity, config: PeerConfig) -> None:
        self.directory = directory
        self.identity = identity
        self.config = config
        self.db = PeerDatabase(
            directory / DATABASE_NAME, RowCipher(identity.private_seed), durable=config.durable
        )

    @classmethod
    def create(
        cls,
        directory: Path | str,
        passphrase: str | bytes,
        *,
        identity: Identity | None = None,
        config: PeerConfig | None = None,
        kdf: KdfParams = keystore.DEFAULT_KDF,
    ) -> Profile:
        """Make a new profile (a new identity unless given); `ProfileError` if one exists."""
        path = Path(directory)
        if (path / KEYSTORE_NAME).exists():
            raise ProfileError(f"{path} already holds a profile")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = identity or Identity.generate()
        keystore.save_identity(identity, path / KEYSTORE_NAME, passphrase, kdf=kdf)
        config = config or PeerConfig()
        _write_private(path / CONFIG_NAME, config.to_toml())
        return cls(path, identity, config)

    @classmethod
    def open(cls, directory: Path | str, passphrase: str | bytes) -> Profile:
        """Open a profile (its keystore must exist); raises `WrongPassphrase`, `ProfileError`."""
        path = Path(directory)
        key_path = path / KEYSTORE_NAME
        if not key_path.exists():
            raise ProfileError(
                f"no profile at {path} (no {KEYSTORE_NAME}); create one with "
                f"`teia init --keystore {key_path}`"
            )
        identity = keystore.load_identity(key_path, passphrase)
        config_path = path / CONFIG_NAME
        if config_path.exists():
            try:
                data = tomllib.loads(config_path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ProfileError(f"cannot read {config_path}: {exc}") from None
            config = PeerConfig.from_toml(data, str(config_path))
        else:
            config = PeerConfig()
            _write_private(config_path, config.to_toml())
        return cls(path, identity, config)

    @contextmanager
    def online(self) -> Iterator[None]:
        """Hold the profile's online lock (``DIR/online.lock``): one process at a time runs a
        peer on it, since sessions live in that process's memory. `ProfileInUse` if taken."""
        fd = os.open(self.directory / "online.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ProfileInUse(
                f"profile {self.directory} is online in another process; stop it, or let it "
                "deliver (messages queued here go to its outbox)"
            ) from None
        try:
            yield
        finally:
            os.close(fd)

    def save_config(self) -> None:
        _write_private(self.directory / CONFIG_NAME, self.config.to_toml())

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Profile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)
