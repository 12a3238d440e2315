"""Rollout rewards of our GRPO trainer (paper Sec. 3.2.2 "Reward Design" and Sec. 4.3.4).

The trainer runs one *rollout* per micro-batch of prompts: the prompt forward, the latent(s),
the G-way Gaussian expansion (Eq. 5) and (when the reward asks for it) the suffix forward that
yields the per-token log-probs of the ground-truth target. A reward object turns that rollout
into one scalar per row. (Naming: this module holds the rewards *of a rollout*; the drop-in
reward for other trainers is ``latentr3_fast.reward``, the tensor ops ``latentr3_fast.ops``.)

* :class:`RolloutPerplexityReward` (config ``reward="ppl"``, the paper's modified GRPO):
  the perplexity reward of Eq. 6, ``s = -exp(-mean log p(y))``, from the log-probs the rollout
  already computed; no decoding. (``latentr3_fast.reward.PerplexityReward`` computes the same
  reward from a plain Hugging Face model.)
* :class:`HitReward` (config ``reward="hit"``, "original GRPO", paper Sec. 4.3.4 / App. F):
  decode every row with a constrained decoder and reward 1 when the decoded title equals the
  target's title. It also returns the decoded completions, on which the trainer then computes
  the policy loss.

A custom reward implements :class:`RewardFunction`; a TRL-style completion reward
``f(prompts, completions, **kwargs) -> list[float]`` plugs into :class:`HitReward` as
``score_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..eval.metrics import normalize_title  # the one title-matching rule (the reference's)

__all__ = [
    "Rollout",
    "RewardResult",
    "RewardFunction",
    "RolloutPerplexityReward",
    "HitReward",
    "beam_decoder",
    "exact_title_match",
    "make_reward",
    "normalize_title",
]


@dataclass
class Rollout:
    """Everything a reward may look at for one micro-batch (all tensors detached).

    P prompts, G = ``num_generations`` rows per prompt, R = P*G rows in ``repeat_interleave``
    order (row ``p*G + k``; k = 0 is the clean latent).

    Attributes:
        model: the LatentReasoner being trained.
        prompt_ids, prompt_mask: LongTensor[P, Lp], left-padded.
        target_ids, target_mask: LongTensor[P, T], right-padded (EOS included).
        latents: Tensor[R, N, d], the (noisy) latent vectors fed at the thought slot(s).
        prompt_cache: the P-row prefix KV cache (prompt only). Decoders must not mutate it:
            expand or copy it first (``model.expand_cache``).
        target_logp: Tensor[R, T] fp32 per-token log-probs of the target (0 at padding), or
            None when the reward declared ``needs_target_logprobs = False``.
        num_generations: G.
        indices: LongTensor[P], dataset indices of the prompts (for rewards with side data).
    """

    model: Any
    prompt_ids: Tensor
    prompt_mask: Tensor
    target_ids: Tensor
    target_mask: Tensor
    latents: Tensor
    prompt_cache: Any
    target_logp: Tensor | None
    num_generations: int
    indices: Tensor | None = None


@dataclass
class RewardResult:
    """Output of a reward.

    Attributes:
        rewards: Tensor[R] fp32, one scalar per row.
        completion_ids: LongTensor[R, Tc] right-padded tokens on which the policy loss is
            computed instead of the ground-truth target (decoded answers), or None = target.
        completion_mask: LongTensor[R, Tc] (1 = real token), required with completion_ids.
    """

    rewards: Tensor
    completion_ids: Tensor | None = None
    completion_mask: Tensor | None = None


@runtime_checkable
class RewardFunction(Protocol):
    """What the GRPO trainer needs from a reward.

    ``needs_target_logprobs``: the rollout must run the suffix forward over the ground-truth
    target (the PPL reward); a decoding reward sets it False and saves that forward.
    ``uses_completions``: the loss is computed on ``RewardResult.completion_ids`` (this forces
    the trainer's two-pass mode, since the loss tokens are known only after the reward).
    """

    name: str
    needs_target_logprobs: bool
    uses_completions: bool

    def __call__(self, rollout: Rollout) -> RewardResult: ...


class RolloutPerplexityReward:
    """The perplexity reward of the ground-truth target (paper Eq. 6): ``-exp(-mean_i log p_i)``."""

    name = "ppl"
    needs_target_logprobs = True
    uses_completions = False

    def __call__(self, rollout: Rollout) -> RewardResult:
        from ..ops import perplexity_reward

        if rollout.target_logp is None:
            raise ConfigError("RolloutPerplexityReward needs rollout.target_logp (suffix forward)")
        mask = rollout.target_mask.repeat_interleave(rollout.num_generations, dim=0)
        return RewardResult(rewards=perplexity_reward(rollout.target_logp.float(), mask).float())


def exact_title_match(
    prompts: Sequence[str], completions: Sequence[str], targets: Sequence[str], **_: Any
) -> list[float]:
    """TRL-style reward ``f(prompts, completions, **kwargs)``: 1.0 when the normalized
    completion equals the normalized target title, else 0.0."""
    return [
        1.0 if normalize_title(c) == normalize_title(t) else 0.0
        for c, t in zip(completions, targets, strict=True)
    ]


# decoder(rollout) -> list of R token-id lists: the decoded answer of every row (row p*G + k
# continues prompt p after the latent(s) rollout.latents[p*G + k]), EOS included when produced
Decoder = Callable[[Rollout], list[list[int]]]


def beam_decoder(
    trie: Any,
    num_beams: int = 1,
    length_penalty: float = 0.0,
    max_new_tokens: int = 128,
    rows_per_call: int = 64,
) -> Decoder:
    """A :data:`Decoder` running the catalogue-constrained beam search
    (``latentr3_fast.decode.beam_search``) on every row and returning its best hypothesis.

    Each row is decoded with its own (noisy) latent; the prompt is re-encoded per row by
    ``beam_search`` (the "original GRPO" variant decodes, which is what makes it slow).

    Args:
        trie: the catalogue ``ItemTrie`` (``latentr3_fast.decode.catalogue_trie``).
        num_beams: beams per row (1 = greedy constrained decoding).
        length_penalty: 0.0 = D3 scoring, 1.0 = BIGRec.
        rows_per_call: rows decoded per ``beam_search`` call (memory bound).
    """

    def decode(rollout: Rollout) -> list[list[int]]:
        from ..decode import beam_search

        g = rollout.num_generations
        ids = rollout.prompt_ids.repeat_interleave(g, dim=0)
        mask = rollout.prompt_mask.repeat_interleave(g, dim=0)
        out: list[list[int]] = []
        for s in range(0, ids.shape[0], rows_per_call):
            res = beam_search(
                rollout.model,
                ids[s : s + rows_per_call],
                mask[s : s + rows_per_call],
                trie,
                num_beams=num_beams,
                num_return=1,
                length_penalty=length_penalty,
                max_new_tokens=max_new_tokens,
                latents=rollout.latents[s : s + rows_per_call],
            )
            out.extend(seqs[0] for seqs in res.sequences(trie))
        return out

    return decode


class HitReward:
    """0/1 exact-match reward on the decoded answer ("original GRPO", paper Sec. 4.3.4).

    Args:
        decoder: decodes one answer per row (see ``Decoder``), typically
            :func:`beam_decoder` (constrained beam search over the item trie).
        score_fn: TRL-style ``f(prompts, completions, targets=...) -> list[float]``;
            default :func:`exact_title_match`.
        eos_id, pad_id: used to build completion tensors.
    """

    name = "hit"
    needs_target_logprobs = False
    uses_completions = True

    def __init__(
        self,
        decoder: Decoder,
        score_fn: Callable[..., list[float]] = exact_title_match,
        *,
        eos_id: int,
        pad_id: int | None = None,
    ) -> None:
        self.decoder = decoder
        self.score_fn = score_fn
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)

    def __call__(self, rollout: Rollout) -> RewardResult:
        tok = rollout.model.tokenizer
        g = rollout.num_generations
        seqs = self.decoder(rollout)
        if len(seqs) != rollout.latents.shape[0]:
            raise ConfigError(
                f"HitReward decoder returned {len(seqs)} sequences for "
                f"{rollout.latents.shape[0]} rows"
            )
        completions = [tok.decode(s, skip_special_tokens=True) for s in seqs]
        targets = []
        for p in range(rollout.target_ids.shape[0]):
            ids = rollout.target_ids[p][rollout.target_mask[p].bool()].tolist()
            targets.extend([tok.decode(ids, skip_special_tokens=True)] * g)
        prompts = [""] * len(seqs)  # prompt text is not needed by the title match
        scores = self.score_fn(prompts, completions, targets=targets)
        rewards = torch.tensor(scores, dtype=torch.float32, device=rollout.latents.device)
        # completions -> right-padded tensors; an empty decode still gets one EOS token so that
        # every row has at least one loss token
        seqs = [list(s) if len(s) else [self.eos_id] for s in seqs]
        tc = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), tc), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), tc), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        dev = rollout.latents.device
        return RewardResult(rewards, ids.to(dev), mask.to(dev))


def make_reward(name: str, **kwargs: Any) -> RewardFunction:
    """Build a reward by its config name ("ppl" | "hit")."""
    if name == "ppl":
        return RolloutPerplexityReward()
    if name == "hit":
        if "decoder" not in kwargs:
            raise ConfigError(
                "reward='hit' needs a decoder (constrained beam search over the item trie); "
                "pass reward=HitReward(decoder=..., eos_id=...) to GRPOTrainer"
            )
        return HitReward(**kwargs)
    raise ConfigError(f"GRPOConfig.reward must be 'ppl' or 'hit', got {name!r}")
