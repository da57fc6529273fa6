"""teia: hybrid decentralized chat infrastructure.

Peers talk directly and end-to-end encrypted when they can; discovery, relay and store nodes run
by operators cover what peers cannot do alone.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("teia")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
