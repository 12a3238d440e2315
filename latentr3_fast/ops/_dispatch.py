"""Backend choice for the fused ops: Triton kernel or torch reference.

Rule: Triton when every tensor argument is on CUDA and Triton imports; the torch reference
otherwise. ``LATENTR3_KERNELS=triton|torch`` forces one. Forcing Triton on CPU tensors is only
allowed under ``TRITON_INTERPRET=1`` (the tests do that on machines without a GPU).
Triton is imported lazily, so ``import latentr3_fast.ops`` works where it is missing.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError
from ..kernels._checks import interpreting

ENV_VAR = "LATENTR3_KERNELS"
_CHOICES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``triton`` and ``triton.language`` import (cached)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def requested_backend() -> str:
    """The value of ``LATENTR3_KERNELS`` ("auto" when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ConfigError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


def select_backend(*tensors: torch.Tensor | None) -> str:
    """Return "triton" or "torch" for an op on ``tensors`` (``None`` entries are skipped)."""
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    want = requested_backend()
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_available():
            raise ConfigError(f"{ENV_VAR}=triton but triton cannot be imported")
        if not on_cuda and not interpreting():
            raise ConfigError(
                f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1 (Triton's CPU "
                "interpreter); unset it or move the tensors to CUDA"
            )
        return "triton"
    if on_cuda and triton_available():
        return "triton"
    return "torch"
