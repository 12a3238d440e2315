"""Shared benchmark plumbing: a ``bench_record`` fixture whose rows are written, per benchmark
module and device, to ``bench/results/<module>_<device>.json`` with machine/version info.

Run: ``pytest bench/ --benchmark-only`` (CPU: torch paths; CUDA: also the Triton paths).
``python bench/to_markdown.py`` turns the JSON files into Markdown tables.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(os.environ.get("LATENTR3_BENCH_RESULTS", Path(__file__).parent / "results"))
_ROWS: dict[tuple[str, str], list[dict]] = defaultdict(list)


def machine_info() -> dict:
    """Where and with what the numbers were measured."""
    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    # Other work on the machine skews timings: record the load.
    info["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info


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
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    for (module, device), rows in _ROWS.items():
        path = RESULTS_DIR / f"{module}_{device}.json"
        path.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
