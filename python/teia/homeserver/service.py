"""``teia homeserver``: homeserver-lite as a service, served by Hypercorn on trio.

Settings come from flags and ``--config FILE`` (TOML, the same names). The data directory
holds the signing key (``signing.key``, 0600) and, with the default ``database = "sqlite"``,
the database (``homeserver.db``); ``--database postgresql://…`` puts the data in PostgreSQL.
TLS (HTTP/1.1 and HTTP/2) is on when ``--tls-cert`` and ``--tls-key`` are given; otherwise the
server speaks plain HTTP/1.1 (and h2c), meant for loopback or behind a TLS proxy.

Metrics (metadata only): requests by endpoint and status, request latency, rate-limit
refusals, events persisted by origin, logins, waiting syncs, federation transactions.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CollectorRegistry

from teia.errors import ConfigError
from teia.homeserver.api import ApiLimits, build_app
from teia.homeserver.keys import SigningKey
from teia.homeserver.memory import limit_arenas
from teia.homeserver.server import Homeserver, HomeserverSettings
from teia.homeserver.storage import HomeserverStore, open_database
from teia.service import ServiceConfig, ServiceContext, add_arguments, setting
from teia.service.runner import main

if TYPE_CHECKING:  # imported when used: a server without them does not carry their modules
    from teia.homeserver.identity import IdentityService, IdentitySettings
    from teia.homeserver.mail import MailDelivery

__all__ = ["HomeserverConfig", "RunningHomeserver", "register", "running_homeserver", "serve"]

_MALLOC_ARENAS = 2


def _host_port(value: Any) -> str | None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be HOST:PORT (e.g. 127.0.0.1:8008)"
    return None


def _server_name(value: Any) -> str | None:
    text = str(value)
    if not text or any(c.isspace() or c in "/@!#$" for c in text) or len(text) > 230:
        return "must be a host name, optionally with :PORT (e.g. chat.example.org)"
    return None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a port number (1-65535)"


def _delivery(value: Any) -> str | None:
    return None if value in ("smtp", "directory") else "must be smtp or directory"


def _database(value: Any) -> str | None:
    if value == "sqlite" or str(value).startswith(("postgresql://", "postgres://")):
        return None
    return "must be 'sqlite' or a postgresql:// URI"


@dataclass
class HomeserverConfig(ServiceConfig):
    server_name: str = setting("localhost", "the server name in user and room IDs",
                               metavar="NAME", check=_server_name)  # fmt: skip
    listen: str = setting("127.0.0.1:8008", "HTTP listen address", metavar="HOST:PORT",
                          check=_host_port)  # fmt: skip
    data_dir: Path = setting(Path("/var/lib/teia/homeserver"), "state directory", metavar="DIR")
    database: str = setting("sqlite", "sqlite (in the data dir) or a postgresql:// URI",
                            metavar="DB", check=_database)  # fmt: skip
    registration_open: bool = setting(True, "let anyone register an account (m.login.dummy)")
    tls_cert: str = setting("", "TLS certificate chain (PEM); with --tls-key turns TLS on",
                            metavar="FILE")  # fmt: skip
    tls_key: str = setting("", "TLS private key (PEM)", metavar="FILE")
    max_request_bytes: int = setting(65_536, "largest JSON request body", check=_positive)
    max_upload_bytes: int = setting(10 * 1024 * 1024, "largest media upload", check=_positive)
    password_memory_kib: int = setting(65_536, "Argon2id memory per password hash (KiB)",
                                       check=_positive)  # fmt: skip
    password_iterations: int = setting(3, "Argon2id passes per password hash", check=_positive)
    password_hashes_at_once: int = setting(
        2, "Argon2id hashes computed at once (more logins and registrations wait)", check=_positive
    )
    ip_rate: float = setting(50.0, "requests/s per client address", check=_positive)
    ip_burst: float = setting(200.0, "request burst per client address", check=_positive)
    user_rate: float = setting(20.0, "requests/s per user (syncs excluded)", check=_positive)
    user_burst: float = setting(100.0, "request burst per user", check=_positive)
    federation: bool = setting(True, "federate with other homeserver-lite instances")
    federation_tls: bool = setting(
        False, "reach other servers over HTTPS (off: plain HTTP, for loopback and tests)"
    )
    identity_service: bool = setting(
        False, "serve the identity service (verified e-mail → user ID) under /_matrix/identity/v2"
    )
    identity_delivery: str = setting("smtp", "how verification mails leave: smtp or directory",
                                     metavar="KIND", check=_delivery)  # fmt: skip
    identity_mail_dir: str = setting(
        "",
        "directory delivery: one 0600 file per mail (default: DATA_DIR/identity-mail)",
        metavar="DIR",
    )
    identity_mail_from: str = setting(
        "",
        "From: of verification mails (default: noreply@ the server name's host)",
        metavar="ADDRESS",
    )
    identity_public_url: str = setting("", "base URL of this server for the link in the mails "
                                       "(none when empty)", metavar="URL")  # fmt: skip
    identity_token_lifetime: int = setting(3600, "seconds a mailed token stays valid",
                                           check=_positive)  # fmt: skip
    identity_max_attempts: int = setting(5, "wrong tokens before a session is spent",
                                         check=_positive)  # fmt: skip
    identity_mails_per_hour: float = setting(5.0, "verification mails per hour per address",
                                             check=_positive)  # fmt: skip
    identity_ip_mails_per_hour: float = setting(30.0, "verification mails per hour per "
                                                "client address", check=_positive)  # fmt: skip
    smtp_host: str = setting("localhost", "SMTP server for verification mails", metavar="HOST")
    smtp_port: int = setting(25, "SMTP server port (587 for submission with STARTTLS)",
                             check=_port)  # fmt: skip
    smtp_starttls: bool = setting(False, "upgrade the SMTP connection with STARTTLS")
    smtp_ca_file: str = setting("", "CA certificates to trust for STARTTLS (default: the "
                                "system's)", metavar="FILE")  # fmt: skip
    smtp_username: str = setting("", "SMTP login (none when empty)", metavar="USER")
    smtp_password_file: str = setting("", "file holding the SMTP password", metavar="FILE")

    def validate(self) -> None:
        if self.smtp_password_file and not self.smtp_username:
            raise ConfigError("smtp-password-file needs smtp-username")
        if self.identity_public_url and not self.identity_public_url.startswith(
            ("https://", "http://")
        ):
            raise ConfigError("identity-public-url must be an http(s):// URL")


def settings_from(config: HomeserverConfig) -> HomeserverSettings:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls-cert and tls-key go together")
    return HomeserverSettings(
        server_name=config.server_name,
        registration_open=config.registration_open,
        max_request_bytes=config.max_request_bytes,
        max_upload_bytes=config.max_upload_bytes,
        password_memory_kib=max(8 * 4, config.password_memory_kib),
        password_iterations=config.password_iterations,
        password_hashes_at_once=config.password_hashes_at_once,
    )


def mail_delivery(config: HomeserverConfig) -> MailDelivery:
    """The verification mails' delivery the configuration asks for."""
    from teia.homeserver.mail import DirectoryDelivery, SmtpDelivery

    if config.identity_delivery == "directory":
        directory = config.identity_mail_dir
        return DirectoryDelivery(Path(directory) if directory
                                 else config.data_dir / "identity-mail")  # fmt: skip
    password = ""
    if config.smtp_password_file:
        try:
            password = Path(config.smtp_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read smtp-password-file: {exc.strerror}") from None
    return SmtpDelivery(config.smtp_host, config.smtp_port, starttls=config.smtp_starttls,
                        username=config.smtp_username, password=password,
                        ca_file=config.smtp_ca_file)  # fmt: skip


def identity_settings(config: HomeserverConfig) -> IdentitySettings:
    from teia.homeserver.identity import IdentitySettings

    host = config.server_name.rsplit(":", 1)[0] if config.server_name.count(":") == 1 else (
        config.server_name)  # fmt: skip
    return IdentitySettings(
        mail_from=config.identity_mail_from or f"noreply@{host.strip('[]')}",
        public_url=config.identity_public_url,
        token_lifetime=config.identity_token_lifetime,
        max_attempts=config.identity_max_attempts,
        mails_per_hour_per_address=config.identity_mails_per_hour,
        mails_per_hour_per_ip=config.identity_ip_mails_per_hour,
    )


@dataclass
class RunningHomeserver:
    """A homeserver serving HTTP: its logic object and the URL it listens on."""

    hs: Homeserver
    url: str
    identity: IdentityService | None = None


@asynccontextmanager
async def running_homeserver(
    config: HomeserverConfig, registry: CollectorRegistry | None = None
) -> AsyncIterator[RunningHomeserver]:
    """Open the database, start serving on ``config.listen``, stop on exit."""
    settings = settings_from(config)
    key = SigningKey.load_or_create(config.data_dir)
    db = await anyio.to_thread.run_sync(open_database, config.database, config.data_dir)
    store = HomeserverStore(db)
    try:
        hs = Homeserver(settings, store, key, registry=registry)
        federation = None
        routes = []
        if config.federation:
            from teia.homeserver.federation import Federation

            federation = Federation(hs, tls=config.federation_tls, registry=registry)
            routes = federation.routes()
        route_sets = []
        identity = None
        if config.identity_service:
            from teia.homeserver.identity import IdentityService
            from teia.homeserver.identity_api import IdentityApi

            identity = IdentityService(hs, mail_delivery(config), identity_settings(config),
                                       registry=registry)  # fmt: skip
            await identity.start()
            route_sets.append(IdentityApi(identity).routes)
        app = build_app(
            hs,
            limits=ApiLimits(config.ip_rate, config.ip_burst, config.user_rate, config.user_burst),
            registry=registry,
            extra_routes=routes,
            route_sets=route_sets,
        )
        hc = HypercornConfig()
        hc.bind = [config.listen]
        hc.accesslog = None  # URLs may carry access tokens: never logged
        hc.errorlog = logging.getLogger("hypercorn.error")
        hc.graceful_timeout = 2.0
        if config.tls_cert:
            hc.certfile = config.tls_cert
            hc.keyfile = config.tls_key
        async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
            if federation is not None:
                await stack.enter_async_context(federation)
            tg.start_soon(hs.run_typing_expiry)
            binds = await tg.start(_serve, app, hc)
            scheme = "https" if config.tls_cert else "http"
            address = binds[0].split("://", 1)[1]
            yield RunningHomeserver(hs, f"{scheme}://{address}", identity)
            tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(store.close)


async def _serve(
    app: Any,
    config: HypercornConfig,
    *,
    task_status: anyio.abc.TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]


async def serve(ctx: ServiceContext) -> None:
    """The service body: serve until cancelled."""
    config = ctx.config
    assert isinstance(config, HomeserverConfig)
    # before the first worker thread: they then share malloc arenas (see teia.homeserver.memory)
    limit_arenas(_MALLOC_ARENAS)
    async with running_homeserver(config, ctx.registry) as running:
        ctx.ready(
            server_name=config.server_name,
            listen=running.url,
            database="postgresql" if config.database != "sqlite" else "sqlite",
            signing_key=running.hs.signing_key.key_id,
            identity_service=config.identity_service,
        )
        await anyio.sleep_forever()


def _run(args: argparse.Namespace) -> int:
    return main("homeserver", HomeserverConfig, args, serve)


def register(sub: Any) -> None:
    """Register ``teia homeserver`` on the top-level subparsers."""
    parser = sub.add_parser(
        "homeserver",
        help="run homeserver-lite (Matrix client-server API and federation)",
        description="Serve the federated model: a Matrix-compatible homeserver (client-server "
        "API v3 subset, rooms with power-level moderation, media, federation with other "
        "homeserver-lite instances), storing its users' history in SQLite or PostgreSQL.",
    )
    add_arguments(parser, HomeserverConfig)
    parser.set_defaults(handler=_run)
