"""Stage 1: supervised warm-up of the backbone and LatentRATT (SPEC section 4).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import Batch, EncodedSample, batch_indices, collate
from ..errors import ConfigError, TrainingError
from .common import (
    JsonlLogger,
    NonFiniteGuard,
    atomic_dir,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    progress_bar,
    save_checkpoint,
    save_model_weights,
    seed_everything,
)
from .configs import SFTConfig
from .interrupt import (
    TrainingInterrupted,
    deferred_interrupts,
    honour_interrupt,
    interrupt_requested,
)

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


def sft_loss(model: Any, batch: Batch, num_tokens: int | torch.Tensor | None = None):
    """Sum of target-token negative log-likelihoods divided by ``num_tokens``.

    Args:
        model: a LatentReasoner.
        batch: collated batch on the model's device.
        num_tokens: normaliser (default: the batch's own target-token count).
    Returns:
        ``(loss, nll_sum)``: 0-d fp32 tensors; ``nll_sum`` is detached.
    """
    hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
    r = model.latents(hidden, batch.prompt_mask, cache)
    h = model.suffix_forward(cache, batch.prompt_mask, r, batch.target_ids)
    logp = model.target_logprobs(h, batch.target_ids, batch.target_mask)  # 0 at padding
    nll = -logp.sum()
    denom = batch.target_mask.sum() if num_tokens is None else num_tokens
    return nll / denom, nll.detach()


def rank_share(indices: Sequence[int], world: int, rank: int) -> list[int]:
    """The contiguous share of one step's global sample ``indices`` that ``rank`` trains on.

    Shares differ in size by at most one (the first ``len % world`` ranks get the extra
    sample); a rank may get none when the step holds fewer samples than ranks.
    """
    n = len(indices)
    lo = rank * (n // world) + min(rank, n % world)
    hi = lo + n // world + (1 if rank < n % world else 0)
    return list(indices[lo:hi])


class SFTTrainer:
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
        self.group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if self.distributed else 1
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.is_main = self.rank == 0
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

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        """JSON-able loop state (data position included)."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "micro": self.micro,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "applied_since_eval": self.applied_since_eval,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "last_eval_step": self.last_eval_step,
            "guard": self.guard.state_dict(),
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "extra"},
        }

    def resume(self) -> bool:
        """Load the newest checkpoint of ``output_dir`` (False when there is none)."""
        ckpt = latest_checkpoint(self.out) if self.out is not None else None
        if ckpt is None:
            return False
        st = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        self.global_step = int(st["global_step"])
        self.epoch = int(st["epoch"])
        self.micro = int(st["micro"])
        self.best_val = st["best_val"]
        self.best_step = st["best_step"]
        self.bad_evals = int(st["bad_evals"])
        self.applied_since_eval = int(st.get("applied_since_eval", 1))
        self.stopped_early = bool(st["stopped_early"])
        self.history = list(st["history"])
        self.last_eval_step = int(st["last_eval_step"])
        self.guard.load_state_dict(st.get("guard", {}))
        return True

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; the other ranks wait at a barrier so none reads a
        half-written directory). Collective when distributed: call on every rank."""
        if self.out is None:
            return None
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.out,
                self.global_step,
                self.model,
                self.optimizer,
                self.scheduler,
                self.trainer_state(),
                keep_last=self.cfg.keep_checkpoints,
            )
        self._barrier("checkpoint")
        return path

    # ------------------------------------------------------------------ collectives
    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; a dead peer or a timeout becomes one clear TrainingError."""
        try:
            return fn()
        except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo/NCCL errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"SFT rank {self.rank}/{self.world}: {what} failed at step "
                f"{self.global_step + 1} -- another rank probably died or the process-group "
                f"timeout passed ({first[:300]}). Checkpoints written so far are intact "
                "(--resume continues)."
            ) from exc

    def _barrier(self, what: str) -> None:
        if self.distributed and self.world > 1:
            self._collective(f"barrier after {what}", lambda: dist.barrier(group=self.group))

    def _all_reduce_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """In-place sum over ranks (no-op in one process)."""
        if self.distributed and self.world > 1:
            self._collective(what, lambda: dist.all_reduce(t, group=self.group))
        return t

    def _all_reduce_grads(self, extra: torch.Tensor) -> torch.Tensor:
        """Sum the gradients over ranks in coalesced fp32 buckets; ``extra`` (a small fp32
        vector, e.g. the loss share) rides in the first bucket. Returns the summed ``extra``.

        A parameter gets a gradient (zeros where a rank had none) when any rank produced one;
        one with no gradient on every rank keeps ``grad=None`` (as in one process, so AdamW
        skips it identically).
        """
        if not (self.distributed and self.world > 1):
            return extra
        params = self.params
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        head = torch.cat([extra.float().reshape(-1).to(self.device), has.to(self.device)])
        cap = max(1, self.cfg.bucket_mb * (1 << 20) // 4)
        buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if buckets[-1] and size + p.numel() > cap:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        for i, bucket in enumerate(buckets):
            parts = [head] if i == 0 else []
            parts += [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                for p in bucket
            ]
            flat = torch.cat(parts)
            self._all_reduce_(flat, "gradient all-reduce")
            off = 0
            if i == 0:
                head = flat[: head.numel()].clone()
                off = head.numel()
            for p in bucket:
                n = p.numel()
                g = flat[off : off + n].view_as(p)
                if p.grad is None:
                    p.grad = g.to(p.dtype).clone()
                else:
                    p.grad.copy_(g)
                off += n
        used = head[extra.numel() :].cpu() > 0
        for p, u in zip(params, used.tolist()):
            if not u:
                p.grad = None
        return head[: extra.numel()].view_as(extra)

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

    @torch.no_grad()
    def evaluate(self, data: Sequence[EncodedSample] | None = None) -> float:
        """Mean target-token cross-entropy (nats/token) over ``data`` (default: validation).

        Distributed: the batches are dealt round-robin to the ranks and the nll sums and token
        counts are all-reduced, so every rank returns the same value (call on every rank).
        """
        data = self.valid_data if data is None else list(data)
        if not data:
            raise ConfigError("SFTTrainer.evaluate: no validation data")
        was_training = self.model.training
        self.model.eval()
        # [nll sum, target-token count]; fp64 so the sum does not depend much on the split
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = batch_indices(len(data), self.cfg.eval_batch_size)
        for idx in batches[self.rank :: self.world]:
            batch = self._batches(data, idx)
            with self._autocast():
                _, nll = sft_loss(self.model, batch)
            acc[0] += nll.double()
            acc[1] += sum(len(data[i].target_ids) for i in idx)
        self.model.train(was_training)
        self._all_reduce_(acc, "validation all-reduce")
        total, count = acc.tolist()
        return total / max(1.0, count)

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
        loss_sum = self._all_reduce_grads(loss_sum.reshape(1)).reshape(())
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
        flag = interrupt_requested()
        if self.distributed and self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            flag = bool(self._all_reduce_(t, "interrupt flag").item() > 0)
        return flag

    def _resume_hint(self) -> str:
        """Names the last good checkpoint (rank 0 alone owns the dir; listing may tidy it)."""
        last = latest_checkpoint(self.out) if self.out is not None and self.is_main else None
        if last:
            return f"last good checkpoint: {last} (--resume continues from it)"
        return "no checkpoint was written yet"

    def _validate_and_track(self, kind: str) -> bool:
        """Validate, update best / early stopping; True when training should stop."""
        if not self.valid_data:
            return False
        val = self.evaluate()
        self.last_eval_step = self.global_step
        applied, self.applied_since_eval = self.applied_since_eval, 0
        if not math.isfinite(val):
            raise TrainingError(
                f"SFT stopped at step {self.global_step}: the validation loss is {val} (the "
                f"model's outputs are non-finite); {self._resume_hint()}"
            )
        improved = self.best_val is None or val < self.best_val
        if self.cfg.progress and self.is_main:  # on the console too, not only in the log
            from tqdm.auto import tqdm

            label = self.out.name if self.out is not None else "sft"
            tqdm.write(
                f"{label} step {self.global_step}: validation loss {val:.4f}"
                + (" (best so far)" if improved else f" (best {self.best_val:.4f})")
            )
        rec = {"event": kind, "epoch": self.epoch, "val_loss": val, "improved": improved}
        self.history.append({"step": self.global_step, **rec})
        if self._logger is not None:
            self._logger.log(rec, step=self.global_step)
        if improved:
            self.best_val, self.best_step, self.bad_evals = val, self.global_step, 0
            if self.out is not None:
                if self.is_main:
                    atomic_dir(self.out / "best", lambda d: save_model_weights(self.model, d))
                self._barrier("best model")
            elif self.cfg.load_best_at_end:  # no output dir: keep the best weights in memory
                self._best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                }
            return False
        if applied == 0:
            # every step since the last validation was skipped (non-finite): the weights did
            # not move, so let the guard decide (it raises after max_bad_steps) instead of
            # ending the run as an early stop
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.cfg.patience

    # ------------------------------------------------------------------ loop
    def train(self) -> SFTResult:
        """Run (or continue) training; returns the summary. Raises TrainingError after
        ``max_bad_steps`` consecutive non-finite steps (the last checkpoint stays intact)."""
        cfg = self.cfg
        if self.global_step == 0 and self.micro == 0 and self.epoch == 0:
            seed_everything(cfg.seed)
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tb = self.out / "tensorboard" if cfg.tensorboard else None
            # resume_step: drop records a killed run logged after its last checkpoint
            self._logger = JsonlLogger(
                self.out / "sft_log.jsonl", tensorboard_dir=tb, resume_step=self.global_step
            )
        bar = progress_bar(
            self.total_steps, "sft", cfg.progress and self.is_main, initial=self.global_step
        )
        self.model.train()
        done = self.stopped_early or self.global_step >= self.total_steps
        t0, tok_window, loss_window, n_window = time.perf_counter(), 0, 0.0, 0
        interrupts = deferred_interrupts()  # Ctrl-C/SIGTERM: finish the step, checkpoint, stop
        interrupts.__enter__()
        try:
            while not done and self.epoch < cfg.epochs:
                order = self.epoch_order(self.epoch)
                while self.micro < len(order) and not done:
                    windows = order[self.micro : self.micro + cfg.grad_accum]
                    rec = self._train_step(windows)
                    self.micro += len(windows)
                    self.global_step += 1
                    tok_window += rec["tokens"]
                    loss_window += rec["loss"]
                    n_window += 1
                    dt = time.perf_counter() - t0
                    rec["tokens_per_s"] = tok_window / dt if dt > 0 else 0.0
                    rec["epoch"] = self.epoch + self.micro / len(order)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}",
                        lr=f"{rec['lr']:.2e}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                    )
                    if self.global_step % cfg.logging_steps == 0 or self.global_step == 1:
                        if self._logger is not None:
                            self._logger.log(
                                {**rec, "loss_avg": loss_window / n_window},
                                step=self.global_step,
                            )
                        t0, tok_window, loss_window, n_window = time.perf_counter(), 0, 0.0, 0
                    for cb in self.callbacks:
                        cb(self, rec)
                    if cfg.eval_steps and self.global_step % cfg.eval_steps == 0:
                        self.stopped_early = self._validate_and_track("eval")
                        done = self.stopped_early
                    if self.global_step >= self.total_steps:
                        done = True
                    at_epoch_end = self.micro >= len(order)
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
                    if at_epoch_end:
                        break  # next epoch: new order
        finally:
            interrupts.__exit__(None, None, None)
            bar.close()
            if self._logger is not None:
                self._logger.close()
                self._logger = None
        best_dir = None
        if self.out is not None and (self.out / "best").is_dir():
            best_dir = str(self.out / "best")
            if cfg.load_best_at_end:
                load_model_weights(self.model, self.out / "best")
        elif cfg.load_best_at_end and self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        return SFTResult(
            global_step=self.global_step,
            epochs_completed=self.epoch,
            best_val_loss=self.best_val,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            history=list(self.history),
            best_dir=best_dir,
        )
