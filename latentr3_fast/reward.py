"""Drop-in perplexity reward for other trainers (TRL, hand-written GRPO/PPO loops, ...).

Naming across the package: the *perplexity reward* is paper Sec. 3.2.2, Eq. 6,
``s = -exp(-mean_i log p(y_i | x, r, y_<i))``. It lives at three levels, one module each:

* ``latentr3_fast.reward`` (this module): the drop-in reward for any Hugging Face causal LM,
  :class:`PerplexityReward` and the TRL wrapper :func:`make_trl_reward`;
* ``latentr3_fast.ops.perplexity``: tensor ops, ``perplexity_reward(logp, mask)`` (Eq. 6 from
  per-token log-probs), ``mean_logprob`` and ``perplexity_reward_from_hidden`` (from hidden
  states);
* ``latentr3_fast.train.rollout_rewards``: rewards of a GRPO rollout of our trainer,
  ``RolloutPerplexityReward`` (config value ``"ppl"``) and ``HitReward`` (``"hit"``).

``PerplexityReward`` scores ``-PPL(target | prompt, extra)`` without ever materializing
``[rows x positions x vocab]`` logits, with the steps of :mod:`latentr3_fast.model.prefix_scoring`:

1. the prompt (all but its last token) runs ONCE per distinct prompt, filling a KV cache
   (no autograd unless requested);
2. the cache is expanded to the rows that share the prompt (``num_generations`` consecutive rows,
   or any ``prompt_index`` map);
3. ONE forward over the short per-row suffix ``[last prompt token, extra..., target[:-1]]``
   continues on the cache; the hidden states that predict the target tokens go through
   ``latentr3_fast.ops`` (fused LM head + log-softmax + gather, Triton on CUDA).

Feeding the prompt's last token in the suffix (instead of caching it) means the state that
predicts ``target[0]`` is always a suffix position, whether or not extra tokens are present.

``make_trl_reward`` wraps it as a TRL reward function ``f(prompts, completions, **kw)``
scoring the dataset's reference answer after prompt + completion ("reference-answer
perplexity", a verifier-free reward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError
from .model import prefix_scoring
from .model.scoring_inputs import (
    check_cache,
    check_extra,
    check_prompts,
    check_targets,
    pad_token_lists,
    prompt_chunks,
    row_prompt_index,
    tokenize_texts,
)
from .ops import grpo_advantage, mean_logprob, perplexity_reward

__all__ = ["PerplexityReward", "grpo_advantage", "make_trl_reward"]

_REWARD_KINDS = ("neg_ppl", "mean_logprob")
_WHO = "PerplexityReward"


class PerplexityReward(nn.Module):
    """Per-row reward ``-PPL(target | prompt, extra)`` of a Hugging Face causal LM (Eq. 6).

    Args:
        model: any ``transformers`` causal LM (``...ForCausalLM``): the decoder stack comes from
            ``model.get_decoder()`` (fallback ``.model``/``.transformer``), the head from
            ``model.get_output_embeddings()`` (its bias is used when present). Final-logit
            scales (Cohere ``logit_scale``, Granite ``logits_scaling``) are folded into the
            temperature; tanh soft-capping (Gemma 2/3) raises ConfigError.
        tokenizer: optional; needed only by :meth:`score_texts`.
        temperature: softmax temperature of the scored distribution (default 1).
        reward: ``"neg_ppl"`` (``-exp(-mean log p)``, the LatentR3 reward) or
            ``"mean_logprob"`` (``mean log p``).
        grad_prompt: run the prompt forward with autograd. ``None`` (default): only when
            ``prompt_embeds`` requires grad. Set True to get parameter gradients through the
            prompt's keys/values too (e.g. a trainable policy); the suffix (extra embeddings,
            target positions) is always differentiable when grad mode is on.

    The model is not registered as a submodule (``reward.parameters()`` is empty) so wrapping
    a policy in a reward never duplicates its parameters in an optimizer or a state dict.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        temperature: float = 1.0,
        reward: str = "neg_ppl",
        grad_prompt: bool | None = None,
    ) -> None:
        super().__init__()
        if reward not in _REWARD_KINDS:
            raise ConfigError(f"{_WHO}: reward must be one of {_REWARD_KINDS}, got {reward!r}")
        decoder, head = prefix_scoring.decoder_and_head(model, _WHO)
        # Plain attributes (not submodules): see the class docstring.
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "decoder", decoder)
        object.__setattr__(self, "head", head)
        self.tokenizer = tokenizer
        self.temperature = prefix_scoring.logit_temperature(model, temperature, _WHO)
        self.reward = reward
        self.grad_prompt = grad_prompt
        self._cache_kw = prefix_scoring.cache_keyword(decoder)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids`` [B, L] -> [B, L, d] (the model's own embedding layer)."""
        return self.model.get_input_embeddings()(ids)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        extra_embeds: torch.Tensor | None = None,
        extra_ids: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
        num_generations: int = 1,
        prompt_index: torch.Tensor | None = None,
        return_logprobs: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Score the target tokens of every row.

        Args:
            prompt_ids: ``[P, Lp]`` LEFT-padded prompt ids (or pass ``prompt_embeds``
                ``[P, Lp, d]``); ``prompt_mask`` ``[P, Lp]`` 1 = real token (default all 1).
                Every prompt needs >= 1 real token and its last column must be real.
            target_ids: ``[R, T]`` RIGHT-padded ground-truth ids (EOS included if it should
                count); ``target_mask`` ``[R, T]`` (default all 1). ``[P, T]`` is accepted too
                and repeated to the rows of each prompt.
            extra_embeds: optional ``[R, N, d]`` continuous tokens (e.g. latents) placed
                between prompt and target; or ``extra_ids`` ``[R, N]`` (e.g. a completion),
                embedded with the model's input embeddings. ``extra_mask`` ``[R, N]`` marks the
                real ones (pads may sit anywhere; default all 1).
            num_generations: G; rows ``p*G .. p*G+G-1`` share prompt ``p`` (``R = P*G``).
            prompt_index: alternatively ``[R]`` long, the prompt of each row (any order,
                any multiplicity); overrides ``num_generations``.
            return_logprobs: also return the per-token log-probs ``[R, T]`` fp32 (0 at pads).

        Returns:
            ``[R]`` fp32 rewards (``-PPL`` or mean log-prob), differentiable wrt
            ``extra_embeds`` (and ``prompt_embeds`` / parameters, see ``grad_prompt``) when
            grad mode is on; with ``return_logprobs`` a tuple ``(rewards, logp)``.
        """
        device = self.device
        prompt_mask = check_prompts(prompt_ids, prompt_embeds, prompt_mask, device, _WHO)
        num_prompts = prompt_mask.shape[0]
        prompt_index = row_prompt_index(num_prompts, num_generations, prompt_index, device, _WHO)
        rows = prompt_index.numel()
        target_ids, target_mask = check_targets(
            target_ids, target_mask, prompt_index, num_prompts, _WHO
        )
        extra_embeds = self._extra_embeds(extra_ids, extra_embeds, rows)
        extra_mask = check_extra(extra_embeds, extra_mask, rows, device, _WHO)
        grad_prompt = self.grad_prompt
        if grad_prompt is None:
            grad_prompt = prompt_embeds is not None and prompt_embeds.requires_grad
        cache, last_embed = self._encode_prompts(
            prompt_ids, prompt_embeds, prompt_mask, prompt_index, bool(grad_prompt)
        )
        hidden = self._target_hidden(
            cache,
            prompt_mask[:, :-1][prompt_index],
            last_embed[prompt_index],
            extra_embeds,
            extra_mask,
            target_ids,
            target_mask,
        )
        logp = prefix_scoring.target_logprobs(
            hidden,
            self.head.weight,
            getattr(self.head, "bias", None),
            target_ids,
            target_mask,
            self.temperature,
            skip_padding=True,
        )
        keep = target_mask != 0
        reward = (
            perplexity_reward(logp, keep) if self.reward == "neg_ppl" else mean_logprob(logp, keep)
        )
        return (reward, logp) if return_logprobs else reward

    def _extra_embeds(
        self, extra_ids: torch.Tensor | None, extra_embeds: torch.Tensor | None, rows: int
    ) -> torch.Tensor | None:
        """``[R, N, d]`` extra tokens: ``extra_embeds`` as given, or ``extra_ids`` embedded."""
        if extra_ids is not None and extra_embeds is not None:
            raise ConfigError(f"{_WHO}: pass at most one of extra_ids / extra_embeds")
        if extra_ids is None:
            return extra_embeds
        if extra_ids.dim() != 2 or extra_ids.shape[0] != rows:
            raise ConfigError(
                f"{_WHO}: extra_ids must be [R={rows}, N], got {tuple(extra_ids.shape)}"
            )
        return self.embed(extra_ids.to(self.device))

    def _encode_prompts(
        self,
        prompt_ids: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        prompt_mask: torch.Tensor,
        prompt_index: torch.Tensor,
        grad_prompt: bool,
    ) -> tuple[Any, torch.Tensor]:
        """Step 1-2: every prompt but its last token into a KV cache, once per prompt, then the
        cache rows selected for the R rows (None when prompts are one token long).

        Returns:
            ``(cache, last_embed)``; ``last_embed`` ``[P, 1, d]`` embeds each prompt's last token.
        """
        device = self.device
        if prompt_embeds is None:
            prompt_ids = prompt_ids.to(device)
            last_embed = self.embed(prompt_ids[:, -1:])
        else:
            prompt_embeds = prompt_embeds.to(device)
            last_embed = prompt_embeds[:, -1:]
        num_prompts, prompt_len = prompt_mask.shape
        if prompt_len == 1:
            return None, last_embed
        prefix_mask = prompt_mask[:, :-1]
        cache = prefix_scoring.new_cache(self.model)
        with torch.set_grad_enabled(grad_prompt and torch.is_grad_enabled()):
            prefix = (
                self.embed(prompt_ids[:, :-1]) if prompt_embeds is None else prompt_embeds[:, :-1]
            )
            prefix_scoring.encode_prefix(
                self.decoder, self._cache_kw, cache, prefix_mask, inputs_embeds=prefix
            )
        check_cache(cache, prompt_len - 1, _WHO)
        # row r attends to prompt prompt_index[r]'s keys/values
        if prompt_index.numel() != num_prompts or not torch.equal(
            prompt_index, torch.arange(num_prompts, device=device)
        ):
            cache.batch_select_indices(prompt_index)
        return cache, last_embed

    def _uses_hf_checkpointing(self) -> bool:
        return (
            torch.is_grad_enabled()
            and self.decoder.training
            and any(
                getattr(m, "gradient_checkpointing", False) is True for m in self.decoder.modules()
            )
        )

    def _target_hidden(
        self,
        cache: Any,
        past_mask: torch.Tensor,
        last_embed: torch.Tensor,
        extra_embeds: torch.Tensor | None,
        extra_mask: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Step 3: one forward over ``[last prompt token, extra..., target[:-1]]`` per row on
        the cache; returns the ``[R, T, d]`` states that predict the target tokens.

        Args:
            past_mask: ``[R, Lp - 1]`` mask of each row's cached prompt positions.
            last_embed: ``[R, 1, d]`` each row's last prompt token.
        """
        if cache is not None and self._uses_hf_checkpointing():
            raise ConfigError(
                f"{_WHO}: the model uses gradient checkpointing in training mode, "
                "which disables the KV cache the suffix forward continues on: call "
                "model.eval() (or run the reward under torch.no_grad()), or disable "
                "gradient checkpointing"
            )
        num_extra = extra_mask.shape[1]
        parts = [last_embed]
        if num_extra:
            parts.append(extra_embeds.to(last_embed.dtype))
        parts.append(self.embed(target_ids[:, :-1]).to(last_embed.dtype))
        suffix = torch.cat(parts, dim=1)
        ones = torch.ones(target_ids.shape[0], 1, dtype=torch.long, device=self.device)
        suffix_mask = torch.cat([ones, extra_mask, target_mask[:, :-1]], dim=1)
        hidden = prefix_scoring.continue_on_cache(
            self.decoder, self._cache_kw, cache, past_mask, suffix, suffix_mask
        )
        if cache is not None:
            # A model that silently drops the cache (e.g. HF gradient checkpointing in training
            # mode) would score the suffix without the prompt.
            check_cache(cache, past_mask.shape[1] + suffix.shape[1], _WHO)
        return prefix_scoring.predicting_states(
            hidden, suffix_mask, 1 + num_extra, target_ids.shape[1]
        )

    # ------------------------------------------------------------------ text API
    def score_texts(
        self,
        prompts: Sequence[str],
        targets: Sequence[str],
        completions: Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        append_eos: bool = False,
        max_rows: int = 64,
    ) -> torch.Tensor:
        """Rewards of ``targets[i]`` after ``prompts[i] + completions[i]`` (strings).

        Equal prompt strings are encoded once and share the KV cache. The prompt is tokenized
        on its own (``add_special_tokens`` for it, e.g. a BOS), the completion on its own, and
        the target on its own (so its tokens do not depend on the completion), then the ids
        are concatenated. ``append_eos`` appends the tokenizer's EOS to each target.
        Rows are processed in chunks of about ``max_rows`` (whole prompt groups).

        Returns:
            ``[len(prompts)]`` fp32 rewards on the model's device (no autograd).
        """
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ConfigError("PerplexityReward.score_texts needs a tokenizer (tokenizer=...)")
        if len(targets) != len(prompts) or (
            completions is not None and len(completions) != len(prompts)
        ):
            raise DataError(
                f"PerplexityReward.score_texts: got {len(prompts)} prompts, {len(targets)} "
                f"targets and {len(completions) if completions is not None else '-'} completions"
            )
        prompt_number: dict[str, int] = {}  # distinct prompt text -> its prompt index
        for text in prompts:
            prompt_number.setdefault(text, len(prompt_number))
        token_ids = tokenize_texts(
            tokenizer,
            list(prompt_number),
            targets,
            completions,
            add_special_tokens,
            append_eos,
            "PerplexityReward.score_texts",
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows_of_prompt: list[list[int]] = [[] for _ in prompt_number]
        for row, text in enumerate(prompts):
            rows_of_prompt[prompt_number[text]].append(row)
        out = torch.empty(len(prompts), dtype=torch.float32, device=self.device)
        for chunk in prompt_chunks(rows_of_prompt, max_rows):
            self._score_chunk(chunk, rows_of_prompt, *token_ids, pad, out)
        return out

    @torch.no_grad()
    def _score_chunk(
        self,
        chunk: list[int],
        rows_of_prompt: list[list[int]],
        prompt_ids: list[list[int]],
        target_ids: list[list[int]],
        completion_ids: list[list[int]] | None,
        pad: int,
        out: torch.Tensor,
    ) -> None:
        """Score the rows of the prompts in ``chunk`` into ``out`` (one forward call)."""
        device = self.device
        rows = [row for prompt in chunk for row in rows_of_prompt[prompt]]
        prompt_index = torch.tensor(
            [k for k, prompt in enumerate(chunk) for _ in rows_of_prompt[prompt]], device=device
        )
        prompt_batch = pad_token_lists([prompt_ids[p] for p in chunk], pad, True, device)
        target_batch = pad_token_lists([target_ids[r] for r in rows], pad, False, device)
        extra = {}
        if completion_ids is not None:
            completions = [completion_ids[r] for r in rows]
            if max(len(c) for c in completions) > 0:
                extra_ids, extra_mask = pad_token_lists(completions, pad, False, device)
                extra = {"extra_ids": extra_ids, "extra_mask": extra_mask}
        out[torch.tensor(rows, device=device)] = self(
            *prompt_batch, *target_batch, prompt_index=prompt_index, **extra
        ).float()


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(
            part.get("text", "") if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def _render_prompt(prompt: Any, tokenizer: Any, has_template: bool, who: str) -> tuple[str, bool]:
    """``(text, add_special_tokens)`` of a plain or conversational TRL prompt."""
    if isinstance(prompt, str):
        return prompt, True
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if has_template:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return text, False
        lines = [f"{m.get('role', 'user')}: {_message_text(m.get('content'))}\n" for m in prompt]
        return "".join(lines) + "assistant: ", True
    raise DataError(
        f"{who}: a prompt must be a string or a list of {{'role','content'}} messages, "
        f"got {type(prompt).__name__}"
    )


def _render_completion(completion: Any, who: str) -> str:
    """The text of a plain or conversational (its messages' contents) TRL completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(
            _message_text(m.get("content")) if isinstance(m, dict) else str(m) for m in completion
        )
    raise DataError(f"{who}: a completion must be a string or a list of messages")


def make_trl_reward(
    model: nn.Module,
    tokenizer: Any,
    target_column: str = "target",
    *,
    answer_prefix: str = "",
    answer_suffix: str = "",
    append_eos: bool = False,
    reward: str = "neg_ppl",
    temperature: float = 1.0,
    max_rows: int = 64,
    name: str | None = None,
) -> Callable[..., list[float]]:
    """A TRL reward function: ``-PPL(answer | prompt + completion)`` of the dataset's answer.

    The returned ``f(prompts, completions, **kwargs) -> list[float]`` reads the ground truth
    from ``kwargs[target_column]`` (TRL passes every dataset column as a list) and scores the
    token string ``prompt | completion + answer_prefix | target + answer_suffix (+EOS)``.

    * Plain prompts (``str``): the prompt is tokenized with the tokenizer's special tokens
      (e.g. BOS), completion and answer without.
    * Conversational prompts (lists of ``{"role", "content"}``): rendered with the tokenizer's
      chat template (``add_generation_prompt=True``) when it has one, else as
      ``"role: content\\n"`` lines followed by ``"assistant: "``; the completion is the text of
      its assistant message(s).

    Identical prompts (the G completions of a group) share one prompt forward and KV cache.
    Runs under ``torch.no_grad`` with the model temporarily in eval mode (no dropout).
    ``reward="mean_logprob"`` scores the mean log-prob instead.

    Args:
        model: causal LM that scores (the policy itself or a frozen copy).
        tokenizer: its tokenizer. target_column: dataset column with the reference answers.
        name: the function's ``__name__`` (TRL logs rewards under it; default
            ``"ppl_reward_<target_column>"``).
    """
    scorer = PerplexityReward(model, tokenizer, temperature=temperature, reward=reward)
    has_template = bool(getattr(tokenizer, "chat_template", None))

    def reward_fn(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        if target_column not in kwargs:
            raise DataError(
                f"{name}: dataset column {target_column!r} missing from the reward inputs "
                f"(available: {sorted(k for k in kwargs if not k.startswith('log_'))})"
            )
        targets = kwargs[target_column]
        if len(prompts) != len(completions) or len(targets) != len(prompts):
            raise DataError(
                f"{name}: {len(prompts)} prompts, {len(completions)} completions, "
                f"{len(targets)} {target_column!r} values"
            )
        rendered = [_render_prompt(p, tokenizer, has_template, name) for p in prompts]
        texts = [r[0] for r in rendered]
        special = rendered[0][1] if rendered else True
        comps = [_render_completion(c, name) + answer_prefix for c in completions]
        answers = [_message_text(t) + answer_suffix for t in targets]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = scorer.score_texts(
                    texts,
                    answers,
                    comps,
                    add_special_tokens=special,
                    append_eos=append_eos,
                    max_rows=max_rows,
                )
        finally:
            model.train(was_training)
        return [float(s) for s in scores.cpu()]

    name = name or f"ppl_reward_{target_column}"
    reward_fn.__name__ = name
    reward_fn.__qualname__ = name
    reward_fn.scorer = scorer  # type: ignore[attr-defined]
    return reward_fn
