"""The backbone's own final-logit transform, read from its config (one place for every user).

Some causal LMs change the logits after the LM head: Cohere multiplies them by
``logit_scale``, Granite divides them by ``logits_scaling``, Gemma 2 (and Gemma 3 when set)
applies a tanh soft-cap ``cap * tanh(logits / cap)``. The package's fused LM-head log-prob op
and the beam search compute ``h @ W^T + b`` themselves, so they must apply the same transform
or they would silently score a different distribution than the model defines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["final_logit_scale"]


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def final_logit_scale(model: nn.Module, who: str) -> float:
    """The multiplier ``s`` with ``model logits = s * (h @ W^T + b)``.

    Cohere ``logit_scale`` gives ``s = logit_scale``; Granite ``logits_scaling`` gives
    ``s = 1 / logits_scaling``; both at once multiply. A linear scale is a softmax temperature
    ``1 / s``, which the fused op supports. A tanh soft-cap (``final_logit_softcapping``,
    Gemma 2/3) is not linear and raises ConfigError, as does a learned (tensor) or
    non-positive scale.

    Args:
        model: a ``transformers`` causal LM (its ``config``, or the text config of a
            multimodal one, is read; ``model.logit_scale`` takes precedence, as in Cohere).
        who: prefix of the error messages (the caller's name).
    """
    config = _text_config(model)
    if config is None:
        return 1.0
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        raise ConfigError(
            f"{who}: {type(model).__name__} uses final_logit_softcapping={cap} (tanh "
            "soft-cap), which the fused log-prob head does not implement; use a backbone "
            "without it (or set config.final_logit_softcapping=None knowingly)"
        )
    s = 1.0
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "logit_scale", None)
    if isinstance(scale, torch.Tensor):  # nn.Parameter included
        raise ConfigError(f"{who}: a learned (tensor) logit_scale is not supported")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        if not scale > 0:
            raise ConfigError(f"{who}: logit_scale={scale} must be > 0")
        s *= float(scale)
    div = getattr(config, "logits_scaling", None)
    if isinstance(div, (int, float)) and not isinstance(div, bool) and div != 1:
        if not div > 0:
            raise ConfigError(f"{who}: logits_scaling={div} must be > 0")
        s /= float(div)
    return s
