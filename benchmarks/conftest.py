"""Collects each benchmark's median and prints, per group, how the others compare with teia.

Timings are measured and reported, never asserted.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The pure-Python baseline lives with the tests (tests/crypto/reference.py); pytest puts only
# this folder on sys.path, so make the repository root importable too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# group → implementation → median seconds per call
MEDIANS: dict[str, dict[str, float]] = {}


@pytest.fixture
def record_median(benchmark: pytest.FixtureDef, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    implementation = request.node.callspec.params["implementation"]
    MEDIANS.setdefault(benchmark.group, {})[implementation] = stats.stats.median


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEDIANS:
        return
    terminalreporter.section("medians, and each implementation's time over teia's")
    for group, medians in sorted(MEDIANS.items()):
        terminalreporter.write_line(group)
        teia = medians.get("teia")
        for implementation, median in sorted(medians.items(), key=lambda item: item[1]):
            ratio = f"{median / teia:8.2f} x teia" if teia else ""
            terminalreporter.write_line(f"  {implementation:<14} {median * 1e6:10.1f} us  {ratio}")
