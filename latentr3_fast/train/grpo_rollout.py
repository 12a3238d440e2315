"""GRPO rollout and loss pass of one optimizer step (paper Sec. 3.2.2: sampling Eq. 5, reward
Eq. 6, advantage Eq. 7, loss Eq. 8), prefix-shared: the prompt forward runs once per prompt and
the G latent samples share its KV cache.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .grpo_loss import gaussian_policy_logprob, grpo_row_losses, row_weights
from .rollout_rewards import RewardResult, Rollout

__all__ = ["GRPORollout", "local_prompt_positions", "step_noise"]


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


def step_noise(
    seed: int, rollout_index: int, num_prompts: int, num_generations: int, dim: int
) -> Tensor:
    """eps ~ N(0, 1) of one rollout (paper Eq. 5): [num_prompts, G-1, dim] fp32 on CPU, a pure
    function of (seed, rollout index) so runs resume exactly and ranks agree."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rollout_index)) % (2**63))
    return torch.randn(num_prompts, num_generations - 1, dim, generator=gen, dtype=torch.float32)


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


class GRPORollout:
    """Data layout, rollout and loss pass of :class:`.grpo.GRPOTrainer` (a mixin: it uses the
    trainer's ``cfg``, ``model``, ``train_data``, ``reward``, ``ref_model`` and ``comm``)."""

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
                    latents = self._noisy_latents(model, batch, state, noise)
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
        group = self._adv_group()

        def advantage(part: Tensor) -> Tensor:  # gathers over ranks: a dead peer is named
            return self.comm.run(
                "advantage gather", lambda: grpo_advantage(part, g, cfg.advantage, group)
            )

        adv = torch.cat(
            [advantage(rewards[s : s + share]) for s in range(0, rewards.shape[0], share)]
        ).float()
        return micro, rewards, adv

    def compute_gradients(self, rollout_index: int = 0) -> dict[str, Any]:
        """Rewards, advantages, loss and gradients of one step WITHOUT updating (for tests
        and comparisons). Gradients are summed across ranks and left in ``.grad``
        (not clipped)."""
        self._train_mode()
        for prm in self.params:
            prm.grad = None
        micro, rewards, adv = self.collect(rollout_index)
        agg = self.accumulate_gradients(micro, adv)
        self.comm.all_reduce_gradients(self.params, fill_missing=True)
        logps = [m.target_logp for m in micro]
        return {
            "rewards": rewards,
            "advantages": adv,
            "loss": self.comm.sum_scalar(agg["loss"], "loss all-reduce"),
            "logp": None if any(x is None for x in logps) else logps,
        }

    def _adv_group(self) -> Any:
        """The process group of the advantage statistics (None in one process)."""
        return self.group if self.distributed else None

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

    def _metrics(self, rewards: Tensor, adv: Tensor, g: int) -> dict[str, float]:
        s = self.comm.gather(rewards.detach().float().cpu(), "reward gather").view(-1, g)
        a = self.comm.gather(adv.detach().float().cpu(), "advantage gather")
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
