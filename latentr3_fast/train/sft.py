"""Stage 1: supervised warm-up of the backbone and LatentRATT (paper Sec. 3.2.1, Eq. 4).

Per micro-batch: ONE prompt forward with grad (final-norm hidden states + KV cache), the
latent(s) from LatentRATT, ONE suffix forward of ``[r, target[:-1]]`` on that cache, and the
target-token cross-entropy through the fused LM-head log-prob (no full-vocabulary logits).
Gradients reach the backbone directly and through r.

Loss = mean over the target tokens of the whole optimizer step (all micro-batches of one
gradient-accumulation window), so the result does not depend on how the window is split.

Reference hyper-parameters (the defaults): AdamW lr 3e-4, effective batch 128 (16 x 8),
warmup 20 steps, linear decay, at most 3 epochs, early stopping on validation loss with
patience 1, bf16 on CUDA; the best checkpoint is kept and reloaded at the end.

Distributed (torchrun; gloo on CPU, NCCL on GPU): when ``torch.distributed`` is initialised,
every rank walks the SAME global order; the sample indices of one optimizer step (up to
``batch_size * grad_accum``) are split into contiguous, near-equal shares, one per rank, and each
rank runs its share in micro-batches of at most ``batch_size``. The loss is normalised by the
GLOBAL target-token count (computed on the host from the sample lengths, so no collective), the
gradients are summed across ranks in coalesced fp32 buckets (no DDP wrapper: the trainer calls
``encode_prompt`` / ``suffix_forward``, not ``forward``), so the update equals the one-process
update with the same global batch. Validation sums nll and token counts across ranks. Rank 0
alone writes checkpoints, logs and ``best/``, each followed by a barrier; every rank resumes
from the same checkpoint (a shared file system is assumed). A failed collective (a rank died or
the process-group timeout passed) raises TrainingError naming the rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Batch, EncodedSample, batch_indices, collate
from ..errors import ConfigError, TrainingError
from .configs import SFTConfig
from .distributed import Collectives, UsesCollectives
from .interrupt import (
    TrainingInterrupted,
    deferred_interrupts,
    honour_interrupt,
    interrupt_requested,
)
from .logging_utils import JsonlLogger, progress_bar
from .optim import (
    NonFiniteGuard,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
)
from .rng import seed_everything
from .sft_objective import rank_share, sft_loss
from .sft_validation import SFTValidation

__all__ = ["SFTConfig", "SFTResult", "SFTTrainer", "rank_share", "sft_loss"]


@dataclass
class SFTResult:
    """What ``SFTTrainer.train`` returns."""

    global_step: int
    epochs_completed: int
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict[str, Any]]
    best_dir: str | None


class SFTTrainer(SFTValidation, UsesCollectives):
    """Supervised training of a LatentReasoner on (prompt, target) pairs.

    Args:
        model: the LatentReasoner (its parameters with ``requires_grad`` train).
        config: :class:`SFTConfig`.
        train_data: encoded training samples (``data.EncodedSample``).
        valid_data: encoded validation samples (early stopping needs them).
        pad_id: padding id (default: the tokenizer's pad, else EOS).
        callbacks: called as ``fn(trainer, record)`` after every optimizer step.
        process_group: group for the gradient / validation all-reduce (default: the world
            when ``torch.distributed`` is initialised; every rank must hold the same data).
    """

    def __init__(
        self,
        model: Any,
        config: SFTConfig,
        train_data: Sequence[EncodedSample],
        valid_data: Sequence[EncodedSample] | None = None,
        pad_id: int | None = None,
        callbacks: Sequence[Callable[[SFTTrainer, dict[str, Any]], None]] = (),
        process_group: Any = None,
    ) -> None:
        config.validate()
        self.model = model
        self.cfg = config
        self.comm = Collectives(process_group, "SFT", lambda: self.global_step + 1)
        self.train_data = list(train_data)[: config.max_train_samples]
        self.valid_data = list(valid_data or [])[: config.max_eval_samples]
        if not self.train_data:
            raise ConfigError("SFTTrainer: train_data is empty")
        if pad_id is None:
            tok = model.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad_id)
        self.callbacks = list(callbacks)
        self.device = model.device
        self.use_bf16 = self.device.type == "cuda" if config.bf16 is None else bool(config.bf16)
        if self.use_bf16 and self.device.type != "cuda":
            raise ConfigError("SFTConfig.bf16=True needs a CUDA model (autocast to bf16)")
        self.micro_per_epoch = math.ceil(len(self.train_data) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / config.grad_accum)
        total = config.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.out = Path(config.output_dir) if config.output_dir else None

        self.optimizer = build_optimizer(
            model, config.optim, config.lr, config.weight_decay, config.adam_betas
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = build_scheduler(
            self.optimizer,
            config.schedule,
            config.warmup_steps,
            self.total_steps,
            config.min_lr_ratio,
        )
        self.guard = NonFiniteGuard(config.max_bad_steps, where="SFT")
        # loop state (everything a checkpoint must restore)
        self.global_step = 0
        self.epoch = 0
        self.micro = 0  # micro-batches of the current epoch already consumed
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.applied_since_eval = 0  # optimizer steps applied (not skipped) since validation
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.last_eval_step = -1
        self._logger: JsonlLogger | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if config.resume:
            self.resume()

    @classmethod
    def from_dataset(
        cls,
        model: Any,
        config: SFTConfig,
        dataset: Any,
        template: str = "reference",
        max_length: int = 512,
        **kwargs: Any,
    ) -> SFTTrainer:
        """Encode ``dataset.train`` / ``dataset.valid`` (a ``data.RecDataset``) with the
        model's tokenizer and ``num_latent`` (prompt left-truncated to ``max_length``)."""
        from ..data import PromptBuilder

        builder = PromptBuilder(
            model.tokenizer,
            dataset.category,
            template=template,
            num_latent=model.num_latent,
            max_length=max_length,
        )
        train = dataset.train[: config.max_train_samples]
        valid = dataset.valid[: config.max_eval_samples]
        return cls(model, config, builder.encode_many(train), builder.encode_many(valid), **kwargs)

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batches(self, data: Sequence[EncodedSample], idx: list[int]) -> Batch:
        return collate([data[i] for i in idx], self.pad_id).to(self.device, non_blocking=True)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Micro-batch index lists of ``epoch`` (a permutation seeded by seed + epoch)."""
        return batch_indices(
            len(self.train_data), self.cfg.batch_size, shuffle=True, seed=self.cfg.seed + epoch
        )

    def step_micro_batches(self, windows: list[list[int]]) -> list[list[int]]:
        """This rank's micro-batches (index lists) of the optimizer step whose GLOBAL
        micro-batches are ``windows``: one process runs ``windows`` as they are; with W ranks
        the step's samples are split into contiguous shares (:func:`rank_share`), each run in
        micro-batches of at most ``batch_size``."""
        if self.world == 1:
            return [list(w) for w in windows]
        share = rank_share([i for w in windows for i in w], self.world, self.rank)
        bs = self.cfg.batch_size
        return [share[i : i + bs] for i in range(0, len(share), bs)]

    def _train_step(self, windows: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over the global micro-batches ``windows`` (token-weighted mean
        loss over the whole global step, gradients summed over ranks)."""
        data = self.train_data
        step_idx = [i for w in windows for i in w]
        # global counts from the sample lengths (targets are unpadded lists): no collective
        n_tok = sum(len(data[i].target_ids) for i in step_idx)
        n_all = n_tok + sum(len(data[i].prompt_ids) for i in step_idx)
        cpu = [
            collate([data[i] for i in idx], self.pad_id) for idx in self.step_micro_batches(windows)
        ]
        batches = [b.to(self.device, non_blocking=True) for b in cpu]
        loss_sum = torch.zeros((), device=self.device)
        for batch in batches:
            with self._autocast():
                loss, _ = sft_loss(self.model, batch, n_tok)
            loss.backward()
            loss_sum += loss.detach().float()
        bucket_numel = max(1, self.cfg.bucket_mb * (1 << 20) // 4)
        loss_sum = self.comm.all_reduce_gradients(
            self.params, loss_sum.reshape(1), bucket_numel
        ).reshape(())
        grad_norm = clip_grad_norm(self.params, self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            good = self.guard.ok(loss_sum, grad_norm)
        except TrainingError:  # name the step and the checkpoint to resume from
            # rank 0 alone owns the checkpoint dir (listing it may also tidy it)
            where = self._resume_hint()
            raise TrainingError(
                f"SFT stopped at step {self.global_step + 1}: {self.guard.consecutive} "
                f"consecutive steps with a non-finite loss or gradient norm (now loss "
                f"{float(loss_sum):.4g}, grad norm {float(grad_norm):.4g}; max_bad_steps="
                f"{self.guard.max_bad_steps}); the skipped steps did not change the weights; "
                f"{where}"
            ) from None
        if good:
            self.optimizer.step()
            self.applied_since_eval += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {
            "loss": float(loss_sum),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "target_tokens": n_tok,
            "tokens": n_all,
            "skipped": not good,
        }

    def _interrupt_requested(self) -> bool:
        """A deferred Ctrl-C/SIGTERM on any rank (all ranks agree, so all checkpoint)."""
        return self.comm.any_rank(interrupt_requested(), "interrupt flag")

    # ------------------------------------------------------------------ loop
    def train(self) -> SFTResult:
        """Run (or continue) training; returns the summary. Raises TrainingError after
        ``max_bad_steps`` consecutive non-finite steps (the last checkpoint stays intact)."""
        cfg = self.cfg
        if self.global_step == 0 and self.micro == 0 and self.epoch == 0:
            seed_everything(cfg.seed)
        self._open_logger()
        bar = progress_bar(
            self.total_steps, "sft", cfg.progress and self.is_main, initial=self.global_step
        )
        self.model.train()
        done = self.stopped_early or self.global_step >= self.total_steps
        window = _LogWindow()
        interrupts = deferred_interrupts()  # Ctrl-C/SIGTERM: finish the step, checkpoint, stop
        interrupts.__enter__()
        try:
            while not done and self.epoch < cfg.epochs:
                done = self._train_epoch(bar, window)
        finally:
            interrupts.__exit__(None, None, None)
            bar.close()
            if self._logger is not None:
                self._logger.close()
                self._logger = None
        best_dir = self._restore_best()
        return SFTResult(
            global_step=self.global_step,
            epochs_completed=self.epoch,
            best_val_loss=self.best_val,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            history=list(self.history),
            best_dir=best_dir,
        )

    def _open_logger(self) -> None:
        """Rank 0 with an output dir: the JSON-lines log (and TensorBoard when asked)."""
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tb = self.out / "tensorboard" if self.cfg.tensorboard else None
            # resume_step: drop records a killed run logged after its last checkpoint
            self._logger = JsonlLogger(
                self.out / "sft_log.jsonl", tensorboard_dir=tb, resume_step=self.global_step
            )

    def _train_epoch(self, bar: Any, window: _LogWindow) -> bool:
        """The remaining optimizer steps of the current epoch; True when training is done."""
        cfg = self.cfg
        order = self.epoch_order(self.epoch)
        done = False
        while self.micro < len(order) and not done:
            windows = order[self.micro : self.micro + cfg.grad_accum]
            rec = self._train_step(windows)
            self.micro += len(windows)
            self.global_step += 1
            self._report_step(rec, len(order), bar, window)
            at_epoch_end = self.micro >= len(order)
            done = self._end_step(at_epoch_end)
            if at_epoch_end:
                break  # next epoch: new order
        return done

    def _report_step(
        self, rec: dict[str, Any], epoch_len: int, bar: Any, window: _LogWindow
    ) -> None:
        """Throughput, progress bar, the log every ``logging_steps`` steps, callbacks."""
        window.tokens += rec["tokens"]
        window.loss += rec["loss"]
        window.steps += 1
        dt = time.perf_counter() - window.start
        rec["tokens_per_s"] = window.tokens / dt if dt > 0 else 0.0
        rec["epoch"] = self.epoch + self.micro / epoch_len
        bar.update(1)
        bar.set_postfix(
            loss=f"{rec['loss']:.4f}",
            lr=f"{rec['lr']:.2e}",
            tok_s=f"{rec['tokens_per_s']:.0f}",
        )
        if self.global_step % self.cfg.logging_steps == 0 or self.global_step == 1:
            if self._logger is not None:
                self._logger.log(
                    {**rec, "loss_avg": window.loss / window.steps}, step=self.global_step
                )
            window.reset()
        for cb in self.callbacks:
            cb(self, rec)

    def _end_step(self, at_epoch_end: bool) -> bool:
        """After an optimizer step: validation (every ``eval_steps``, at epoch ends and at the
        last step), the epoch counter, checkpoints and a deferred interrupt. True when done."""
        cfg = self.cfg
        done = False
        if cfg.eval_steps and self.global_step % cfg.eval_steps == 0:
            self.stopped_early = self._validate_and_track("eval")
            done = self.stopped_early
        if self.global_step >= self.total_steps:
            done = True
        if (at_epoch_end or done) and self.last_eval_step != self.global_step:
            stop = self._validate_and_track("epoch_end" if at_epoch_end else "final")
            if at_epoch_end and stop:
                self.stopped_early = done = True
        if at_epoch_end:
            self.epoch += 1
            self.micro = 0
        saving = cfg.save_steps and self.global_step % cfg.save_steps == 0
        if at_epoch_end or done or saving:
            self.save_checkpoint()
        if self._interrupt_requested():
            honour_interrupt()
            if not (at_epoch_end or done or saving):
                self.save_checkpoint()
            where = f"checkpoint saved in {self.out}" if self.out else "no output dir"
            raise TrainingInterrupted(
                f"SFT interrupted after step {self.global_step}: {where} "
                "(--resume continues from it)"
            )
        return done


class _LogWindow:
    """Tokens, loss sum and steps since the last logged step (for tokens/s and loss_avg)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.loss = 0.0
        self.steps = 0
