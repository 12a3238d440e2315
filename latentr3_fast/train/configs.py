"""The options of the two training stages: ``SFTConfig`` (paper Sec. 3.2.1) and ``GRPOConfig``
(paper Sec. 3.2.2).

Each field carries its ``--help`` text in ``metadata["help"]``; ``metadata["flag"]`` names its
command-line option where that is not ``--sft-<name>`` / ``--grpo-<name>`` (the CLI of
``python -m latentr3_fast.train`` is generated from these classes, see ``config.py``). Values
are checked when a config is built (``__post_init__``); a bad value raises ``OptionError``,
which names the option as ``SFTConfig: lr ...`` here and as its flag (``--sft-lr ...``) on the
command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..errors import ConfigError
from .optim import OPTIMIZERS, SCHEDULES

_OPTION = re.compile(r"\{(\w+)\}")


class OptionError(ConfigError):
    """A bad option value. ``template`` writes each option involved as ``{field}``, so the same
    check reads ``GRPOConfig: sigma must be >= 0`` in Python and ``--sigma must be >= 0`` on the
    command line (``rendered``)."""

    def __init__(self, owner: str, template: str):
        self.owner = owner
        self.template = template
        super().__init__(f"{owner}: {self.rendered(lambda name: name)}")

    def rendered(self, option_name: Callable[[str], str]) -> str:
        """The message with every ``{field}`` replaced by ``option_name(field)``."""
        return _OPTION.sub(lambda m: option_name(m.group(1)), self.template)


def option(default: Any = None, help: str = "", flag: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its help text (and command-line name, when not the default)."""
    meta = {"help": help} if flag is None else {"help": help, "flag": flag}
    return field(default=default, metadata=meta, **kw)


class _Checked:
    """Shared value checks of the two configs (each raises OptionError naming the option)."""

    def _fail(self, template: str) -> NoReturn:
        raise OptionError(type(self).__name__, template)

    def _check_choices(self, choices: dict[str, tuple[str, ...]]) -> None:
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                self._fail(f"{{{name}}}: {value!r} is not one of {', '.join(allowed)}")

    def _check_at_least(
        self, minimum: float, names: tuple[str, ...], optional: bool = False
    ) -> None:
        """``names`` must be >= ``minimum`` (None allowed when ``optional``)."""
        for name in names:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if value is None or value < minimum:
                self._fail(f"{{{name}}} must be >= {minimum}, got {value}")


