"""Checks of the machine against the run's options (before any data load) and CPU threads.

Every problem is one :class:`ConfigError` line naming the flag: a device that is not there, a
dtype the device cannot train in, an attention implementation whose package is missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["check_runtime", "resolved_device_type", "default_threads", "apply_threads"]

DEVICE_HINT = "auto, cpu, cuda, cuda:N or mps"


def resolved_device_type(device: str) -> str:
    """'cuda', 'mps', 'cpu', ... for a --device value (auto: CUDA when available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device name ({DEVICE_HINT})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU seen"
            raise ConfigError(
                f"--device {device}: CUDA is not available on this machine ({why}); "
                "use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"--device {device}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
            )
    elif dev.type == "mps":
        if not (torch.backends.mps.is_available()):
            raise ConfigError(
                f"--device {device}: Apple MPS is not available on this machine; use --device "
                "cpu or auto"
            )
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"--device {device}: not available on this machine ({DEVICE_HINT})")


def check_runtime(cfg: Any) -> None:
    """ConfigError (one line) when --device, --dtype or --attn-implementation cannot work here."""
    _check_device(cfg.device)
    kind = resolved_device_type(cfg.device)
    if cfg.dtype == "fp16" and kind == "cpu":
        raise ConfigError(
            "--dtype fp16: half-precision training is not supported on CPU; use --dtype fp32 "
            "(the CPU default) or bf16"
        )
    attn = cfg.attn_implementation
    if attn in ("flash_attention_2", "flash_attention_3"):
        module = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--attn-implementation {attn}: the {module} package is not installed "
                '(pip install ".[flash]" on a CUDA machine); use sdpa or eager'
            )
        if kind != "cuda":
            raise ConfigError(
                f"--attn-implementation {attn}: needs a CUDA device (--device is {cfg.device}, "
                f"{kind} here); use sdpa or eager"
            )
        if cfg.dtype == "fp32":
            raise ConfigError(
                f"--attn-implementation {attn}: needs --dtype bf16 or fp16 (got fp32)"
            )


def _physical_cores() -> int | None:
    """Distinct (socket, core) pairs of /proc/cpuinfo (None when it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def default_threads() -> tuple[int, str]:
    """(threads, why): physical cores, never more than the cores this process may use, minus
    the cores other processes keep busy (1-minute load average), divided among the processes
    of a torchrun launch; ``OMP_NUM_THREADS`` set by the user wins (within the usable cores)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    usable = usable or os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return min(int(env), usable), f"OMP_NUM_THREADS={env}, {usable} usable cores"
    n = min(usable, _physical_cores() or usable)
    why = f"{usable} usable cores, {n} physical"
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = 0.0
    busy = int(load + 0.5)
    if busy:
        n = max(1, min(n, usable - busy))
        why += f", load {load:.1f}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        n = max(1, n // local)
        why += f", {local} processes"
    return n, why


def apply_threads(threads: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads (and OMP_NUM_THREADS for child processes); returns
    (threads, why) for the log line."""
    if threads is None:
        n, why = default_threads()
    else:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        n, why = threads, "--threads"
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n, why
