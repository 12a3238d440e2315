"""The report's GRPO selection sentence and validation table (from validation.json)."""

from __future__ import annotations

from latentr3_fast.eval.report import grpo_selection_summary, grpo_validation_lines


def _summary(**kw):
    curve = [
        {"step": 0, "val_reward": -2.0, "val_nll": 0.5},
        {"step": 10, "val_reward": -1.5, "val_nll": 0.4},
        {"step": 20, "val_reward": -3.0, "val_nll": 0.9},
    ]
    base = dict(
        metric="reward",
        eval_steps=10,
        rows=64,
        best_step=10,
        best_value=-1.5,
        selected_step=10,
        selection="best",
        last_step=20,
        stopped_early=False,
        patience=None,
        curve=curve,
    )
    base.update(kw)
    return base


def test_best_step_named_with_its_value_and_start():
    line = grpo_selection_summary(_summary())
    assert line.startswith("LatentR3 = GRPO step 10 of 20: the best validation mean clean-latent")
    assert "(-1.5000, step 0: -2.0000)" in line and "64 validation rows, every 10 steps" in line


def test_step_zero_and_last_and_early_stop():
    zero = grpo_selection_summary(_summary(best_step=0, best_value=-2.0, selected_step=0))
    assert "GRPO step 0 of 20" in zero and "step 0 (the SFT model) is kept" in zero
    last = grpo_selection_summary(_summary(selection="last", selected_step=20))
    assert "GRPO step 20 of 20: the last step (--grpo-select last" in last
    assert "best validated step was 10" in last
    early = grpo_selection_summary(_summary(stopped_early=True, patience=3, last_step=20))
    assert "stopped early after 3 validations without improvement" in early
    nll = grpo_selection_summary(_summary(metric="nll", best_value=0.4))
    assert "validation target NLL (0.4000, step 0: 0.5000)" in nll


def test_table_marks_the_kept_row_only():
    lines = grpo_validation_lines(_summary())
    rows = [x for x in lines if x.startswith("| ") and x[2].isdigit()]
    assert rows == [
        "| 0 | -2.0000 | 0.5000 |  |",
        "| 10 | -1.5000 | 0.4000 | **kept** |",
        "| 20 | -3.0000 | 0.9000 |  |",
    ]