@dataclass
class SFTConfig(_Checked):
    """Options of the warm-up fine-tuning stage (paper Sec. 3.2.1, App. C); defaults reproduce the
    reference recipe (effective batch 128 = 16 x 8, lr 3e-4, 3 epochs, early stopping)."""

    output_dir: str | None = option(
        "runs/sft", "checkpoints, logs and the best copy (None: nothing on disk)"
    )
    epochs: int = option(3, "epochs (early stopping may end sooner)")
    batch_size: int = option(16, "samples per forward (micro-batch)")
    grad_accum: int = option(8, "micro-batches per optimizer step")
    eval_batch_size: int = option(32, "samples per validation forward")
    lr: float = option(3e-4, "SFT learning rate (reference 3e-4)")
    weight_decay: float = option(0.0, "SFT weight decay", flag="weight_decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    optim: str = option("adamw", "adamw | adamw_8bit (bitsandbytes, CUDA)")
    schedule: str = option("linear", "learning-rate schedule: linear | cosine | constant")
    warmup_steps: int = option(20, "SFT warmup steps")
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of lr")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (None: no clipping)")
    eval_steps: int | None = option(None, "validate every N steps (default: per epoch)")
    patience: int = option(1, "early stopping patience (validations)")
    load_best_at_end: bool = option(True, "load the best validated weights at the end")
    max_steps: int | None = option(None, "cap on optimizer steps")
    max_train_samples: int | None = option(None, "use the first N train rows")
    max_eval_samples: int | None = option(None, "validate on the first N rows")
    seed: int = option(42, "seed of the data order and dropout")
    bf16: bool | None = option(None, "autocast to bf16 (default: on CUDA)")
    gradient_checkpointing: bool = option(
        False, "SFT gradient checkpointing", flag="gradient_checkpointing"
    )
    save_steps: int | None = option(
        None, "also checkpoint every N optimizer steps (always at epoch ends)"
    )
    keep_checkpoints: int = option(2, "checkpoints kept")
    logging_steps: int = option(10, "log every N optimizer steps")
    tensorboard: bool = option(False, "mirror the JSON-lines log to TensorBoard")
    progress: bool = option(True, "show a progress bar")
    resume: bool = option(False, "continue from the newest checkpoint in output_dir")
    max_bad_steps: int = option(5, "consecutive non-finite steps before TrainingError")
    bucket_mb: int = option(64, "size of one gradient all-reduce bucket (fp32 MiB), distributed")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise OptionError naming the first bad option."""
        self._check_at_least(
            1,
            ("epochs", "batch_size", "grad_accum", "eval_batch_size", "logging_steps", "patience"),
        )
        self._check_at_least(
            1,
            ("eval_steps", "max_steps", "max_train_samples", "max_eval_samples", "save_steps"),
            optional=True,
        )
        self._check_at_least(1, ("bucket_mb",))
        self._check_at_least(0, ("warmup_steps",))
        self._check_choices({"optim": OPTIMIZERS, "schedule": SCHEDULES})
        if not self.lr > 0:
            self._fail(f"{{lr}} must be > 0, got {self.lr}")
        if self.resume and self.output_dir is None:
            self._fail("{resume} needs an {output_dir}")


@dataclass
class GRPOConfig(_Checked):
    """Options of the RL stage, the modified GRPO of paper Sec. 3.2.2 (TRL vocabulary where TRL
    has a name for it). Sizes count PROMPTS and are global (all ranks together); every prompt
    yields ``num_generations`` rows."""

    output_dir: str | None = option(None, "checkpoints, logs and the final model")
    # sampling / reward / advantage (paper Eqs. 5-7)
    num_generations: int = option(
        8, "rows per prompt G (1 clean + G-1 noisy)", flag="num_generations"
    )
    sigma: float = option(1.5, "std of the latent noise (paper Eq. 5)", flag="sigma")
    reward: str = option(
        "ppl", "ppl (LatentR3, paper Eq. 6) | hit (original GRPO, decodes)", flag="reward"
    )
    # With "score" the latent is the only stochastic action: the gradient reaches the backbone
    # (trainable="all") only through r, and with reward="hit" the decoded completions
    # (deterministic beam search) get no log-prob term.
    estimator: str = option(
        "reparam",
        "GRPO policy-gradient form: reparam (the reference: target log-probs given the noisy "
        "latent) | score (log-density of the Gaussian latent policy)",
        flag="estimator",
    )
    advantage: str = option("batch", "batch (paper Eq. 7) | group | none", flag="advantage")
    advantage_batch: int | None = option(
        None, "prompts per advantage batch (default: the optimizer batch)", flag="advantage_batch"
    )
    # loss (paper Eq. 8)
    epsilon: float = option(0.2, "PPO clip lower epsilon", flag="epsilon")
    epsilon_high: float | None = option(
        0.28, "PPO clip upper epsilon (None: epsilon)", flag="epsilon_high"
    )
    num_iterations: int = option(1, "inner GRPO iterations per batch", flag="num_iterations")
    beta: float = option(0.0, "KL coefficient (must be 0 with a frozen backbone)", flag="beta")
    include_clean_in_loss: bool = option(
        True,
        "include row k=0 in the loss (reference; paper Eq. 8 sums k = 1..K only)",
        flag="include_clean_in_loss",
    )
    loss_pass: str = option("keep_graph", "keep_graph | recompute (see the grpo module docstring)")
    reuse_prompt_states: bool = option(
        True, "recompute mode: keep the prompt states and prefix cache between passes"
    )
    trainable: str = option("latent", "latent (LatentRATT only) | all", flag="trainable")
    # batch
    prompts_per_step: int = option(32, "prompts per GRPO optimizer step", flag="prompts_per_step")
    micro_batch_prompts: int = option(8, "prompts per GRPO forward (per rank)")
    # optimization
    lr: float = option(1e-4, "GRPO learning rate (reference grid 1e-5..5e-4)")
    weight_decay: float = option(0.0, "GRPO weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    warmup_steps: int = option(200, "GRPO warmup steps (cosine schedule)")
    schedule: str = option("cosine", "learning-rate schedule: cosine | linear | constant")
    optim: str = option("adamw", "adamw | adamw_8bit (bitsandbytes, CUDA)")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    epochs: float = option(1.0, "GRPO epochs")
    max_steps: int | None = option(None, "cap on optimizer steps")
    seed: int = option(0, "seed of the data order and the latent noise")
    # bookkeeping
    logging_steps: int = option(1, "log every N optimizer steps")
    save_steps: int | None = option(None, "checkpoint every N optimizer steps (None: at end)")
    keep_checkpoints: int = option(2, "checkpoints kept (0 = all)")
    resume: bool = option(False, "continue from the newest checkpoint in output_dir")
    progress: bool = option(True, "show a progress bar")
    max_bad_steps: int = option(5, "consecutive non-finite steps before TrainingError")
    tensorboard: bool = option(False, "mirror the JSON-lines log to TensorBoard (output_dir/tb)")
    save_final_model: bool = option(True, "write the whole reasoner to output_dir/final")
    # validation (only when the trainer is given valid_data): at step 0 and every eval_steps
    # steps; the best step (step 0 = the starting model included) is kept and loaded at the end
    eval_steps: int | None = option(
        None, "validate GRPO every N optimizer steps (default: ~10 times per run)"
    )
    eval_samples: int | None = option(
        256, "validation rows of the GRPO validation (evenly spaced; None: all)"
    )
    eval_metric: str = option(
        "reward", "GRPO validation metric: reward (mean clean-latent reward) | nll"
    )
    eval_batch_size: int = option(16, "prompts per validation batch")
    patience: int | None = option(
        None, "stop GRPO after N validations without improvement (default: never)"
    )
    load_best_at_end: bool = option(
        True, "load the best validated step at the end (False: the last step, the reference)"
    )

    def __post_init__(self) -> None:
        self._check_values()

    @property
    def advantage_prompts(self) -> int:
        """Prompts per advantage batch (global)."""
        return self.prompts_per_step if self.advantage_batch is None else self.advantage_batch

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self, world_size: int = 1) -> None:
        """Raise OptionError naming the option when a value or combination is invalid, including
        how the batches split over ``world_size`` ranks."""
        self._check_values()
        a = self.advantage_prompts
        if a < 1 or self.prompts_per_step % a != 0:
            self._fail(
                f"{{advantage_batch}}={a} must divide {{prompts_per_step}}={self.prompts_per_step}"
            )
        if a % world_size != 0:
            self._fail(
                f"{{advantage_batch}}={a} prompts must be divisible by the world size "
                f"{world_size} (every rank holds an equal share of each advantage batch)"
            )

    def _check_values(self) -> None:
        self._check_choices(
            {
                "reward": ("ppl", "hit"),
                "estimator": ("reparam", "score"),
                "advantage": ("batch", "group", "none"),
                "loss_pass": ("keep_graph", "recompute"),
                "trainable": ("latent", "all"),
                "schedule": ("cosine", "linear", "constant"),
                "optim": OPTIMIZERS,
                "eval_metric": ("reward", "nll"),
            }
        )
        self._check_at_least(1, ("eval_steps", "eval_samples", "patience"), optional=True)
        self._check_at_least(1, ("max_steps",), optional=True)
        if self.num_generations < 2:
            self._fail(
                f"{{num_generations}} must be >= 2 (one clean row plus noisy rows), "
                f"got {self.num_generations}"
            )
        self._check_at_least(
            1,
            (
                "prompts_per_step",
                "micro_batch_prompts",
                "num_iterations",
                "logging_steps",
                "eval_batch_size",
            ),
        )
        self._check_at_least(0, ("sigma", "epsilon", "max_grad_norm", "warmup_steps"))
        self._check_at_least(0, ("epsilon_high",), optional=True)
        if not math.isfinite(self.sigma):
            self._fail(f"{{sigma}} must be finite, got {self.sigma}")
        if not self.lr > 0 or not self.epochs > 0:
            self._fail(f"{{lr}} and {{epochs}} must be > 0, got {self.lr} and {self.epochs}")
        self._check_estimator()

    def _check_estimator(self) -> None:
        """The combinations the policy-gradient form and the KL term allow."""
        if self.estimator == "score" and not self.sigma > 0:
            self._fail(
                "{estimator} score needs {sigma} > 0 (the latent policy N(r, sigma^2 I) has no "
                "density at sigma = 0)"
            )
        if self.estimator == "score" and self.beta != 0.0:
            self._fail("{beta} is defined on target log-probs: use {estimator} reparam")
        if self.beta != 0.0 and self.trainable == "latent":
            self._fail(
                "{beta} must be 0 when {trainable}='latent': the backbone and LM head are "
                "frozen, so only LatentRATT trains and the KL to the reference model is "
                "identically 0 (paper Sec. 3.2.2, Eq. 8); use trainable 'all' for a "
                "KL-regularized full-model run"
            )
