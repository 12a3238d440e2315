"""Score target tokens after a cached prefix: the one core of the reasoner and the drop-in reward.

Both the latent reasoner (paper Sec. 3.1, Eqs. 2-3: the prompt x, then the latents r) and the
perplexity reward (paper Sec. 3.2.2, Eq. 6: ``pi(y_i | x, r^k, y_<i)``) compute the same thing
in three steps, which live here as small functions:

1. :func:`encode_prefix`: one decoder forward over the prefix, filling a KV cache;
2. :func:`continue_on_cache`: one forward over a suffix of embeddings on that cache, giving the
   final-norm hidden states (the ones that predict the target tokens);
3. :func:`target_logprobs`: those hidden states through the fused LM-head log-prob op
   (``latentr3_fast.ops.fused_linear_logprob``), never materializing ``[rows x positions x
   vocab]`` logits.

Positions count non-padding tokens only (:func:`~latentr3_fast.model.ratt.token_positions`),
so left-, right- and unpadded inputs give the same numbers, as ``generate`` does.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import ConfigError
from .logits import final_logit_scale
from .ratt import token_positions

__all__ = [
    "cache_keyword",
    "continue_on_cache",
    "decoder_and_head",
    "encode_prefix",
    "logit_temperature",
    "new_cache",
    "predicting_states",
    "run_decoder",
    "target_logprobs",
]


def cache_keyword(decoder: nn.Module) -> str:
    """The decoder's KV-cache keyword: transformers 5.x renamed ``past_key_values`` to ``cache``."""
    try:
        params = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty dynamic KV cache for ``model`` (a causal LM or its decoder stack)."""
    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: DynamicCache() takes no config
        return DynamicCache()


def decoder_and_head(model: nn.Module, who: str) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (its output is the final-norm hidden state) and the LM head module.

    The decoder comes from ``model.get_decoder()`` (fallback ``.model``, ``.transformer``,
    ``.gpt_neox``, ``.decoder``), the head from ``model.get_output_embeddings()``.
    ``who`` prefixes the error messages.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError(
            f"{who}: model {type(model).__name__} has no output embeddings "
            "(get_output_embeddings() returned None); pass a causal LM (…ForCausalLM)"
        )
    decoder = None
    get_dec = getattr(model, "get_decoder", None)
    if callable(get_dec):
        try:
            decoder = get_dec()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None or decoder is model:
        for name in ("model", "transformer", "gpt_neox", "decoder"):
            candidate = getattr(model, name, None)
            if isinstance(candidate, nn.Module) and candidate is not model:
                decoder = candidate
                break
    if decoder is None or decoder is model:
        raise ConfigError(
            f"{who}: cannot find the decoder stack of {type(model).__name__} "
            "(tried get_decoder(), .model, .transformer, .gpt_neox, .decoder)"
        )
    return decoder, head


def logit_temperature(model: nn.Module, temperature: float, who: str) -> float:
    """The softmax temperature of the fused head with the model's final-logit scale folded in.

    ``logits * s`` (Cohere ``logit_scale``; Granite ``logits_scaling`` is ``s = 1 / value``) is
    temperature ``temperature / s``; a tanh soft-cap (Gemma 2/3) raises ConfigError
    (:func:`~latentr3_fast.model.logits.final_logit_scale`).
    """
    if not temperature > 0:
        raise ConfigError(f"{who}: temperature must be > 0, got {temperature}")
    return float(temperature) / final_logit_scale(model, who)


def run_decoder(
    decoder: nn.Module,
    cache_kw: str,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder forward (no LM head); appends to ``cache`` when given.

    Args:
        decoder: the decoder stack (e.g. ``Qwen2Model``); ``cache_kw`` from :func:`cache_keyword`.
        attention_mask: ``[B, P + S]`` over the cached and the new positions.
        position_ids: ``[B, S]`` positions of the new tokens.
        input_ids: ``[B, S]``, or ``inputs_embeds`` ``[B, S, d]``.
    Returns:
        ``[B, S, d]`` final-norm hidden states.
    """
    kwargs = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": cache is not None,
    }
    if cache is not None:
        kwargs[cache_kw] = cache
    return decoder(**kwargs).last_hidden_state


