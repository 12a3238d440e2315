"""Stage 2: the modified GRPO of LatentR3 (paper Sec. 3.2.2), prefix-shared and fused.

Per optimizer step: ``prompts_per_step`` prompts x ``num_generations`` (G) rows. For every
micro-batch of prompts the trainer

1. runs the prompt forward ONCE (no grad when the backbone is frozen) -> H and the prefix KV;
2. computes r = LatentRATT(H) (+ further latent steps) with grad;
3. expands r to G rows with ``ops.gaussian_expand`` (Eq. 5: row 0 clean, rows 1.. r +
   sigma*eps; eps is drawn once per step from a generator seeded by (seed, step) and reused
   for reward and loss, and it does not depend on the number of ranks);
4. runs ONE suffix forward of [r^k, target] over the G-way expanded prefix cache and gets the
   per-token target log-probs from the fused LM head (``model.target_logprobs``);
5. reward (pluggable, default Eq. 6 ``-exp(-mean log p)``) from the detached log-probs, then
   ``ops.grpo_advantage`` (Eq. 7) over each advantage batch (all-reduced across ranks);
6. loss = -mean_rows A * mean_tokens(min(rho A, clip(rho) A)) (Eq. 8; TRL's "grpo" loss).

The module layout: the loss math in :mod:`.grpo_loss`, the rollout and loss pass (and the two
``loss_pass`` modes) in :mod:`.grpo_rollout`, validation / best-step keeping / checkpoints in
:mod:`.grpo_validation`, and the optimizer loop here.

``GRPOConfig.estimator`` picks what the loss differentiates:

* ``"reparam"`` (the reference, the reparameterization of Eq. 5): the per-token target
  log-probs given the noisy latent, with the gradient flowing through r (rho = 1 in value: an
  advantage-weighted log-likelihood). Near an SFT optimum its expected update is about
  sigma^2 * Hessian * grad of the reward, which points downhill where the log-likelihood is
  concave in r (README, "GRPO: what the reference estimator does").
* ``"score"``: the latent is the action of a Gaussian policy N(r, sigma^2 I); the loss uses its
  log-density log N(r^k; r_theta, sigma^2) (the standard policy-gradient/PPO ratio for a
  continuous action), so the expected update is the gradient of the sigma-smoothed reward.
  The loss pass needs only LatentRATT on the stored prompt states (no suffix forward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .configs import GRPOConfig
from .distributed import Collectives, UsesCollectives
from .grpo_loss import gaussian_policy_logprob, grpo_loss, grpo_row_losses, row_weights
from .grpo_rollout import GRPORollout, local_prompt_positions, step_noise
from .grpo_validation import BEST_WEIGHTS, GRPOValidation, evenly_spaced
from .interrupt import (
    TrainingInterrupted,
    deferred_interrupts,
    honour_interrupt,
    interrupt_requested,
)
from .logging_utils import JsonlLogger, progress_bar
from .optim import NonFiniteGuard, build_optimizer, build_scheduler, clip_grad_norm
from .rollout_rewards import RewardFunction, RolloutPerplexityReward, make_reward

__all__ = [
    "BEST_WEIGHTS",
    "GRPOConfig",
    "GRPOTrainer",
    "evenly_spaced",
    "gaussian_policy_logprob",
    "grpo_loss",
    "grpo_row_losses",
    "local_prompt_positions",
    "row_weights",
    "step_noise",
]


class GRPOTrainer(GRPORollout, GRPOValidation, UsesCollectives):
    """Trains the latent reasoner with the modified GRPO (paper Sec. 3.2.2, Eqs. 5-8).

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
        self.comm = Collectives(process_group, "GRPO", lambda: self.global_step + 1)
        config.validate(self.world)
        self.train_data = list(train_data)
        self._check_inputs()
        self.pad_id = _resolve_pad_id(model, pad_id)
        self.reward = make_reward(config.reward) if reward is None else reward
        self.loss_pass = self._choose_loss_pass()
        self.params = self._set_trainable()
        self.ref_model = self._make_ref_model() if config.beta != 0.0 else None

        p = config.prompts_per_step
        self.steps_per_epoch = len(self.train_data) // p  # the incomplete last batch is dropped
        self.total_rollouts = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.total_steps = self.total_rollouts * config.num_iterations
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optimizer = build_optimizer(
            self.params, config.optim, config.lr, config.weight_decay, config.adam_betas
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
        self._init_validation_state(valid_data)
        if self.out_dir is not None and config.resume:
            self.resume()

    # ---------------------------------------------------------------- setup
    def _check_inputs(self) -> None:
        """ConfigError when the data or the model cannot run this configuration."""
        config, model = self.cfg, self.model
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

    def _choose_loss_pass(self) -> str:
        """``config.loss_pass``, except that a loss the rollout's suffix graph cannot give
        needs the second pass."""
        config, reward = self.cfg, self.reward
        if config.loss_pass == "keep_graph" and (
            reward.uses_completions
            or not reward.needs_target_logprobs
            or config.estimator == "score"  # the loss needs r only, not the suffix graph
        ):
            # the loss tokens are known only after decoding: a second pass is unavoidable
            return "recompute"
        return config.loss_pass

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

    def train_rollout(self, rollout_index: int | None = None) -> list[dict[str, float]]:
        """One rollout of ``prompts_per_step`` prompts followed by ``num_iterations`` optimizer
        steps. Returns the metrics of each optimizer step."""
        cfg, g = self.cfg, self.cfg.num_generations
        rollout = self.rollout_index if rollout_index is None else rollout_index
        t0 = time.perf_counter()
        self._train_mode()
        p_global = cfg.prompts_per_step
        micro, rewards, adv = self.collect(rollout)
        n_loss_rows = p_global * (g if cfg.include_clean_in_loss else g - 1)
        metrics_list = []
        for it in range(cfg.num_iterations):
            if self.global_step >= self.total_steps:
                break
            ts = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            agg = self.accumulate_gradients(micro, adv)
            grad_norm = self._reduce_and_clip()
            loss_total = self.comm.sum_scalar(agg["loss"], "loss all-reduce")
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
                rollout=rollout,
                iteration=it,
                loss=loss_total,
                grad_norm=grad_norm,
                lr=lr,
                clip_frac=agg["clip_frac"],
                skipped=0.0 if ok else 1.0,
                prompts_per_s=p_global / max(elapsed, 1e-9),
            )
            if cfg.beta != 0.0:
                met["kl"] = self.comm.sum_scalar(agg["kl_sum"], "KL all-reduce") / n_loss_rows
            metrics_list.append(met)
        self.rollout_index = rollout + 1
        return metrics_list

    def _reduce_and_clip(self) -> float:
        """All-reduce (sum) the gradients across ranks -- each rank's loss is already divided
        by the GLOBAL row count -- and clip their global norm."""
        # fill_missing: a parameter without a gradient steps with zeros (GRPO's behaviour)
        self.comm.all_reduce_gradients(self.params, fill_missing=True)
        return float(clip_grad_norm(self.params, self.cfg.max_grad_norm))

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
                    if met["step"] % cfg.logging_steps == 0:
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
                    and cfg.save_steps
                    and self.global_step % cfg.save_steps < cfg.num_iterations
                    and self.global_step < stop
                    and not self.stopped_early
                ):
                    self.save_checkpoint()
                # every rank checkpoints and stops after the same step (a signal may reach one)
                if self.comm.any_rank(interrupt_requested(), "interrupt flag"):
                    honour_interrupt()
                    self.save_checkpoint()  # rank 0 writes, every rank waits for it
                    where = (
                        f"checkpoint saved in {self.out_dir}"
                        if self.out_dir is not None
                        else "no output dir"
                    )
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


def _resolve_pad_id(model: Any, pad_id: int | None) -> int:
    """``pad_id``, else the tokenizer's pad token, else its EOS."""
    tok = getattr(model, "tokenizer", None)
    if pad_id is None and tok is not None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ConfigError("GRPOTrainer: pad_id is required when the model has no tokenizer")
    return int(pad_id)


# keep the default reward importable from here too
__all__ += ["RolloutPerplexityReward"]
