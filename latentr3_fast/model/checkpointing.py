"""KV-cache-aware activation checkpointing of the reasoner's decoder layers.

transformers' own gradient checkpointing disables the KV cache, but the reasoner's fast path
(:mod:`latentr3_fast.model.prefix_scoring`) continues a suffix on the prompt's cache. Here each
decoder layer's ``forward`` is wrapped in non-reentrant ``torch.utils.checkpoint`` that keeps
the cache working: the recomputation in backward reads the keys/values the original call saw
through a read-only :class:`_ReplayCache` instead of appending to the cache a second time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "decoder_layers",
    "disable_checkpointing",
    "enable_checkpointing",
    "is_checkpointing",
]


class _ReplayCache:
    """Read-only stand-in for a DynamicCache while a checkpointed layer is recomputed.

    The original call saw the first ``past`` cached positions of its layer; later calls have
    appended (or cropped) since, but never changed those positions, so the replay rebuilds the
    exact keys/values the original attention used, without writing to the cache again.
    """

    def __init__(self, cache: Any, past: int) -> None:
        self._cache = cache
        self._past = past

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._past == 0:
            return key_states, value_states
        layer = self._cache.layers[layer_idx]
        keys = layer.keys[..., : self._past, :]
        values = layer.values[..., : self._past, :]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _checkpointed_forward(layer: nn.Module, idx: int, original: Any, cache_kw: str) -> Any:
    """``layer.forward`` recomputed in backward; runs plainly outside training with grad."""

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not (layer.training and torch.is_grad_enabled()):
            return original(hidden_states, *args, **kwargs)
        cache = kwargs.get(cache_kw)
        past = cache.layers[idx].get_seq_length() if cache is not None else 0
        first_call = [True]

        def run(hidden: torch.Tensor) -> Any:
            if first_call[0]:
                first_call[0] = False
                return original(hidden, *args, **kwargs)
            replay_kwargs = dict(kwargs)
            if cache is not None:
                replay_kwargs[cache_kw] = _ReplayCache(cache, past)
            return original(hidden, *args, **replay_kwargs)

        return torch.utils.checkpoint.checkpoint(run, hidden_states, use_reentrant=False)

    return forward


def decoder_layers(base_model: nn.Module) -> nn.ModuleList:
    """The ``layers`` ModuleList of a decoder stack (e.g. ``Qwen2Model.layers``)."""
    layers = getattr(base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"gradient checkpointing: {type(base_model).__name__} has no `layers` "
            "ModuleList of decoder layers"
        )
    return layers


def enable_checkpointing(layers: nn.ModuleList, cache_kw: str) -> None:
    """Wrap every layer's forward (idempotent); ``cache_kw`` is the decoder's cache keyword."""
    for idx, layer in enumerate(layers):
        if "forward" not in layer.__dict__:
            layer.forward = _checkpointed_forward(layer, idx, layer.forward, cache_kw)


def disable_checkpointing(layers: nn.ModuleList) -> None:
    """Restore every layer's class forward."""
    for layer in layers:
        layer.__dict__.pop("forward", None)


def is_checkpointing(layers: nn.ModuleList) -> bool:
    """Whether any layer's forward is wrapped."""
    return any("forward" in layer.__dict__ for layer in layers)
