"""What decoding needs from a reasoner: a structural type instead of ``Any``.

``latentr3_fast.model.LatentReasoner`` satisfies it; decode imports nothing from ``model``
at runtime, and ``model`` nothing from decode.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Reasoner"]


class Reasoner(Protocol):
    """The reasoner of paper Eq. (1): prompt ``x`` -> latent thoughts ``r`` -> item ``y``.

    ``cache`` arguments are the backbone's KV cache (a transformers ``DynamicCache``).
    """

    tokenizer: Any
    backbone: Any  # the transformers causal LM (its config picks the attention backend)
    num_latent: int
    logit_scale: float  # the backbone's final-logit scale (1.0 for most models)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, d]`` output projection."""
        ...

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """``[V]`` output bias, or None."""
        ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` token ids -> ``[..., d]`` input embeddings."""
        ...

    def encode_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """``[B, Lp]`` prompt -> (hidden ``[B, Lp, d]``, its KV cache)."""
        ...

    def latents(self, hidden: torch.Tensor, prompt_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """Latent thoughts ``[B, N, d]`` (paper Sec. 3.1, Eqs. 2-3); ``cache`` is left as given."""
        ...

    def forward_embeds(
        self, inputs_embeds: torch.Tensor, past_mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """``[B, S, d]`` embeddings after ``past_mask`` ``[B, P]`` -> hidden ``[B, S, d]``
        (appends to ``cache``)."""
        ...

    def expand_cache(self, cache: Any, repeats: int) -> Any:
        """A copy of ``cache`` with every row repeated ``repeats`` times (row-major)."""
        ...

    def _base_forward(
        self,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Backbone forward with an explicit (possibly 4-D additive) mask and positions
        (exact ranking's tree attention)."""
        ...
