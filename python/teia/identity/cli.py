"""``teia init`` and ``teia id`` (placeholder wiring; the identity helper fills this in)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Register the identity subcommands on the top-level subparsers."""
    del sub
