"""Launch configurations of the log-prob kernels (``linear_logprob``), per GPU class and dtype.

Row buckets: the smallest BLOCK_ROWS that covers small batches (no wasted MMA rows), 64 rows for
everything else. Per arch class ("sm80": A100-class and other pre-Hopper GPUs; "sm90": H100/
H200) and operand family ("16bit": bf16/fp16 tensor cores; "fp32": the exact IEEE path, which
runs on FMA units and needs smaller tiles to stay in registers). Sizes chosen so that the
accumulator plus the pipelined operands fit without spills (checked by the code-generation
test), not measured on a GPU: ``bench/gpu_check.sh`` records what the autotuner picks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelConfig(NamedTuple):
    """One launch configuration of the log-prob kernels."""

    block_rows: int
    block_vocab: int
    block_dim: int
    num_warps: int
    num_stages: int


ROW_BUCKETS = (16, 32, 64)
_FP32 = {
    16: (KernelConfig(16, 64, 32, 4, 2),),
    32: (KernelConfig(32, 128, 32, 8, 2),),
    64: (KernelConfig(64, 64, 16, 4, 2),),
}
# 16- and 32-row tiles are the same on both arch classes; 64-row tiles differ (Hopper's wgmma
# takes a whole warpgroup at BLOCK_VOCAB=256).
_SMALL_16BIT = {
    16: (KernelConfig(16, 128, 64, 4, 3), KernelConfig(16, 256, 64, 8, 3)),
    32: (KernelConfig(32, 128, 64, 4, 3), KernelConfig(32, 256, 64, 8, 3)),
}
CONFIGS: dict[str, dict[str, dict[int, tuple[KernelConfig, ...]]]] = {
    "sm80": {
        "16bit": {
            **_SMALL_16BIT,
            64: (KernelConfig(64, 128, 64, 8, 3), KernelConfig(64, 128, 32, 4, 4)),
        },
        "fp32": _FP32,
    },
    "sm90": {
        "16bit": {
            **_SMALL_16BIT,
            64: (KernelConfig(64, 128, 64, 4, 3), KernelConfig(64, 256, 64, 8, 3)),
        },
        "fp32": _FP32,
    },
}


def arch_class(capability: tuple[int, int]) -> str:
    """The config class of a CUDA compute capability: "sm90" for Hopper, else "sm80"."""
    return "sm90" if capability[0] == 9 else "sm80"


def row_bucket(rows: int) -> int:
    """The BLOCK_ROWS bucket for ``rows`` rows (16, 32 or 64)."""
    return next((b for b in ROW_BUCKETS if rows <= b), ROW_BUCKETS[-1])


def family(dtype: torch.dtype | str) -> str:
    """The config family of an operand dtype: "fp32" or "16bit" (bf16/fp16)."""
    return "fp32" if dtype in (torch.float32, "fp32") else "16bit"


def reachable_configs() -> dict[tuple[str, str], tuple[KernelConfig, ...]]:
    """Every config the dispatcher or the autotuner can launch, per (arch class, family)."""
    return {
        (arch, fam): tuple(c for b in ROW_BUCKETS for c in table[b])
        for arch, families in CONFIGS.items()
        for fam, table in families.items()
    }
