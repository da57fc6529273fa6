"""``teia demo``: what ``make demo`` runs."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Register ``teia demo``."""
    p = sub.add_parser("demo", help="run the demo on loopback with embedded defaults")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    del args
    print("teia demo")
    return 0
