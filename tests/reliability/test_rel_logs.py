"""Log growth: what each step writes, and whether anything re-serialized per step grows.

Measured (tiny run, see the report): SFT log ~220 B per logged step, GRPO log ~480 B per step
(fixed keys), GRPO trainer_state.json constant (~1.1 KB); SFT trainer_state.json carries the
validation ``history`` and grows by ~130 B per validation (re-written in every checkpoint).
"""

from __future__ import annotations

import json
import math

import pytest
from reliability_helpers import count
from reliability_tiny import tiny_data, tiny_model

from latentr3_fast.train.common import JsonlLogger, checkpoint_dirs
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
from latentr3_fast.train.sft import SFTConfig, SFTTrainer

GRPO_KEYS = [
    "reward_clean_mean",
    "reward_clean_std",
    "reward_noisy_mean",
    "reward_noisy_std",
    "frac_noisy_gt_clean",
    "adv_mean",
    "adv_abs_mean",
    "rollout",
    "iteration",
    "loss",
    "grad_norm",
    "lr",
    "clip_frac",
    "skipped",
    "prompts_per_s",
]


def test_jsonl_logger_bytes_per_step_are_constant(tmp_path):
    """3000 GRPO-shaped records: one line each, < 1 KB, and bytes/step do not grow."""
    path = tmp_path / "log.jsonl"
    sizes = []
    with JsonlLogger(path) as log:
        for step in range(1, 3001):
            rec = {k: -123.456789 * step / 7 for k in GRPO_KEYS}
            rec["rollout"], rec["iteration"] = step, 0
            log.log(rec, step=step)
            if step in (300, 3000):
                sizes.append(path.stat().st_size)
    count("logs:records", 3000)
    lines = path.read_text().splitlines()
    assert len(lines) == 3000
    assert all(len(line) < 1024 for line in lines)
    assert [json.loads(line)["step"] for line in lines[:3]] == [1, 2, 3]
    per_early, per_late = sizes[0] / 300, (sizes[1] - sizes[0]) / 2700
    assert per_late <= per_early * 1.10, (per_early, per_late)


@pytest.fixture(scope="module")
def data():
    return tiny_data(seed=2, n_train=16, n_valid=4)


def _model(tok):
    return tiny_model(tok)


def test_sft_log_and_checkpoint_state_growth(data, tmp_path):
    """SFT: every logged step is one fixed-size line; trainer_state.json grows only by the
    validation history (one small record per validation), never per training step."""
    tok, train, valid = data
    cfg = SFTConfig(
        output_dir=str(tmp_path),
        epochs=4,
        batch_size=4,
        grad_accum=1,
        eval_batch_size=4,
        lr=1e-3,
        warmup_steps=0,
        eval_steps=3,
        save_steps=1,
        keep_checkpoints=0,
        max_steps=6,
        logging_steps=1,
        progress=False,
        patience=100,
    )
    SFTTrainer(_model(tok), cfg, train, valid).train()
    recs = [json.loads(x) for x in (tmp_path / "sft_log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    count("logs:records", len(recs))
    assert len(steps) == 6 and len({tuple(sorted(r)) for r in steps}) == 1  # fixed keys
    line_bytes = [len(json.dumps(r)) for r in steps]
    assert max(line_bytes) < 400
    sizes = {}
    for d in checkpoint_dirs(tmp_path):
        st = json.loads((d / "trainer_state.json").read_text())
        sizes[st["global_step"]] = ((d / "trainer_state.json").stat().st_size, len(st["history"]))
    # size = constant + per-validation history; between validations it does not change
    for s in range(2, 7):
        b0, h0 = sizes[s - 1]
        b1, h1 = sizes[s]
        if h1 == h0:
            assert abs(b1 - b0) <= 8, (s, b0, b1)  # only number widths may change
        else:
            assert 0 < (b1 - b0) / (h1 - h0) < 300, (s, b0, b1)
    first, last = sizes[1], sizes[6]
    per_eval = (last[0] - first[0]) / max(1, last[1] - first[1])
    print(
        f"SFT trainer_state.json: {first[0]} B -> {last[0]} B over {last[1]} validations "
        f"({per_eval:.0f} B per validation); log {sum(line_bytes) / 6:.0f} B/step"
    )


def test_grpo_log_and_checkpoint_state_do_not_grow(data, tmp_path):
    tok, train, _ = data
    cfg = GRPOConfig(
        output_dir=str(tmp_path),
        num_generations=2,
        sigma=1.0,
        prompts_per_step=2,
        micro_batch_prompts=2,
        lr=1e-3,
        warmup_steps=0,
        max_steps=5,
        epochs=8.0,
        save_steps=1,
        keep_checkpoints=0,
        logging_steps=1,
        progress=False,
        save_final_model=False,
    )
    tr = GRPOTrainer(_model(tok), cfg, train)
    tr.train()
    lines = (tmp_path / "grpo_log.jsonl").read_text().splitlines()
    count("logs:records", len(lines))
    assert len(lines) == 5 and all(len(x) < 1024 for x in lines)
    sizes = [(d / "trainer_state.json").stat().st_size for d in checkpoint_dirs(tmp_path)]
    assert len(sizes) == 5 and max(sizes) - min(sizes) <= 16, sizes
    # in-memory history: one small dict per step (returned to the caller, not checkpointed)
    assert len(tr.history) == 5 and all(math.isfinite(h["loss"]) for h in tr.history)
    print(f"GRPO log {sum(map(len, lines)) / 5:.0f} B/step; trainer_state {sizes[-1]} B")


class _Crash(Exception):
    pass


def test_resume_does_not_duplicate_logged_steps(data, tmp_path):
    tok, train, _ = data
    count("faults:crash-after-log")

    def cfg(resume):
        return SFTConfig(
            output_dir=str(tmp_path),
            epochs=1,
            batch_size=4,
            grad_accum=1,
            lr=1e-3,
            warmup_steps=0,
            save_steps=2,
            max_steps=4,
            logging_steps=1,
            progress=False,
            resume=resume,
        )

    def crash(trainer, rec):
        if trainer.global_step == 3:  # step 3 is logged, its checkpoint (step 4) never comes
            raise _Crash

    with pytest.raises(_Crash):
        SFTTrainer(_model(tok), cfg(False), train, callbacks=[crash]).train()
    SFTTrainer(_model(tok), cfg(True), train).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "sft_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps
