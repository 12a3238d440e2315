"""GRPO validation, best-step keeping and the checkpoints that carry them.

Validation (``valid_data=``; the reference has none and returns the last step): at step 0
and every ``eval_steps`` steps the mean clean-latent reward (paper Sec. 3.2.2, Eq. 6) and
target NLL on a fixed subset of the validation rows (all-reduced, so every rank decides
alike); the best step's weights (step 0, the starting model, included) are kept in memory and
inside every checkpoint (``best_weights.safetensors`` when they differ from the checkpoint's
own), training can stop after ``patience`` validations without improvement, and the best
weights are loaded at the end unless ``load_best_at_end=False``.
``output_dir/validation.json`` holds the curve and the selected step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TrainingError
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .logging_utils import JsonlLogger

__all__ = ["BEST_WEIGHTS", "GRPOValidation", "evenly_spaced"]

BEST_WEIGHTS = "best_weights"  # NAME.safetensors in a checkpoint: the best validated weights


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """Indices of ``k`` rows spread evenly over ``n`` (all of them when ``k`` is None or
    >= n): the fixed validation subset, spanning the whole (often time-ordered) split."""
    if k is None or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


class GRPOValidation:
    """Validation, best weights and checkpoints of :class:`.grpo.GRPOTrainer` (a mixin: it
    uses the trainer's ``cfg``, ``model``, ``comm`` and validation state)."""

    def _init_validation_state(self, valid_data: Sequence[Any] | None) -> None:
        """The fixed validation subset and the best-step state (a checkpoint restores it)."""
        config = self.cfg
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
        from ..ops import perplexity_reward

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
                acc[0] += perplexity_reward(logp, batch.target_mask).double().sum()
                acc[1] -= (logp * m).double().sum()
                acc[2] += m.double().sum()
                acc[3] += len(batch)
        finally:
            model.train(was_training)
        self.comm.all_reduce_(acc, "validation all-reduce")
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
        from ..ops import perplexity_reward

        model = self.model
        was_training = model.training
        model.eval()
        total_reward, total_logprob, n = 0.0, 0.0, 0
        for s in range(0, len(samples), batch_size):
            batch = collate(list(samples[s : s + batch_size]), self.pad_id).to(model.device)
            hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
            r = model.latents(hidden, batch.prompt_mask, cache)
            h = model.suffix_forward(cache, batch.prompt_mask, r.to(model.dtype), batch.target_ids)
            logp = model.target_logprobs(h, batch.target_ids, batch.target_mask).float()
            m = batch.target_mask.float()
            total_reward += float(perplexity_reward(logp, batch.target_mask).sum())
            total_logprob += float(((logp * m).sum(-1) / m.sum(-1)).sum())
            n += len(batch)
        model.train(was_training)
        return {"reward": total_reward / max(n, 1), "mean_logprob": total_logprob / max(n, 1)}

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_module(self):
        # frozen backbone: checkpoint only LatentRATT (KBs instead of the whole LLM)
        return self.model.ratt if self.cfg.trainable == "latent" else self.model

    def save_checkpoint(self) -> Path | None:
        """Atomic checkpoint ``output_dir/checkpoints/step-XXXXXXXX`` written by rank 0 while
        the other ranks wait at a barrier (none stops or reads before it is complete):
        trainable weights (LatentRATT only when the backbone is frozen), optimizer, scheduler,
        RNG, the data position and the best weights; keeps the newest ``keep_checkpoints``.
        Collective when distributed: call on every rank. Returns the directory on rank 0."""
        if self.out_dir is None:
            return None
        path = self._write_checkpoint() if self.rank == 0 else None
        self.comm.barrier("checkpoint")
        return path

    def _write_checkpoint(self) -> Path:
        state = {
            "stage": "grpo",
            "global_step": self.global_step,
            "rollout_index": self.rollout_index,
            "guard": self.guard.state_dict(),
            "trainable": self.cfg.trainable,
            "estimator": self.cfg.estimator,
            "config": asdict(self.cfg),
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
        extra_weights = None
        if self._best_state is not None and self.best_step != self.global_step:
            extra_weights = {BEST_WEIGHTS: self._best_state}
        return save_checkpoint(
            self.out_dir,
            self.global_step,
            self._ckpt_module(),
            self.optimizer,
            self.scheduler,
            trainer_state=json.loads(json.dumps(state, default=str)),
            keep_last=self.cfg.keep_checkpoints,
            extra_weights=extra_weights,
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
