"""What every teia service shares: configuration (TOML + flags), structured logs, Prometheus
metrics and a clean stop on SIGTERM. Services build on `config.ServiceConfig` and
`runner.run`."""

from __future__ import annotations

from teia.service.config import ServiceConfig, add_arguments, load, setting
from teia.service.runner import ServiceContext, run

__all__ = ["ServiceConfig", "ServiceContext", "add_arguments", "load", "run", "setting"]
