"""A tiny service for the runner tests: logs ready, serves until stopped, cleans up."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass

import anyio

from teia.service import ServiceConfig, ServiceContext, load, run, setting


@dataclass
class Config(ServiceConfig):
    slow_cleanup: float = setting(0.0, "seconds the cleanup takes")


async def body(ctx: ServiceContext) -> None:
    assert isinstance(ctx.config, Config)
    try:
        ctx.ready(answer=42)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(ctx.config.slow_cleanup)
        print("CLEANED UP", flush=True)


if __name__ == "__main__":
    # Each argument is one TOML line, e.g. log_format="json".
    config = load(Config, file_values=tomllib.loads("\n".join(sys.argv[1:])))
    sys.exit(run("demo-service", config, body))
