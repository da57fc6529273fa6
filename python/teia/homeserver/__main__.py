"""``python -m teia.homeserver``: ``teia homeserver`` with the same flags, in a lighter process.

The ``teia`` command builds one parser for every role, which imports each role's command line
and with it the peer, DHT, store and relay stacks: about 10 MiB that a homeserver never uses.
This entry point imports the homeserver alone; it is the one to put in a service unit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from teia.errors import TeiaError
from teia.homeserver.service import HomeserverConfig, serve
from teia.service import add_arguments
from teia.service.runner import main as run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Run the homeserver from ``argv``; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m teia.homeserver",
        description="Run homeserver-lite (the flags of 'teia homeserver').",
    )
    add_arguments(parser, HomeserverConfig)
    args = parser.parse_args(argv)
    try:
        return run_service("homeserver", HomeserverConfig, args, serve)
    except TeiaError as exc:
        print(f"teia homeserver: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
