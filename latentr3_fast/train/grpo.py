"""Stage 2: the modified GRPO of LatentR3 (SPEC section 5), prefix-shared and fused.

Per optimizer step: ``prompts_per_step`` prompts x ``num_generations`` (G) rows. For every
micro-batch of prompts the trainer

1. runs the prompt forward ONCE (no grad when the backbone is frozen) -> H and the prefix KV;
2. computes r = LatentRATT(H) (+ further latent steps) with grad;
3. expands r to G rows with ``ops.gaussian_expand`` (row 0 clean, rows 1.. r + sigma*eps; eps
   is drawn once per step from a generator seeded by (seed, step) and reused for reward and
   loss, and it does not depend on the number of ranks);
4. runs ONE suffix forward of [r^k, target] over the G-way expanded prefix cache and gets the
   per-token target log-probs from the fused LM head (``model.target_logprobs``);
5. reward (pluggable, default ``-exp(-mean log p)``) from the detached log-probs, then
   ``ops.grpo_advantage`` over each advantage batch (all-reduced across ranks);
6. loss = -mean_rows A * mean_tokens(min(rho A, clip(rho) A)) (TRL's "grpo" loss).

The advantage batch spans several micro-batches, so the rewards of all of them must exist
before any loss. Two correct ways are implemented (``GRPOConfig.loss_pass``):

* ``"keep_graph"``: the rollout's suffix forward runs WITH grad; its log-probs give the reward
  (detached) and, once the advantages are known, the loss -- one suffix forward per row, at the
  cost of holding every micro-batch's suffix graph until the backward.
* ``"recompute"``: the rollout runs fully under no_grad (rewards first), then a second,
  grad-enabled pass recomputes the suffix. The frozen prompt's H and KV cache from the rollout
  are reused (``reuse_prompt_states``), so the prompt forward still runs once.

``bench/bench_grpo.py`` measures both; ``keep_graph`` is the default (see the README table).
A reward that computes the loss on decoded completions (``reward="hit"``) needs the second pass.

``GRPOConfig.estimator`` picks what the loss differentiates:

* ``"reparam"`` (the reference, SPEC 5.4): the per-token target log-probs given the noisy
  latent, with the gradient flowing through r (rho = 1 in value: an advantage-weighted
  log-likelihood). Near an SFT optimum its expected update is about sigma^2 * Hessian * grad
  of the reward, which points downhill where the log-likelihood is concave in r (README,
  "GRPO: what the reference estimator does").
* ``"score"``: the latent is the action of a Gaussian policy N(r, sigma^2 I); the loss uses its
  log-density log N(r^k; r_theta, sigma^2) (the standard policy-gradient/PPO ratio for a
  continuous action), so the expected update is the gradient of the sigma-smoothed reward.
  The loss pass needs only LatentRATT on the stored prompt states (no suffix forward).

Validation (``valid_data=``; the reference has none and returns the last step): at step 0
and every ``eval_steps`` steps the mean clean-latent reward and target NLL on a fixed subset
of the validation rows (all-reduced, so every rank decides alike); the best step's weights
(step 0, the starting model, included) are kept in memory and inside every checkpoint
(``best_weights.safetensors`` when they differ from the checkpoint's own), training can stop
after ``patience`` validations without improvement, and the best weights are loaded at the
end unless ``load_best_at_end=False``. ``output_dir/validation.json`` holds the curve and the
selected step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, TrainingError
from .common import (
    JsonlLogger,
    NonFiniteGuard,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    latest_checkpoint,
    load_checkpoint,
    progress_bar,
    save_checkpoint,
)
from .configs import GRPOConfig
from .interrupt import (
    TrainingInterrupted,
    deferred_interrupts,
    honour_interrupt,
    interrupt_requested,
)
from .rewards import RewardFunction, RewardResult, Rollout, RolloutPerplexityReward, make_reward

BEST_WEIGHTS = "best_weights"  # NAME.safetensors in a checkpoint: the best validated weights

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "grpo_row_losses",
    "grpo_loss",
    "gaussian_policy_logprob",
    "local_prompt_positions",
    "step_noise",
    "evenly_spaced",
]


# --------------------------------------------------------------------------------------------
# the loss (pure functions, shared by the trainer and the reference-style bench step)
# --------------------------------------------------------------------------------------------


def grpo_row_losses(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row PPO-clip GRPO loss, averaged over each row's tokens.

    ``rho = exp(logp - old_logp)``; token loss ``-min(rho*A, clip(rho, 1-eps, 1+eps_high)*A)``
    (+ ``beta * KL_k3`` when ``ref_logp`` is given); row loss = mean over the row's tokens.

    Args:
        logp: [R, T] per-token log-probs under the current policy (with grad).
        old_logp: [R, T] log-probs of the sampling policy (detached).
        mask: [R, T] 1 = token counts.
        advantages: [R].
        ref_logp: [R, T] reference-policy log-probs, needed when beta != 0.
    Returns:
        (row_loss [R] fp32, stats: clip_frac [scalar] and kl [R] when beta != 0).
    """
    hi = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(torch.float32)
    a = advantages.to(torch.float32).unsqueeze(1)
    ratio = torch.exp(logp.float() - old_logp.float())
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + hi)
    tok = -torch.minimum(ratio * a, clipped * a)
    stats: dict[str, Tensor] = {}
    ntok = m.sum(-1).clamp_min(1.0)
    if beta != 0.0:
        if ref_logp is None:
            raise ConfigError("grpo_row_losses: beta != 0 needs ref_logp")
        d = ref_logp.float() - logp.float()
        kl = torch.exp(d) - d - 1.0
        tok = tok + beta * kl
        stats["kl"] = ((kl * m).sum(-1) / ntok).detach()
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - epsilon) & (a < 0)) | ((ratio > 1.0 + hi) & (a > 0))
        stats["clip_frac"] = (was_clipped.float() * m).sum() / m.sum().clamp_min(1.0)
    return (tok * m).sum(-1) / ntok, stats


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    num_generations: int,
    include_clean: bool = True,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """Scalar GRPO loss of one advantage batch: mean over the (included) rows of
    :func:`grpo_row_losses`. Rows are in ``p*G + k`` order; ``include_clean=False`` drops the
    k = 0 rows (the paper's sum over k = 1..K)."""
    rows, _ = grpo_row_losses(
        logp, old_logp, mask, advantages, epsilon, epsilon_high, ref_logp, beta
    )
    w = row_weights(rows.shape[0], num_generations, include_clean, rows.device)
    return (rows * w).sum() / w.sum()


