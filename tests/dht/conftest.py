"""DHT tests run on trio (anyio's pytest plugin)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def _install_kad_standin() -> None:
    """Until the PyO3 Kademlia bindings are built, tests run on a pure-Python stand-in."""
    from teia import _native

    if hasattr(_native, "KadRoutingTable"):
        return
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "kad_standin", Path(__file__).with_name("kad_standin.py")
    )
    assert spec is not None
    assert spec.loader is not None
    kad_standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kad_standin)
    sys.modules["kad_standin"] = kad_standin

    for name in ("kad_key", "kad_distance", "KadRoutingTable", "KadLookup"):
        setattr(_native, name, getattr(kad_standin, name))


_install_kad_standin()
