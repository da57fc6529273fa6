"""Running a service: logging, metrics exporter, signals, and a clean stop on SIGTERM.

``run(name, config, body)`` runs ``await body(ctx)`` on trio with logging configured from the
config, the metrics exporter started if ``config.metrics`` is set, and SIGTERM/SIGINT turned
into a graceful stop: the body's cancel scope is cancelled, the body has
``config.shutdown_timeout`` seconds to finish its ``finally`` blocks, and the process exits 0.
The body calls ``ctx.ready(**fields)`` once it serves; that logs a ``ready`` event (tests and
supervisors wait for it).

``main(name, cls, args, body)`` is what a service's command calls: it loads the config from the
parsed flags, answers ``--check-config`` and ``--print-peer-id`` without serving, else runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Gauge

from teia import __version__
from teia.service.config import ServiceConfig, load
from teia.service.logs import configure, fields
from teia.service.metrics import MetricsServer, new_registry

__all__ = ["ServiceContext", "main", "run"]


@dataclass
class ServiceContext:
    """What a running service gets: its config, its metrics registry and its logger."""

    name: str
    config: ServiceConfig
    registry: CollectorRegistry
    log: logging.Logger
    metrics_port: int | None = None
    _stopping: anyio.Event = field(default_factory=anyio.Event)

    def ready(self, **info: Any) -> None:
        """Log the ``ready`` event with ``info`` (listen addresses, peer ID, metrics port)."""
        if self.metrics_port is not None:
            info.setdefault("metrics_port", self.metrics_port)
        self.log.info("ready", extra=fields(**info))

    @property
    def stopping(self) -> bool:
        """Whether a stop signal arrived (the body is being cancelled)."""
        return self._stopping.is_set()


async def _watch_signals(
    scope: anyio.CancelScope,
    ctx: ServiceContext,
    finished: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    timeout = ctx.config.shutdown_timeout
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()  # handlers are in place before the body can say "ready"
        async for signum in signals:
            ctx.log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
            ctx._stopping.set()
            scope.cancel()
            break
        else:  # pragma: no cover - the receiver never ends by itself
            return
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:

                async def second_signal() -> None:
                    async for _ in signals:
                        ctx.log.warning("second stop signal: exiting now")
                        os._exit(1)

                tg.start_soon(second_signal)
                await finished.wait()
                tg.cancel_scope.cancel()
                return
    ctx.log.error("graceful stop took too long: exiting", extra=fields(timeout_s=timeout))
    os._exit(1)


def run(
    name: str,
    config: ServiceConfig,
    body: Callable[[ServiceContext], Awaitable[None]],
) -> int:
    """Run a service until it returns or a stop signal arrives; returns the exit status."""
    configure(config.log_level, config.log_format)
    log = logging.getLogger(f"teia.{name}")
    registry = new_registry()
    Gauge(
        "teia_build_info", "teia version (always 1)", ["version", "service"], registry=registry
    ).labels(__version__, name).set(1)

    async def main() -> None:
        ctx = ServiceContext(name=name, config=config, registry=registry, log=log)
        async with anyio.create_task_group() as tg:
            body_scope = anyio.CancelScope()
            finished = anyio.Event()
            await tg.start(_watch_signals, body_scope, ctx, finished)
            try:
                if config.metrics:
                    host, _, port = config.metrics.rpartition(":")
                    async with MetricsServer(registry, host.strip("[]"), int(port)) as exporter:
                        ctx.metrics_port = exporter.port
                        with body_scope:
                            await body(ctx)
                else:
                    with body_scope:
                        await body(ctx)
            finally:
                finished.set()
                tg.cancel_scope.cancel()

    log.info("starting", extra=fields(service=name, version=__version__))
    try:
        anyio.run(main, backend="trio")
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    log.info("stopped", extra=fields(service=name))
    return 0


def main(
    name: str,
    cls: type[ServiceConfig],
    args: argparse.Namespace,
    body: Callable[[ServiceContext], Awaitable[None]],
) -> int:
    """Load ``cls`` from ``args``; then check it only (``--check-config``), print the node's
    peer ID (``--print-peer-id``), or run the service. A bad config raises `ConfigError`."""
    config = load(cls, args)
    if getattr(args, "check_config", False):
        print(f"teia {name}: configuration OK")
        return 0
    if getattr(args, "print_peer_id", False) and cls.identity_file is not None:
        # imported here: services without a node identity (the homeserver) never load teia.identity
        from teia.service.identity import node_identity

        data_dir: Path = getattr(config, "data_dir")  # noqa: B009 - services with identities have one
        print(node_identity(data_dir, cls.identity_file).peer_id)
        return 0
    return run(name, config, body)
