"""Shared benchmark plumbing: a ``bench_record`` fixture whose rows are written, per benchmark
module and device, to ``bench/results/<module>_<device>.json`` in the results schema of
``bench/harness.py`` (machine and version info included).

Run: ``pytest bench/ --benchmark-only`` (CPU: torch paths; CUDA: also the Triton paths).
``python bench/to_markdown.py`` turns the JSON files into Markdown tables.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import harness
import pytest

RESULTS_DIR = Path(os.environ.get("LATENTR3_BENCH_RESULTS", Path(__file__).parent / "results"))
_ROWS: dict[tuple[str, str], list[dict]] = defaultdict(list)


@pytest.fixture
def bench_record(request):
    """Call ``bench_record(row: dict)`` to add a row (device taken from ``row['device']``)."""
    module = Path(str(request.node.fspath)).stem

    def record(row: dict) -> None:
        _ROWS[(module, row.get("device", "cpu"))].append(dict(row, test=request.node.name))

    return record


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    for (module, device), rows in _ROWS.items():
        harness.write_results(RESULTS_DIR / f"{module}_{device}.json", module, rows, device=device)
