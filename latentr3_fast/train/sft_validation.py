"""SFT validation, early stopping, best-weights keeping and checkpoints. Validation measures
the warm-up loss (paper Sec. 3.2.1, Eq. 4) per target token on the validation split.

Distributed: the validation batches are dealt round-robin to the ranks and the nll sums and
token counts are all-reduced, so every rank takes the same keep/stop decision; rank 0 alone
writes ``best/`` (followed by a barrier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data import EncodedSample, batch_indices
from ..errors import ConfigError, TrainingError
from .atomic import atomic_dir
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_weights,
)
from .sft_objective import sft_loss

__all__ = ["SFTValidation"]


class SFTValidation:
    """Validation, best weights and checkpoints of :class:`.sft.SFTTrainer` (a mixin: it uses
    the trainer's ``cfg``, ``model``, ``comm``, optimizer, data and loop state)."""

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
            "config": asdict(self.cfg),
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
        self.comm.barrier("checkpoint")
        return path

    # ------------------------------------------------------------------ validation
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
        self.comm.all_reduce_(acc, "validation all-reduce")
        total, count = acc.tolist()
        return total / max(1.0, count)

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
                self.comm.barrier("best model")
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

    def _restore_best(self) -> str | None:
        """End of training: the ``best/`` directory (None without an output dir), whose
        weights (or the in-memory best copy) are loaded unless ``load_best_at_end=False``."""
        cfg = self.cfg
        best_dir = None
        if self.out is not None and (self.out / "best").is_dir():
            best_dir = str(self.out / "best")
            if cfg.load_best_at_end:
                load_model_weights(self.model, self.out / "best")
        elif cfg.load_best_at_end and self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        return best_dir
