"""The ``teia`` command: one entry point, a subcommand per role and operator task."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from teia import __version__
from teia.errors import TeiaError

Handler = Callable[[argparse.Namespace], int]


# Subcommands whose module registers them alone: ``teia homeserver …`` builds a parser with only
# that module, so the process does not import every other role's stack (about 10 MiB; issue 10).
_ALONE = {"homeserver": "teia.homeserver.service"}


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="teia",
        description="teia: end-to-end encrypted peer-to-peer chat, and the nodes that support it.",
    )
    parser.add_argument("--version", action="version", version=f"teia {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    return parser, sub


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser: with only the chosen subcommand when ``argv`` starts with one of
    `_ALONE`, else with every subcommand registered (``teia --help`` lists them all)."""
    parser, sub = _top_parser()
    if argv and argv[0] in _ALONE:
        importlib.import_module(_ALONE[argv[0]]).register(sub)
        return parser

    from teia.identity import cli as identity_cli

    identity_cli.register(sub)

    from teia.host import cli as host_cli

    host_cli.register(sub)

    from teia.dht import service as discovery_service

    discovery_service.register(sub)

    from teia.relay import service as relay_service

    relay_service.register(sub)

    from teia.store import service as store_service

    store_service.register(sub)

    from teia.homeserver import service as homeserver_service

    homeserver_service.register(sub)

    from teia.peer import cli as peer_cli

    peer_cli.register(sub)

    from teia import demo

    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``teia`` command line; returns the process exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    handler: Handler = args.handler
    try:
        return handler(args)
    except TeiaError as exc:
        print(f"teia {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
