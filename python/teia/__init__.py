"""teia: hybrid decentralized chat infrastructure.

Peers talk directly and end-to-end encrypted when they can; discovery, relay and store nodes run
by operators cover what peers cannot do alone.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teia.peer import Peer

try:
    __version__ = version("teia")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["Peer", "__version__"]


def __getattr__(name: str) -> Any:
    # ``teia.Peer`` (the SDK) is imported on first use: the CLI and the nodes do not need it.
    if name == "Peer":
        from teia.peer import Peer

        return Peer
    raise AttributeError(f"module 'teia' has no attribute {name!r}")
