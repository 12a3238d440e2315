"""Optimizer, learning-rate schedule and the guarded optimizer step of both trainers.

* optimizers: torch AdamW or bitsandbytes 8-bit AdamW (``optim="adamw"|"adamw_8bit"``);
* schedules: warmup then linear / cosine / constant (the Hugging Face formulas);
* gradient clipping and a non-finite guard (skip the step; stop after N in a row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from .checkpoint import latest_checkpoint

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "NonFiniteGuard",
    "build_optimizer",
    "build_scheduler",
    "check_bitsandbytes",
    "clip_grad_norm",
    "lr_lambda",
]

OPTIMIZERS = ("adamw", "adamw_8bit")
SCHEDULES = ("linear", "cosine", "constant")


def _param_groups(params: nn.Module | Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-D) get none (the HF Trainer rule)."""
    if isinstance(params, nn.Module):
        plist = [p for p in params.parameters() if p.requires_grad]
    else:
        plist = list(params)
        if plist and isinstance(plist[0], dict):  # already param groups
            return plist
        plist = [p for p in plist if p.requires_grad]
    if not plist:
        raise ConfigError("build_optimizer: no trainable parameters")
    decay = [p for p in plist if p.dim() >= 2]
    no_decay = [p for p in plist if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def check_bitsandbytes(what: str) -> None:
    """ConfigError naming ``what`` when bitsandbytes (the ``[bnb]`` extra) is not installed;
    looks the package up without importing it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{what} needs bitsandbytes, which is not installed: "
            "pip install 'latentr3_fast[bnb]' (or use adamw)"
        )


def build_optimizer(
    params: nn.Module | Iterable[Any],
    optim: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of a module (or a parameter list / param groups).

    Args:
        params: module, iterable of parameters, or param-group dicts.
        optim: ``"adamw"`` (torch; fused kernel on CUDA) or ``"adamw_8bit"`` (bitsandbytes;
            needs CUDA).
        lr, weight_decay, betas, eps: the usual AdamW hyper-parameters.
    """
    if optim not in OPTIMIZERS:
        raise ConfigError(f"optim={optim!r}: expected one of {OPTIMIZERS}")
    if not lr > 0:
        raise ConfigError(f"lr={lr}: must be > 0")
    groups = _param_groups(params, weight_decay)
    flat = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in flat)
    if optim == "adamw_8bit":
        check_bitsandbytes("optim='adamw_8bit'")
        if not on_cuda:
            raise ConfigError(
                "optim='adamw_8bit' needs CUDA parameters (bitsandbytes 8-bit AdamW); "
                "use optim='adamw' on CPU"
            )
        try:  # imported only here: bitsandbytes is an optional extra
            import bitsandbytes as bnb
        except Exception as e:  # ImportError or a broken CUDA setup
            raise ConfigError(f"optim='adamw_8bit': bitsandbytes is unusable ({e})") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = on_cuda and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in flat)
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


# ------------------------------------------------------------------------- schedules
def lr_lambda(
    warmup_steps: int, total_steps: int, schedule: str = "linear", min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base lr at scheduler step ``s`` (0-based, before the s-th update).

    Warmup ``s / warmup`` (as Hugging Face's ``get_*_schedule_with_warmup``), then linear decay
    to ``min_lr_ratio`` at ``total_steps``, a half cosine, or constant.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"warmup_steps={warmup_steps}, total_steps={total_steps}: bad values")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio={min_lr_ratio}: must be in [0, 1]")

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = (
            1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        )
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str = "linear",
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with :func:`lr_lambda`; call ``scheduler.step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps, total_steps, schedule, min_lr_ratio)
    )


# ------------------------------------------------------------------------- gradients
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the total L2 grad norm to ``max_norm`` (None/<=0: only measure it).

    Returns the pre-clipping total norm as a 0-d tensor (no host sync here).
    """
    plist = [p for p in params if p.grad is not None]
    if not plist:
        return torch.zeros(())
    limit = max_norm if max_norm is not None and max_norm > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(plist, limit)


class NonFiniteGuard:
    """Skips steps whose loss / grad norm is NaN or inf; raises after ``max_bad_steps`` in a row.

    Usage: ``if guard.ok(loss, grad_norm): optimizer.step() else: optimizer.zero_grad()``.
    The trainer's last checkpoint stays the last good state (nothing is saved from a bad step).
    """

    def __init__(
        self,
        max_bad_steps: int = 5,
        where: str = "training",
        output_dir: str | Path | None = None,
    ) -> None:
        """``output_dir`` (optional): where the trainer checkpoints, so the error can name the
        last good checkpoint (looked up only when raising)."""
        if max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps={max_bad_steps}: must be >= 1")
        self.max_bad_steps = max_bad_steps
        self.where = where
        self.output_dir = output_dir
        self.consecutive = 0
        self.total = 0

    def ok(self, *values: torch.Tensor | float, step: int | None = None) -> bool:
        """True when every value is finite; otherwise count it (and raise at the limit).

        ``step`` (optional): the 1-based number of the step these values belong to; the
        error then says at which step training stopped.
        """
        finite = all(
            bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)
            for v in values
        )
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad_steps:
            at = ""
            if step is not None:
                first = int(step) - self.consecutive + 1
                at = f" at step {int(step)} (non-finite since step {first})"
            last = None
            if self.output_dir is not None:
                try:
                    last = latest_checkpoint(self.output_dir)
                except OSError:  # only decorates the message: never hide the real error
                    last = None
            kept = (
                f"The last good checkpoint is kept at {last}."
                if last is not None
                else "The last checkpoint written before them (if any) is intact."
            )
            raise TrainingError(
                f"{self.where}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient norm{at} (max_bad_steps={self.max_bad_steps}); stopping. {kept}"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))