def row_weights(num_rows: int, num_generations: int, include_clean: bool, device=None) -> Tensor:
    """[R] fp32: 1 for rows in the loss, 0 for the clean rows when they are excluded."""
    w = torch.ones(num_rows, dtype=torch.float32, device=device)
    if not include_clean:
        w[::num_generations] = 0.0
    return w


def gaussian_policy_logprob(r: Tensor, r_old: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """Log-density (up to its constant) of each row's latent action under N(r, sigma^2 I).

    The actions were sampled at the rollout: row ``p*G + 0`` is the clean ``r_old[p]``, row
    ``p*G + k`` is ``r_old[p] + sigma * noise[p, k-1]``.

    Args:
        r: ``[P, d]`` current mean (with grad), r_old: ``[P, d]`` rollout mean (detached),
        noise: ``[P, G-1, d]`` standard normal draws.
    Returns:
        ``[P*G]`` fp32 ``-||a - r||^2 / (2 sigma^2)``; at ``r == r_old`` it is ``-||eps||^2/2``.
    """
    r_old = r_old.detach().float()
    eps = torch.cat([torch.zeros_like(noise[:, :1]), noise.float()], dim=1)  # [P, G, d]
    actions = r_old.unsqueeze(1) + sigma * eps.to(r_old.device)
    diff = actions - r.float().unsqueeze(1)
    return (-(diff * diff).sum(-1) / (2.0 * sigma * sigma)).reshape(-1)


# --------------------------------------------------------------------------------------------
# step layout (independent of the number of ranks)
# --------------------------------------------------------------------------------------------


def local_prompt_positions(
    prompts_per_step: int, advantage_batch: int, world_size: int, rank: int
) -> list[int]:
    """Positions (within the global step) of the prompts this rank holds.

    Advantage batch j is global positions [j*A, (j+1)*A); each rank holds an equal contiguous
    share of every advantage batch, so the advantage statistics (all-reduced over ranks) and
    hence the update do not depend on the number of ranks.
    """
    share = advantage_batch // world_size
    out: list[int] = []
    for j in range(prompts_per_step // advantage_batch):
        base = j * advantage_batch + rank * share
        out.extend(range(base, base + share))
    return out


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """Indices of ``k`` rows spread evenly over ``n`` (all of them when ``k`` is None or
    >= n): the fixed validation subset, spanning the whole (often time-ordered) split."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def step_noise(seed: int, rollout_index: int, num_prompts: int, g: int, dim: int) -> Tensor:
    """eps ~ N(0, 1) of one rollout: [num_prompts, G-1, dim] fp32 on CPU, a pure function of
    (seed, rollout index) so runs resume exactly and ranks agree."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rollout_index)) % (2**63))
    return torch.randn(num_prompts, g - 1, dim, generator=gen, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _MicroState:
    """What the rollout of one micro-batch leaves for the loss pass."""

    positions: list[int]  # local positions within the rank's share of the step
    batch: Any  # data.Batch on device
    noise: Tensor  # [P, G-1, d]
    rewards: Tensor  # [R] fp32
    target_logp: Tensor | None  # [R, T] detached rollout log-probs of the target (or None)
    loss_ids: Tensor  # [R, T] tokens the loss covers
    loss_mask: Tensor  # [R, T]
    logp_graph: Tensor | None = None  # keep_graph: [R, T] with grad
    old_logp: Tensor | None = None  # num_iterations > 1: [R, T] detached
    ref_logp: Tensor | None = None  # beta != 0: [R, T]
    prompt_state: tuple[Tensor, Any] | None = None  # recompute + reuse: (H, prefix cache)
    latents_old: Tensor | None = None  # estimator "score": [P, N, d] rollout latents


class GRPOTrainer:
    """Trains the latent reasoner with the modified GRPO (SPEC 5).

    Args:
        model: a ``LatentReasoner`` (typically after SFT). With ``trainable="latent"`` its
            backbone (and LM head) is frozen and only ``model.ratt`` trains.
        config: :class:`GRPOConfig`.
        train_data: encoded training samples (``data.EncodedSample``: prompt ids, target ids).
        reward: a :class:`RewardFunction`; default from ``config.reward``.
        pad_id: padding id for collation (default: the tokenizer's pad, else EOS).
        process_group: torch.distributed group for the advantage statistics and gradient
            all-reduce (default: the world, when initialized).
        valid_data: encoded validation samples. When given, the trainer validates at step 0
            and every ``eval_steps`` steps on a fixed subset (``eval_samples`` evenly spaced
            rows), keeps the best weights (step 0 included), can stop early (``patience``) and
            loads the best weights at the end (``load_best_at_end``). Without it the trainer
            does what the reference does: it returns the last step's weights.
    """

    def __init__(
        self,
        model: Any,
        config: GRPOConfig,
        train_data: Sequence[Any],
        reward: RewardFunction | None = None,
        pad_id: int | None = None,
        process_group: Any = None,
        valid_data: Sequence[Any] | None = None,
    ) -> None:
        self.model = model
        self.cfg = config
        self.group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if self.distributed else 1
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        config.validate(self.world)
        self.train_data = list(train_data)
        if len(self.train_data) < config.prompts_per_step:
            raise ConfigError(
                f"GRPOConfig.prompts_per_step={config.prompts_per_step} exceeds the "
                f"{len(self.train_data)} training samples"
            )
        if getattr(model, "num_latent", 1) < 1:
            raise ConfigError(
                "GRPO needs at least one latent step (model.num_latent >= 1): the noise is "
                "added to the latent, and 'w/o reasoning' has none"
            )
        if config.estimator == "score" and getattr(model, "num_latent", 1) > 1:
            # the Gaussian policy is on r_1 only; r_2..r_N depend on the parameters
            # deterministically, and their gradient is not in a score-function loss
            raise ConfigError(
                f"GRPOConfig.estimator='score' supports one latent step, the model has "
                f"num_latent={model.num_latent}: use estimator='reparam' (the reference)"
            )
        tok = getattr(model, "tokenizer", None)
        if pad_id is None and tok is not None:
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad_id is None:
            raise ConfigError("GRPOTrainer: pad_id is required when the model has no tokenizer")
        self.pad_id = int(pad_id)
        if reward is None:
            reward = make_reward(config.reward)
        self.reward = reward
        if config.loss_pass == "keep_graph" and (
            reward.uses_completions
            or not reward.needs_target_logprobs
            or config.estimator == "score"  # the loss needs r only, not the suffix graph
        ):
            # the loss tokens are known only after decoding: a second pass is unavoidable
            self.loss_pass = "recompute"
        else:
            self.loss_pass = config.loss_pass
        self.params = self._set_trainable()
        self.ref_model = self._make_ref_model() if config.beta != 0.0 else None

        p = config.prompts_per_step
        self.steps_per_epoch = len(self.train_data) // p  # the incomplete last batch is dropped
        self.total_rollouts = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.total_steps = self.total_rollouts * config.num_iterations
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optimizer = build_optimizer(
            self.params, config.optimizer, config.lr, config.weight_decay, config.adam_betas
        )
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, config.warmup_steps, self.total_steps
        )
        self.guard = NonFiniteGuard(
            config.max_bad_steps, where="GRPO", output_dir=config.output_dir
        )
        self.global_step = 0  # optimizer steps done
        self.rollout_index = 0  # rollouts done
        self.history: list[dict[str, float]] = []
        self.out_dir = Path(config.output_dir) if config.output_dir else None
        # validation state (everything a checkpoint must restore)
        valid = list(valid_data or [])
        self.valid_data = [valid[i] for i in evenly_spaced(len(valid), config.eval_samples)]
        self.eval_steps = config.eval_steps or max(1, round(self.total_steps / 10))
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_eval_step = -1
        self.stopped_early = False
        self.val_history: list[dict[str, Any]] = []
        self._best_state: dict[str, Tensor] | None = None  # CPU copy of the best weights
        if self.out_dir is not None and config.resume:
            self.resume()

    # ---------------------------------------------------------------- setup
    def _set_trainable(self) -> list[torch.nn.Parameter]:
        cfg = self.cfg
        for prm in self.model.parameters():
            prm.requires_grad_(cfg.trainable == "all")
        if cfg.trainable == "latent":
            ratt = getattr(self.model, "ratt", None)
            if ratt is None:
                raise ConfigError(
                    "GRPOConfig.trainable='latent' needs a LatentRATT (model.ratt is None, "
                    "latent_mode='hidden'); use trainable='all'"
                )
            for prm in ratt.parameters():
                prm.requires_grad_(True)
            return list(ratt.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    def _make_ref_model(self):
        import copy

        ref = copy.deepcopy(self.model)
        for prm in ref.parameters():
            prm.requires_grad_(False)
        ref.eval()
        return ref

    def _train_mode(self) -> None:
        # a frozen backbone stays in eval mode: no dropout, so the rollout's log-probs, the
        # loss pass and the reference model all see the same deterministic policy
        self.model.train()
        if self.cfg.trainable == "latent":
            self.model.backbone.eval()

    # ---------------------------------------------------------------- data layout
    def _epoch_perm(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(int(self.cfg.seed) * 7919 + epoch)
        return torch.randperm(len(self.train_data), generator=gen)

    def step_sample_indices(self, rollout_index: int) -> list[int]:
        """Dataset indices of the GLOBAL prompts of one rollout (all ranks)."""
        p = self.cfg.prompts_per_step
        epoch, k = divmod(rollout_index, self.steps_per_epoch)
        return self._epoch_perm(epoch)[k * p : (k + 1) * p].tolist()

    def _collate(self, indices: Sequence[int]):
        from ..data import collate

        return collate([self.train_data[i] for i in indices], self.pad_id).to(self.model.device)

    # ---------------------------------------------------------------- forwards
    def _prompt_state(self, model, batch, grad: bool) -> tuple[Tensor, Any]:
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            return model.encode_prompt(batch.prompt_ids, batch.prompt_mask)

    def _policy_logp(
        self, model, batch, state, noise: Tensor, loss_ids: Tensor, loss_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Latent(s) -> G-way expansion -> suffix forward on the expanded prefix cache ->
        fused target log-probs. Grad follows the ambient grad mode.

        Returns: (logp [R, T] fp32, expanded latents [R, N, d]).
        """
        g = self.cfg.num_generations
        ecache = model.expand_cache(state[1], g)
        pmask = batch.prompt_mask.repeat_interleave(g, dim=0)
        expanded = self._noisy_latents(model, batch, state, noise, ecache, pmask)
        h = model.suffix_forward(ecache, pmask, expanded.to(model.dtype), loss_ids)
        return model.target_logprobs(h, loss_ids, loss_mask), expanded

    def _noisy_latents(self, model, batch, state, noise, ecache=None, pmask=None) -> Tensor:
        """[P*G, N, d] latents of the G rows: the noise goes on r_1; with N > 1 the later
        steps are generated from each row's (noisy) r_1 on its expanded cache (the paper's
        appendix), so row 0 keeps the clean chain."""
        from ..ops import gaussian_expand

        g, hidden, cache = self.cfg.num_generations, state[0], state[1]
        n = model.num_latent
        r1 = model.latents(hidden, batch.prompt_mask, cache, num_latent=1)  # [P, 1, d]
        first, _ = gaussian_expand(r1, g, self.cfg.sigma, noise=noise.to(r1.device))
        if n == 1:
            return first
        if ecache is None:
            ecache = model.expand_cache(cache, g)
            pmask = batch.prompt_mask.repeat_interleave(g, dim=0)
        h_rows = hidden.repeat_interleave(g, dim=0)
        return model.latents(h_rows, pmask, ecache, first=first[:, 0])

    def _latents_only(self, model, batch, state, noise: Tensor) -> Tensor:
        return self._noisy_latents(model, batch, state, noise)

    # ---------------------------------------------------------------- rollout / loss pass
    def _rollout(self, positions: list[int], indices: list[int], noise: Tensor) -> _MicroState:
        """Rewards of one micro-batch (and whatever the loss pass will need)."""
        cfg, model, g = self.cfg, self.model, self.cfg.num_generations
        batch = self._collate(indices)
        tgt_ids = batch.target_ids.repeat_interleave(g, dim=0)
        tgt_mask = batch.target_mask.repeat_interleave(g, dim=0)
        keep = self.loss_pass == "keep_graph"
        score = cfg.estimator == "score"
        state = self._prompt_state(model, batch, grad=keep and cfg.trainable == "all")
        logp = None
        with contextlib.nullcontext() if keep else torch.no_grad():
            if self.reward.needs_target_logprobs:
                logp, latents = self._policy_logp(model, batch, state, noise, tgt_ids, tgt_mask)
            else:
                with torch.no_grad():
                    latents = self._latents_only(model, batch, state, noise)
        with torch.no_grad():
            result: RewardResult = self.reward(
                Rollout(
                    model=model,
                    prompt_ids=batch.prompt_ids,
                    prompt_mask=batch.prompt_mask,
                    target_ids=batch.target_ids,
                    target_mask=batch.target_mask,
                    latents=latents.detach(),
                    prompt_cache=state[1],
                    target_logp=None if logp is None else logp.detach(),
                    num_generations=g,
                    indices=torch.tensor(indices),
                )
            )
        if result.completion_ids is not None and self.reward.uses_completions:
            loss_ids, loss_mask = result.completion_ids, result.completion_mask
            logp = None  # the rollout's log-probs are of the target, not of the completions
        else:
            loss_ids, loss_mask = tgt_ids, tgt_mask
        ms = _MicroState(
            positions=positions,
            batch=batch,
            noise=noise,
            rewards=result.rewards.detach().float(),
            target_logp=None if logp is None else logp.detach(),
            loss_ids=loss_ids,
            loss_mask=loss_mask,
        )
        if keep:
            ms.logp_graph = logp
        elif cfg.reuse_prompt_states and cfg.trainable == "latent":
            ms.prompt_state = state
        if score:
            ms.latents_old = latents.detach()[:: cfg.num_generations]
        with torch.no_grad():
            if cfg.num_iterations > 1 and not score:
                if logp is None:
                    logp, _ = self._policy_logp(model, batch, state, noise, loss_ids, loss_mask)
                ms.old_logp = logp.detach()
            if self.ref_model is not None:
                rstate = self._prompt_state(self.ref_model, batch, grad=False)
                ms.ref_logp, _ = self._policy_logp(
                    self.ref_model, batch, rstate, noise, loss_ids, loss_mask
                )
        return ms

    def _loss_backward(self, ms: _MicroState, adv: Tensor, denom: float) -> dict[str, float]:
        """Loss of one micro-batch, scaled so the step's loss is a mean over all its rows
        (all ranks), and its backward."""
        cfg, model = self.cfg, self.model
        if cfg.estimator == "score":
            return self._score_loss_backward(ms, adv, denom)
        logp = ms.logp_graph
        ms.logp_graph = None  # consumed: later iterations recompute
        if logp is None:
            state = ms.prompt_state
            if state is None:
                state = self._prompt_state(model, ms.batch, grad=cfg.trainable == "all")
            logp, _ = self._policy_logp(model, ms.batch, state, ms.noise, ms.loss_ids, ms.loss_mask)
        old = ms.old_logp if ms.old_logp is not None else logp.detach()
        rows, stats = grpo_row_losses(
            logp, old, ms.loss_mask, adv, cfg.epsilon, cfg.epsilon_high, ms.ref_logp, cfg.beta
        )
        w = row_weights(rows.shape[0], cfg.num_generations, cfg.include_clean_in_loss, rows.device)
        loss = (rows * w).sum() / denom
        loss.backward()
        out = {"loss": float(loss.detach()), "clip_frac": float(stats["clip_frac"])}
        if "kl" in stats:
            out["kl_sum"] = float((stats["kl"] * w).sum())
        return out

    def _score_loss_backward(self, ms: _MicroState, adv: Tensor, denom: float) -> dict[str, float]:
        """estimator="score": PPO-clip on the Gaussian latent policy's log-density; the old
        log-density (``r_theta == r_old``) is ``-||eps||^2 / 2`` in closed form."""
        cfg, model = self.cfg, self.model
        state = ms.prompt_state
        if state is None:
            state = self._prompt_state(model, ms.batch, grad=cfg.trainable == "all")
        hidden, cache = state
        r = model.latents(hidden, ms.batch.prompt_mask, cache, num_latent=1)[:, 0]  # noised step
        logp = gaussian_policy_logprob(r, ms.latents_old[:, 0], ms.noise, cfg.sigma)
        old = gaussian_policy_logprob(
            ms.latents_old[:, 0], ms.latents_old[:, 0], ms.noise, cfg.sigma
        )
        ones = torch.ones_like(logp).unsqueeze(1)
        rows, stats = grpo_row_losses(
            logp.unsqueeze(1), old.unsqueeze(1), ones, adv, cfg.epsilon, cfg.epsilon_high
        )
        w = row_weights(rows.shape[0], cfg.num_generations, cfg.include_clean_in_loss, rows.device)
        loss = (rows * w).sum() / denom
        loss.backward()
        return {"loss": float(loss.detach()), "clip_frac": float(stats["clip_frac"])}

    # ---------------------------------------------------------------- one rollout + updates
    def collect(self, rollout_index: int) -> tuple[list[_MicroState], Tensor, Tensor]:
        """Rollout of one step on this rank: micro-batch states, rewards [P_local*G] and
        advantages [P_local*G] (batch statistics all-reduced across ranks)."""
        cfg, g = self.cfg, self.cfg.num_generations
        p_global = cfg.prompts_per_step
        a_global = cfg.advantage_prompts
        indices = self.step_sample_indices(rollout_index)
        positions = local_prompt_positions(p_global, a_global, self.world, self.rank)
        d = self.model.lm_head_weight.shape[1]
        noise_all = step_noise(cfg.seed, rollout_index, p_global, g, d)
        mb = cfg.micro_batch_prompts
        micro: list[_MicroState] = []
        for s in range(0, len(positions), mb):
            pos = positions[s : s + mb]
            micro.append(
                self._rollout(
                    list(range(s, s + len(pos))), [indices[i] for i in pos], noise_all[pos]
                )
            )

        from ..ops import grpo_advantage

        rewards = torch.cat([m.rewards for m in micro])  # [P_local * G]
        share = (a_global // self.world) * g  # rows of one advantage batch on this rank
        adv = torch.cat(
            [
                grpo_advantage(
                    rewards[s : s + share], g, mode=cfg.advantage, group=self._adv_group()
                )
                for s in range(0, rewards.shape[0], share)
            ]
        ).float()
        return micro, rewards, adv

    def accumulate_gradients(self, micro: list[_MicroState], adv: Tensor) -> dict[str, float]:
        """Loss pass over all micro-batches; leaves the (this-rank) gradients in ``.grad``.
        Returns this rank's loss share, mean clip fraction and KL sum."""
        cfg = self.cfg
        g = cfg.num_generations
        n_loss_rows = cfg.prompts_per_step * (g if cfg.include_clean_in_loss else g - 1)
        agg: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0, "kl_sum": 0.0}
        offset = 0
        for m in micro:
            r = m.rewards.shape[0]
            out = self._loss_backward(m, adv[offset : offset + r], float(n_loss_rows))
            offset += r
            agg["loss"] += out["loss"]
            agg["clip_frac"] += out["clip_frac"] / len(micro)
            agg["kl_sum"] += out.get("kl_sum", 0.0)
        return agg

    def compute_gradients(self, rollout_index: int = 0) -> dict[str, Any]:
        """Rewards, advantages, loss and gradients of one step WITHOUT updating (for tests
        and comparisons). Gradients are summed across ranks and left in ``.grad``
        (not clipped)."""
        self._train_mode()
        for prm in self.params:
            prm.grad = None
        micro, rewards, adv = self.collect(rollout_index)
        agg = self.accumulate_gradients(micro, adv)
        self._all_reduce_grads()
        logps = [m.target_logp for m in micro]
        return {
            "rewards": rewards,
            "advantages": adv,
            "loss": self._sum_scalar(agg["loss"]),
            "logp": None if any(x is None for x in logps) else logps,
        }

    def train_rollout(self, rollout_index: int | None = None) -> list[dict[str, float]]:
        """One rollout of ``prompts_per_step`` prompts followed by ``num_iterations`` optimizer
        steps. Returns the metrics of each optimizer step."""
        cfg, g = self.cfg, self.cfg.num_generations
        ri = self.rollout_index if rollout_index is None else rollout_index
        t0 = time.perf_counter()
        self._train_mode()
        p_global = cfg.prompts_per_step
        micro, rewards, adv = self.collect(ri)
        n_loss_rows = p_global * (g if cfg.include_clean_in_loss else g - 1)
        metrics_list = []
        for it in range(cfg.num_iterations):
            if self.global_step >= self.total_steps:
                break
            ts = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            agg = self.accumulate_gradients(micro, adv)
            grad_norm = self._reduce_and_clip()
            loss_total = self._sum_scalar(agg["loss"])
            # raises TrainingError after N bad steps in a row
            ok = self.guard.ok(loss_total, grad_norm, step=self.global_step + 1)
            if ok:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.global_step += 1
            elapsed = time.perf_counter() - (t0 if it == 0 else ts)
            met = self._metrics(rewards, adv, g)
            met.update(
                step=self.global_step,
                rollout=ri,
                iteration=it,
                loss=loss_total,
                grad_norm=grad_norm,
                lr=lr,
                clip_frac=agg["clip_frac"],
                skipped=0.0 if ok else 1.0,
                prompts_per_s=p_global / max(elapsed, 1e-9),
            )
            if cfg.beta != 0.0:
                met["kl"] = self._sum_scalar(agg["kl_sum"]) / n_loss_rows
            metrics_list.append(met)
        self.rollout_index = ri + 1
        return metrics_list

    def _adv_group(self):
        return self.group if self.distributed else None

    def _reduce_and_clip(self) -> float:
        """All-reduce (sum) the gradients across ranks -- each rank's loss is already divided
        by the GLOBAL row count -- and clip their global norm."""
        self._all_reduce_grads()
        return float(clip_grad_norm(self.params, self.cfg.max_grad_norm))

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over ranks in one flat fp32 bucket (one collective)."""
        if not (self.distributed and self.world > 1):
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in self.params])
        dist.all_reduce(flat, group=self.group)
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[off : off + n].view_as(p.grad))
            off += n

    def _sum_scalar(self, x: float) -> float:
        if not (self.distributed and self.world > 1):
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t)

    def _gather(self, t: Tensor) -> Tensor:
        if not (self.distributed and self.world > 1):
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def _metrics(self, rewards: Tensor, adv: Tensor, g: int) -> dict[str, float]:
        s = self._gather(rewards.detach().float().cpu()).view(-1, g)
        a = self._gather(adv.detach().float().cpu())
        clean, noisy = s[:, 0], s[:, 1:]
        return {
            "reward_clean_mean": float(clean.mean()),
            "reward_clean_std": float(clean.std(unbiased=False)),
            "reward_noisy_mean": float(noisy.mean()),
            "reward_noisy_std": float(noisy.std(unbiased=False)),
            "frac_noisy_gt_clean": float((noisy > clean[:, None]).float().mean()),
            "adv_mean": float(a.mean()),
            "adv_abs_mean": float(a.abs().mean()),
        }

    # ---------------------------------------------------------------- the loop
    def train(self, num_steps: int | None = None) -> list[dict[str, float]]:
        """Run until ``total_steps`` optimizer steps (or ``num_steps`` more in this call, e.g.
        to interleave evaluation); log every step, checkpoint, return the per-step metrics."""
        cfg = self.cfg
        stop = self.total_steps
        if num_steps is not None:
            stop = min(stop, self.global_step + num_steps)
        main = self.rank == 0
        logger = JsonlLogger(
            self.out_dir / "grpo_log.jsonl" if (self.out_dir is not None and main) else None,
            tensorboard_dir=(
                self.out_dir / "tb" if (cfg.tensorboard and self.out_dir and main) else None
            ),
            # drop records of steps after the resumed checkpoint: they are redone now (from
            # step 0 that includes the step-0 validation)
            resume_step=(self.global_step or -1) if cfg.resume else None,
        )
        bar = progress_bar(
            self.total_steps, desc="grpo", enabled=cfg.progress and main, initial=self.global_step
        )
        k = self.eval_steps
        interrupts = deferred_interrupts()  # Ctrl-C/SIGTERM: finish the rollout, checkpoint
        interrupts.__enter__()
        try:
            if self.valid_data and self.last_eval_step < 0 and not self.stopped_early:
                self.stopped_early = self._validate_and_track(logger)  # step 0: the start
                bar.set_postfix(self._val_postfix(), refresh=False)
            while self.global_step < stop and not self.stopped_early:
                before = self.global_step
                for met in self.train_rollout():
                    self.history.append(met)
                    if met["step"] % cfg.log_every == 0:
                        logger.log(met, step=int(met["step"]))
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{met['loss']:.3g}",
                        clean=f"{met['reward_clean_mean']:.4g}",
                        noisy=f"{met['reward_noisy_mean']:.4g}",
                        **self._val_postfix(),
                        refresh=False,
                    )
                due = self.global_step // k > before // k or self.global_step >= self.total_steps
                if self.valid_data and due and self.last_eval_step != self.global_step:
                    self.stopped_early = self._validate_and_track(logger)
                    bar.set_postfix(self._val_postfix(), refresh=False)
                if (
                    self.out_dir is not None
                    and cfg.save_every
                    and self.global_step % cfg.save_every < cfg.num_iterations
                    and self.global_step < stop
                    and not self.stopped_early
                ):
                    self.save_checkpoint()
                if interrupt_requested():
                    honour_interrupt()
                    saved = self.save_checkpoint() if self.out_dir is not None else None
                    where = f"checkpoint saved in {self.out_dir}" if saved else "no checkpoint"
                    raise TrainingInterrupted(
                        f"GRPO interrupted after step {self.global_step}: {where} "
                        "(--resume continues from it)"
                    )
        finally:
            interrupts.__exit__(None, None, None)
            bar.close()
            logger.close()
        finished = self.global_step >= self.total_steps or self.stopped_early
        if self.out_dir is not None:
            self.save_checkpoint()  # the last weights, and the best ones beside them
        if finished:
            self._select_final_weights()
        if self.out_dir is not None and finished and main and cfg.save_final_model:
            self.model.save_pretrained(self.out_dir / "final")  # the selected weights
        return self.history

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Clean-latent (no noise) validation on the fixed subset ``self.valid_data``.

        Returns ``{"reward": mean over rows of -exp(mean token NLL), "nll": NLL per target
        token (nats, EOS included, token-weighted as in the SFT validation and the swap
        test), "rows": number of rows}``. Distributed: the batches are dealt round-robin to
        the ranks and the fp64 sums all-reduced, so every rank returns the same values and
        makes the same keep/stop decision (call on every rank).
        """
        from ..data import collate
        from ..ops import ppl_reward

        data = self.valid_data
        if not data:
            raise ConfigError("GRPOTrainer.validate: no validation data (pass valid_data=)")
        model = self.model
        was_training = model.training
        model.eval()
        acc = torch.zeros(4, dtype=torch.float64, device=model.device)  # reward, nll, tok, rows
        bs = self.cfg.eval_batch_size
        try:
            for s in list(range(0, len(data), bs))[self.rank :: self.world]:
                batch = collate(list(data[s : s + bs]), self.pad_id).to(model.device)
                hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
                r = model.latents(hidden, batch.prompt_mask, cache)
                h = model.suffix_forward(
                    cache, batch.prompt_mask, r.to(model.dtype), batch.target_ids
                )
                logp = model.target_logprobs(h, batch.target_ids, batch.target_mask).float()
                m = batch.target_mask.float()
                acc[0] += ppl_reward(logp, batch.target_mask).double().sum()
                acc[1] -= (logp * m).double().sum()
                acc[2] += m.double().sum()
                acc[3] += len(batch)
        finally:
            model.train(was_training)
        if self.distributed and self.world > 1:
            dist.all_reduce(acc, group=self.group)
        reward, nll, tokens, rows = acc.tolist()
        return {"reward": reward / rows, "nll": nll / max(tokens, 1.0), "rows": int(rows)}

    def _validate_and_track(self, logger: JsonlLogger) -> bool:
        """Validate at the current step, log it, keep the weights when they are the best so
        far; True when ``patience`` validations in a row did not improve (stop)."""
        cfg = self.cfg
        vals = self.validate()
        value = vals[cfg.eval_metric]
        if cfg.eval_metric == "reward":
            better = self.best_value is None or value > self.best_value
        else:
            better = self.best_value is None or value < self.best_value
        improved = math.isfinite(value) and better  # a non-finite value is never the best
        rec = {
            "event": "validation",
            "val_reward": vals["reward"],
            "val_nll": vals["nll"],
            "val_rows": vals["rows"],
            "improved": improved,
        }
        self.val_history.append({"step": self.global_step, **rec})
        logger.log(rec, step=self.global_step)
        self.last_eval_step = self.global_step
        if improved:
            self.best_value, self.best_step, self.bad_evals = value, self.global_step, 0
            self._best_state = self._snapshot()
        else:
            self.bad_evals += 1
        self._write_validation_json()
        return cfg.patience is not None and self.bad_evals >= cfg.patience

    def _snapshot(self) -> dict[str, Tensor]:
        return {
            k: v.detach().to("cpu", copy=True) for k, v in self._ckpt_module().state_dict().items()
        }

    def _val_postfix(self) -> dict[str, str]:
        if not self.val_history:
            return {}
        key = "val_" + self.cfg.eval_metric
        return {"val": f"{self.val_history[-1][key]:.4g}", "best": str(self.best_step)}

    @property
    def selected_step(self) -> int:
        """The step whose weights the model holds at the end of training: the best
        validated step, or the last step without validation / with load_best_at_end=False."""
        if self.cfg.load_best_at_end and self.best_step is not None:
            return self.best_step
        return self.global_step

    def _select_final_weights(self) -> None:
        """End of training: load the best validated weights (unless the reference's last
        step is asked for)."""
        best = self._best_state
        if self.cfg.load_best_at_end and best is not None and self.best_step != self.global_step:
            self._ckpt_module().load_state_dict(best)
        self._write_validation_json()

    def validation_summary(self) -> dict[str, Any]:
        """What ``output_dir/validation.json`` holds: the metric, the best and the selected
        step and the validation curve ``[{step, val_reward, val_nll, improved}, ...]``."""
        return {
            "metric": self.cfg.eval_metric,
            "eval_steps": self.eval_steps,
            "rows": len(self.valid_data),
            "best_step": self.best_step,
            "best_value": self.best_value,
            "selected_step": self.selected_step,
            "selection": "best" if self.cfg.load_best_at_end else "last",
            "last_step": self.global_step,
            "total_steps": self.total_steps,
            "stopped_early": self.stopped_early,
            "patience": self.cfg.patience,
            "curve": list(self.val_history),
        }

    def _write_validation_json(self) -> None:
        if self.out_dir is None or self.rank != 0 or not self.val_history:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "validation.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.validation_summary(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def mean_clean_reward(self, samples: Sequence[Any], batch_size: int = 16) -> dict[str, float]:
        """Mean clean-latent reward (-perplexity of the target) and mean target log-prob on
        held-out samples (no noise)."""
        from ..data import collate
        from ..ops import ppl_reward

        model = self.model
        was_training = model.training
        model.eval()
        tot_r, tot_lp, n = 0.0, 0.0, 0
        for s in range(0, len(samples), batch_size):
            batch = collate(list(samples[s : s + batch_size]), self.pad_id).to(model.device)
            hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
            r = model.latents(hidden, batch.prompt_mask, cache)
            h = model.suffix_forward(cache, batch.prompt_mask, r.to(model.dtype), batch.target_ids)
            logp = model.target_logprobs(h, batch.target_ids, batch.target_mask).float()
            m = batch.target_mask.float()
            tot_r += float(ppl_reward(logp, batch.target_mask).sum())
            tot_lp += float(((logp * m).sum(-1) / m.sum(-1)).sum())
            n += len(batch)
        model.train(was_training)
        return {"reward": tot_r / max(n, 1), "mean_logprob": tot_lp / max(n, 1)}

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_module(self):
        # frozen backbone: checkpoint only LatentRATT (KBs instead of the whole LLM)
        return self.model.ratt if self.cfg.trainable == "latent" else self.model

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint ``output_dir/checkpoints/step-XXXXXXXX`` via ``common``: trainable
        weights (LatentRATT only when the backbone is frozen), optimizer, scheduler, RNG and
        the data position; keeps the newest ``save_total_limit``."""
        if self.out_dir is None or self.rank != 0:
            return None
        state = {
            "stage": "grpo",
            "global_step": self.global_step,
            "rollout_index": self.rollout_index,
            "guard": self.guard.state_dict(),
            "trainable": self.cfg.trainable,
            "estimator": self.cfg.estimator,
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "extra"},
            "validation": {
                "metric": self.cfg.eval_metric,
                "best_value": self.best_value,
                "best_step": self.best_step,
                "bad_evals": self.bad_evals,
                "last_eval_step": self.last_eval_step,
                "stopped_early": self.stopped_early,
                "history": self.val_history,
            },
        }
        # the best weights travel inside the checkpoint (atomic with the state naming them);
        # when the best step is this step they are the checkpoint's own weights
        extra = None
        if self._best_state is not None and self.best_step != self.global_step:
            extra = {BEST_WEIGHTS: self._best_state}
        return save_checkpoint(
            self.out_dir,
            self.global_step,
            self._ckpt_module(),
            self.optimizer,
            self.scheduler,
            trainer_state=json.loads(json.dumps(state, default=str)),
            keep_last=self.cfg.save_total_limit,
            extra_weights=extra,
        )

    def resume(self) -> bool:
        """Load the newest checkpoint in ``output_dir``; False when there is none."""
        last = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        if last is None:
            return False
        meta = load_checkpoint(last, self._ckpt_module(), self.optimizer, self.scheduler)
        if meta.get("stage") != "grpo" or meta.get("trainable") != self.cfg.trainable:
            raise ConfigError(
                f"{last}: not a GRPO checkpoint with trainable={self.cfg.trainable!r}"
            )
        if meta.get("estimator", "reparam") != self.cfg.estimator:
            raise ConfigError(
                f"{last}: written with estimator={meta.get('estimator', 'reparam')!r}, resumed "
                f"with estimator={self.cfg.estimator!r}; resume with the same estimator"
            )
        self.global_step = int(meta["global_step"])
        self.rollout_index = int(meta["rollout_index"])
        self.guard.load_state_dict(meta.get("guard", {}))
        val = meta.get("validation")
        if val and val.get("history"):
            if val["metric"] != self.cfg.eval_metric:
                raise ConfigError(
                    f"{last}: validated with eval_metric={val['metric']!r}, resumed with "
                    f"eval_metric={self.cfg.eval_metric!r}; resume with the same metric"
                )
            self.best_value, self.best_step = val["best_value"], val["best_step"]
            self.bad_evals = int(val["bad_evals"])
            self.last_eval_step = int(val["last_eval_step"])
            self.stopped_early = bool(val["stopped_early"])
            self.val_history = list(val["history"])
            if self.best_step == self.global_step:
                self._best_state = self._snapshot()
            elif self.best_step is not None:
                path = last / f"{BEST_WEIGHTS}.safetensors"
                if not path.is_file():
                    raise TrainingError(
                        f"{last}: names best step {self.best_step} but has no {path.name}"
                    )
                from safetensors.torch import load_file

                self._best_state = load_file(str(path))
        return True


# keep the default reward importable from here too
__all__ += ["RolloutPerplexityReward"]
