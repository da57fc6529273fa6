"""NAT lab tests: namespaces made per test and always deleted, on trio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .lab import NatLab


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[NatLab]:
    """A fresh lab (public segment only; tests add their sites), deleted even on failure."""
    with NatLab(request.node.name.removeprefix("test_")) as made:
        yield made
    assert not made.namespaces(), "the lab left namespaces behind"
