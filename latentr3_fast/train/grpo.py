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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
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
from .rewards import RewardFunction, RolloutPerplexityReward, make_reward

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


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """Options of the GRPO stage (TRL vocabulary where TRL has a name for it).

    Sizes count PROMPTS and are global (all ranks together); every prompt yields G rows.
    """

    output_dir: str | None = None
    # sampling / reward / advantage
    num_generations: int = 8  # G = 1 clean + G-1 noisy rows per prompt
    sigma: float = 1.5  # std of the latent noise (reference 1.5)
    reward: str = "ppl"  # "ppl" (LatentR3) | "hit" (original GRPO; needs a decoder)
    # "reparam" (reference) | "score" (Gaussian policy log-density). With "score" the latent
    # is the only stochastic action: the gradient reaches the backbone (trainable="all") only
    # through r, and with reward="hit" the decoded completions (deterministic beam search) get
    # no log-prob term.
    estimator: str = "reparam"
    advantage: str = "batch"  # "batch" | "group" | "none"
    advantage_batch: int | None = None  # prompts per advantage batch; None = prompts_per_step
    # loss
    epsilon: float = 0.2  # PPO clip: ratio >= 1 - epsilon
    epsilon_high: float | None = 0.28  # ratio <= 1 + epsilon_high (None = epsilon)
    num_iterations: int = 1  # optimizer steps per rollout (>1 keeps old log-probs)
    beta: float = 0.0  # KL to a frozen reference copy; only with trainable="all"
    include_clean_in_loss: bool = True  # reference: yes; paper eq. 8 sums k = 1..K only
    loss_pass: str = "keep_graph"  # "keep_graph" | "recompute" (see module docstring)
    reuse_prompt_states: bool = True  # recompute mode: keep H + prefix KV between passes
    trainable: str = "latent"  # "latent" (LatentRATT only) | "all"
    # batch
    prompts_per_step: int = 32
    micro_batch_prompts: int = 8  # per rank and forward
    # optimization
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 200
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    optim: str = "adamw"  # "adamw" | "adamw_8bit"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 1.0
    max_steps: int | None = None  # cap on optimizer steps
    seed: int = 0
    # bookkeeping
    logging_steps: int = 1
    save_steps: int | None = None  # optimizer steps between checkpoints (None: only at end)
    keep_checkpoints: int = 2  # checkpoints kept (0 = all)
    resume: bool = False
    progress: bool = True
    max_bad_steps: int = 5  # consecutive non-finite steps before TrainingError
    tensorboard: bool = False  # mirror the JSON-lines log to TensorBoard (output_dir/tb)
    save_final_model: bool = True  # write the whole reasoner to output_dir/final at the end
    # validation (only when the trainer is given valid_data): at step 0 and every eval_steps
    # steps, the mean clean-latent reward and target NLL on a fixed subset; the best step
    # (step 0 = the starting model included) is kept and loaded at the end
    eval_steps: int | None = None  # None: about 10 validations per run
    eval_samples: int | None = 256  # evenly spaced validation rows (None: all of them)
    eval_metric: str = "reward"  # "reward" (mean clean reward, higher is better) | "nll"
    eval_batch_size: int = 16
    patience: int | None = None  # stop after this many validations without improvement
    load_best_at_end: bool = True  # False: keep the last step's weights (the reference)

    @property
    def advantage_prompts(self) -> int:
        """Prompts per advantage batch (global)."""
        return self.prompts_per_step if self.advantage_batch is None else self.advantage_batch

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError naming the option when a value or combination is invalid."""
        choices = {
            "reward": ("ppl", "hit"),
            "estimator": ("reparam", "score"),
            "advantage": ("batch", "group", "none"),
            "loss_pass": ("keep_graph", "recompute"),
            "trainable": ("latent", "all"),
            "schedule": ("cosine", "linear", "constant"),
            "optim": ("adamw", "adamw_8bit"),
            "eval_metric": ("reward", "nll"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"GRPOConfig.{name}={getattr(self, name)!r} is not one of {allowed}"
                )
        for name in ("eval_steps", "eval_samples", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    f"GRPOConfig.{name} must be >= 1 or None, got {getattr(self, name)}"
                )
        if self.eval_batch_size < 1:
            raise ConfigError(
                f"GRPOConfig.eval_batch_size must be >= 1, got {self.eval_batch_size}"
            )
        if self.num_generations < 2:
            raise ConfigError(
                f"GRPOConfig.num_generations must be >= 2 (1 clean + noisy rows), "
                f"got {self.num_generations}"
            )
        for name in ("prompts_per_step", "micro_batch_prompts", "num_iterations", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sigma < 0 or not math.isfinite(self.sigma):
            raise ConfigError(f"GRPOConfig.sigma must be finite and >= 0, got {self.sigma}")
        if self.epsilon < 0 or self.clip_high < 0:
            raise ConfigError(
                f"GRPOConfig.epsilon/epsilon_high must be >= 0, got {self.epsilon}/"
                f"{self.epsilon_high}"
            )
        if self.lr <= 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ConfigError("GRPOConfig.lr must be > 0, max_grad_norm and warmup_steps >= 0")
        if self.epochs <= 0:
            raise ConfigError(f"GRPOConfig.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"GRPOConfig.max_steps must be >= 1, got {self.max_steps}")
        a = self.advantage_prompts
        if a < 1 or self.prompts_per_step % a != 0:
            raise ConfigError(
                f"GRPOConfig.advantage_batch={a} must divide prompts_per_step="
                f"{self.prompts_per_step}"
            )
        if a % world_size != 0:
            raise ConfigError(
                f"GRPOConfig.advantage_batch={a} prompts must be divisible by the world size "
                f"{world_size} (every rank holds an equal share of each advantage batch)"
            )
        if self.estimator == "score" and not self.sigma > 0:
            raise ConfigError(
                f"GRPOConfig.sigma={self.sigma}: estimator='score' needs sigma > 0 (the "
                "latent policy N(r, sigma^2 I) has no density at sigma = 0)"
            )
        if self.estimator == "score" and self.beta != 0.0:
            raise ConfigError(
                f"GRPOConfig.beta={self.beta}: the KL term is defined on target log-probs and "
                "needs estimator='reparam'"
            )
        if self.beta != 0.0 and self.trainable == "latent":
            raise ConfigError(
                f"GRPOConfig.beta={self.beta}: beta must be 0 when trainable='latent'. The "
                "backbone and LM head are frozen, so only LatentRATT trains and the KL to a "
                "reference model is identically zero (SPEC 5.5); use trainable='all' for a "
                "KL-regularized full-model run"
            )


# --------------------------------------------------------------------------------------------


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
