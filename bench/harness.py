"""The one benchmark harness of ``bench/``: timing, peak memory, machine info, results schema.

Every timing script measures with :func:`time_call` (warm-up calls, then ``reps`` timed calls,
each bracketed by a CUDA synchronize on GPU), :class:`PeakMemory` (CUDA
``max_memory_allocated`` above what was held before; on CPU the resident-set high-water mark
``VmHWM`` above ``VmRSS`` before, reset through ``/proc/self/clear_refs``) and writes one JSON
document with :func:`write_results`::

    {"schema": "latentr3-bench/1", "benchmark": "<script>", "machine": {...},
     "config": {...the arguments...}, "rows": [{...one measurement...}, ...], ...extras}

``bench/to_markdown.py`` reads that schema (and the pytest-benchmark files of
``bench/conftest.py``, which use it too). Older files without ``schema`` are read as they are.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "latentr3-bench/1"
MIB = 2**20


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU), so a timer measures the work itself."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall-clock seconds of the timed calls (warm-up excluded), the peak extra memory over them
    (bytes, when measured) and the last call's result."""

    times: list[float]
    peak_bytes: int | None = None
    result: Any = field(default=None, repr=False)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per call

    @property
    def min_s(self) -> float:
        """The minimum: on a shared machine other processes only ever add time."""
        return min(self.times)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median_s(self) -> float:
        """Median process CPU time: the robust measure on a shared machine with one thread."""
        return statistics.median(self.cpu_times)

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / MIB


def time_call(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    *,
    reps: int = 3,
    warmup: int = 1,
    memory: bool = False,
    before_each: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls (compilation, autotuning, lazy init), then ``reps``
    timed ones, each synchronized on CUDA. ``memory``: also the largest :class:`PeakMemory` of
    the timed calls (set up outside the timer). ``before_each`` runs untimed before each call."""
    result = None
    for _ in range(warmup):
        result = None  # free the previous result before the next call allocates
        result = fn()
    sync(device)
    times, cpu_times, peaks = [], [], []
    for _ in range(reps):
        result = None
        if before_each is not None:
            before_each()
        probe = PeakMemory(device, empty_cache=True) if memory else contextlib.nullcontext()
        with probe:
            sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - cpu0)
        if memory:
            peaks.append(probe.bytes)
    return Timing(times, max(peaks) if peaks else None, result, cpu_times)


def rss_bytes(key: str = "VmRSS") -> int:
    """A line of ``/proc/self/status`` (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as mem: run()`` -> ``mem.bytes``: the extra memory at the peak.

    CUDA: ``max_memory_allocated`` minus what was allocated before (the caching allocator's
    accounting). CPU: ``VmHWM - VmRSS(before)`` of this process, or the plain VmRSS difference
    (``mem.method`` says which) where the high-water mark cannot be reset. CPU numbers are only
    meaningful for the first run of a computation in a fresh process: freed heap memory stays
    resident, so a warm-up would hide the peak.
    """

    def __init__(self, device: str | torch.device = "cpu", *, empty_cache: bool = False) -> None:
        self.cuda = str(device).startswith("cuda")
        self.empty_cache = empty_cache
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            if self.empty_cache:
                torch.cuda.empty_cache()
            self._before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda.max_memory_allocated"
        else:
            self._before = rss_bytes("VmRSS")
            self._exact = reset_peak_rss()
            self.method = "VmHWM-VmRSS" if self._exact else "VmRSS delta (approx.)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._before
        else:
            self.bytes = rss_bytes("VmHWM" if self._exact else "VmRSS") - self._before

    @property
    def mib(self) -> float:
        return self.bytes / MIB


def machine_info(device: str | torch.device | None = None) -> dict:
    """Where and with what the numbers were measured (versions, device, threads, load)."""
    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": None if device is None else str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # missing or broken: the numbers are still worth keeping
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def results_document(
    benchmark: str,
    rows: list[dict],
    *,
    config: dict | None = None,
    device: str | torch.device | None = None,
    **extra: Any,
) -> dict:
    """The one results schema (see the module docstring); ``extra`` adds top-level fields
    (e.g. a ``summary`` of ratios)."""
    doc = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "machine": machine_info(device),
        "config": _jsonable(dict(config or {})),
        "rows": _jsonable(list(rows)),
    }
    doc.update(_jsonable(extra))
    return doc


def write_json(path: str | Path, doc: dict) -> None:
    """Write a results document (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_results(path: str | Path | None, benchmark: str, rows: list[dict], **kwargs) -> dict:
    """Build the results document and write it to ``path`` (skipped when None); returns it."""
    doc = results_document(benchmark, rows, **kwargs)
    if path is not None:
        write_json(path, doc)
    return doc


def load_results(path: str | Path) -> dict:
    """A results file: the schema above, or an older file (no ``schema`` key) as it is."""
    return json.loads(Path(path).read_text())