def encode_prefix(
    decoder: nn.Module,
    cache_kw: str,
    cache: DynamicCache,
    mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode a prefix into the empty ``cache`` (step 1).

    Args:
        mask: ``[B, P]`` 1 = real token (any padding side).
        input_ids: ``[B, P]``, or ``inputs_embeds`` ``[B, P, d]``.
    Returns:
        ``[B, P, d]`` final-norm hidden states; ``cache`` then holds P positions.
    """
    return run_decoder(
        decoder,
        cache_kw,
        mask,
        token_positions(mask),
        cache,
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
    )


def continue_on_cache(
    decoder: nn.Module,
    cache_kw: str,
    cache: DynamicCache | None,
    past_mask: torch.Tensor,
    suffix_embeds: torch.Tensor,
    suffix_mask: torch.Tensor,
) -> torch.Tensor:
    """Run a suffix of embeddings after the cached prefix (step 2; appends to ``cache``).

    Args:
        cache: holds the ``P`` prefix positions (None when ``P = 0``).
        past_mask: ``[B, P]`` mask of the cached positions.
        suffix_embeds: ``[B, S, d]``; ``suffix_mask`` ``[B, S]`` 1 = real token.
    Returns:
        ``[B, S, d]`` hidden states; the suffix's real tokens continue the prefix's positions
        (``sum(past_mask) + 0, 1, ...``).
    """
    offset = past_mask.long().sum(dim=1)
    return run_decoder(
        decoder,
        cache_kw,
        torch.cat([past_mask, suffix_mask], dim=1),
        token_positions(suffix_mask, offset),
        cache,
        inputs_embeds=suffix_embeds,
    )


def predicting_states(
    hidden: torch.Tensor, suffix_mask: torch.Tensor, num_lead: int, target_len: int
) -> torch.Tensor:
    """The suffix states that predict each target token, for a suffix
    ``[lead tokens..., target[:-1]]`` (lead: e.g. the prompt's last token and extra tokens).

    ``target[0]`` is predicted by the last real lead token; ``target[j > 0]`` by the fed
    ``target[j-1]`` at suffix index ``num_lead - 1 + j``.

    Args:
        hidden: ``[R, S, d]`` suffix hidden states; ``suffix_mask``: ``[R, S]``.
        num_lead: lead tokens before the targets (the first one real in every row).
    Returns:
        ``[R, T, d]`` with ``T = target_len``.
    """
    rows, device = hidden.shape[0], hidden.device
    lead = (torch.arange(num_lead, device=device) * suffix_mask[:, :num_lead]).max(dim=1).values
    following = num_lead - 1 + torch.arange(1, target_len, device=device)
    index = torch.cat([lead[:, None], following.expand(rows, target_len - 1)], dim=1)
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))


def target_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    skip_padding: bool = False,
) -> torch.Tensor:
    """Log-probs of the target tokens through the fused LM head (step 3).

    Args:
        hidden: ``[B, T, d]``; ``hidden[:, t]`` predicts ``target_ids[:, t]``.
        head_weight: ``[V, d]``; ``head_bias``: ``[V]`` or None.
        target_ids, target_mask: ``[B, T]`` (mask 1 = real target token).
        temperature: of the softmax, the model's final-logit scale already folded in.
        skip_padding: gather the real positions first so padding never reaches the head (the
            drop-in reward); otherwise every position goes through the op with padding as
            ``ignore_index`` (the reasoner: the path its training numbers were measured with).
    Returns:
        ``[B, T]`` float32, 0 where ``target_mask`` is 0.
    """
    from ..ops import fused_linear_logprob  # late: ops -> kernels is loaded on first use

    b, t, d = hidden.shape
    if skip_padding:
        keep = target_mask != 0
        real = fused_linear_logprob(
            hidden[keep], head_weight, target_ids[keep], head_bias, temperature=temperature
        )
        logp = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)
        return logp.masked_scatter(keep, real)
    targets = target_ids.masked_fill(~target_mask.bool(), -100)
    logp = fused_linear_logprob(
        hidden.reshape(b * t, d),
        head_weight,
        targets.reshape(b * t),
        bias=head_bias,
        ignore_index=-100,
        temperature=temperature,
    )
    return logp.view(b, t)
