"""Run reports: the results table (text and Markdown), ``report.md`` and PNG plots.

Results are a list of flat records, one per (model, scoring)::

    {"model": "SFT only", "scoring": "D3", "length_penalty": 0.0,
     "HR@1": ..., "HR@5": ..., "NDCG@10": ..., "num_rows": 300,
     "groups": {"popular": {...}, "unpopular": {...}}}
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")


def scoring_name(length_penalty: float) -> str:
    """'BIGRec' for length penalty 1.0, 'D3' for 0.0 (the two recommenders of paper Sec. 4.1),
    else 'lp=<x>'."""
    if length_penalty == 1.0:
        return "BIGRec"
    if length_penalty == 0.0:
        return "D3"
    return f"lp={length_penalty:g}"


def results_table(
    results: Sequence[dict[str, Any]],
    metrics: Sequence[str] = TABLE_METRICS,
    markdown: bool = False,
) -> str:
    """Format records as a table: one row per (model, scoring), one column per metric."""
    header = ["model", "scoring", *metrics]
    rows = [
        [str(r["model"]), str(r["scoring"]), *(_format_cell(r.get(m)) for m in metrics)]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def padded(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([padded(header), rule, *(padded(row) for row in rows)])


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def group_gain_table(
    results: Sequence[dict[str, Any]], base_model: str, new_model: str, metric: str = "NDCG@10"
) -> list[dict[str, Any]]:
    """Relative gain of ``new_model`` over ``base_model`` per popularity group and scoring
    (paper Sec. 4.3.1 / App. D)."""
    by_key = {(r["model"], r["scoring"]): r for r in results}
    out = []
    for (model, scoring), record in by_key.items():
        if model != new_model or (base_model, scoring) not in by_key:
            continue
        base = by_key[(base_model, scoring)]
        for group, values in sorted(record.get("groups", {}).items()):
            base_value = base.get("groups", {}).get(group, {}).get(metric)
            new_value = values.get(metric)
            if base_value is None or new_value is None:
                continue
            # no relative gain over a zero baseline
            gain = (new_value - base_value) / base_value if base_value > 0 else None
            out.append(
                {
                    "scoring": scoring,
                    "group": group,
                    "base": base_value,
                    "new": new_value,
                    "relative_gain": gain,
                }
            )
    return out


def environment_info() -> dict[str, str]:
    """Versions and machine facts for the report."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "cpu_threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        info["triton"] = "absent"
    return info


def _gain_lines(gains: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown: relative gain per popularity group (paper Sec. 4.3.1, Fig. 2)."""
    lines = ["", "## Popular vs unpopular items (relative gain)", ""]
    lines += ["| scoring | group | base | new | gain |", "|---|---|---|---|---|"]
    for g in gains:
        gain = g["relative_gain"]
        shown = "n/a (base is 0)" if gain is None else f"{gain:+.1%}"
        lines.append(
            f"| {g['scoring']} | {g['group']} | {g['base']:.4f} | {g['new']:.4f} | {shown} |"
        )
    return lines


def _latent_usage_lines(latent_usage: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: the swap test's table and one sentence per model."""
    lines = ["", "## Does the latent carry per-sample information? (swap test)", ""]
    lines += [
        "Validation NLL per target token with each row's own latent vs with the next "
        "row's latent. A gap near 0 means the model uses the latent slot as a constant.",
        "",
        "| model | own latent | swapped latent | gap |",
        "|---|---|---|---|",
    ]
    for name, usage in latent_usage.items():
        lines.append(
            f"| {name} | {usage['nll']:.4f} | {usage['nll_swapped']:.4f} | "
            f"{100 * usage['relative_gap']:+.2f} % |"
        )
    lines.append("")
    for name, usage in latent_usage.items():
        lines.append(f"- {name}: {swap_gap_words(usage['relative_gap'])}")
    return lines


def _timing_lines(timings: dict[str, float]) -> list[str]:
    """Markdown: seconds per stage."""
    lines = ["", "## Timings (seconds)", ""]
    lines += [
        "Summed over every invocation of this run (a resumed stage adds its time to the "
        "earlier part); `total` is their sum.",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    return lines


def write_report(
    path: Path,
    results: Sequence[dict[str, Any]],
    timings: dict[str, float],
    config: dict[str, Any],
    gains: Sequence[dict[str, Any]] = (),
    plots: Sequence[str] = (),
    notes: Sequence[str] = (),
    latent_usage: dict[str, dict[str, Any]] | None = None,
    grpo_validation: dict[str, Any] | None = None,
    below_popularity: Sequence[str] = (),
) -> None:
    """Write ``report.md``: results, the GRPO step evaluated as LatentR3 and its validation
    curve, popularity gains, latent swap test, timings, plots, environment, config.
    ``latent_usage`` maps a model name to ``LatentUsage.as_dict()``; ``grpo_validation`` is
    the GRPO trainer's ``validation.json``; ``below_popularity`` are sentences about models
    that rank below the popularity row."""
    lines = ["# LatentR3 run report", "", "## Results", "", results_table(results, markdown=True)]
    if below_popularity:
        lines += ["", "**Below the popularity baseline.** " + " ".join(below_popularity)]
    if grpo_validation:
        lines += ["", "## GRPO: the step evaluated as LatentR3", ""]
        lines += grpo_validation_lines(grpo_validation)
    if gains:
        lines += _gain_lines(gains)
    if latent_usage:
        lines += _latent_usage_lines(latent_usage)
    lines += _timing_lines(timings)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    environment = environment_info().items()
    lines += ["", "## Environment", ""] + [f"- {key}: {value}" for key, value in environment]
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def grpo_selection_summary(validation: dict[str, Any]) -> str:
    """One line: which GRPO step the LatentR3 model holds, and why (from ``validation.json``)."""
    metric = "mean clean-latent reward" if validation["metric"] == "reward" else "target NLL"
    curve = validation.get("curve") or []
    start = next((point for point in curve if point["step"] == 0), None)
    key = "val_" + validation["metric"]
    selected, last = validation["selected_step"], validation["last_step"]
    head = f"LatentR3 = GRPO step {selected} of {last}"
    if validation["selection"] == "last":
        why = (
            f"the last step (--grpo-select last, the reference); the best validated step was "
            f"{validation['best_step']}"
        )
    elif validation["best_step"] is None:
        why = "the last step: no validation was finite"
    elif selected == 0:
        why = (
            f"no GRPO step improved the validation {metric} of the SFT model "
            f"({validation['best_value']:.4f}), so step 0 (the SFT model) is kept"
        )
    else:
        base = f", step 0: {start[key]:.4f}" if start else ""
        why = f"the best validation {metric} ({validation['best_value']:.4f}{base})"
    if validation.get("stopped_early"):
        why += f"; stopped early after {validation['patience']} validations without improvement"
    rows = f"{validation['rows']} validation rows, every {validation['eval_steps']} steps"
    return f"{head}: {why} ({rows})"


def grpo_validation_lines(validation: dict[str, Any]) -> list[str]:
    """Markdown: the selection sentence and the validation curve table."""
    lines = [grpo_selection_summary(validation) + ".", ""]
    lines += [
        "Validation with the clean latent (no noise) on a fixed subset of the validation "
        "split: mean reward (-perplexity of the target) and NLL per target token.",
        "",
        "| step | reward | NLL | |",
        "|---|---|---|---|",
    ]
    for point in validation.get("curve") or []:
        mark = "**kept**" if point["step"] == validation["selected_step"] else ""
        lines.append(
            f"| {point['step']} | {point['val_reward']:.4f} | {point['val_nll']:.4f} | {mark} |"
        )
    return lines


def swap_gap_words(gap: float) -> str:
    """The swap test's relative gap in words (``gap`` = swapped/own NLL - 1)."""
    percent = f"{100 * gap:+.2f} %"
    if abs(gap) < 0.005:
        return (
            f"gap {percent}: the loss does not change when the latent of another row is used, so "
            "the latent carries no information about this user; the model uses the thought "
            "slot as one constant extra token."
        )
    if gap > 0:
        return (
            f"gap {percent}: another row's latent makes the target less likely, so the latent "
            "carries information about this user."
        )
    return (
        f"gap {percent}: another row's latent makes the target MORE likely; the latent hurts "
        "(for example after a GRPO run that raised the validation loss)."
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines log; a torn last line (killed run) is ignored."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plot_sft_loss(plt: Any, logs: dict[str, list[dict[str, Any]]]) -> Any:
    """Train and validation loss of every SFT stage, or None without SFT logs."""
    sft_stages = [stage for stage in logs if stage.startswith("sft")]
    if not sft_stages:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in sft_stages:
        records = logs[stage]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), label=f"{stage} train", alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", label=f"{stage} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target-token NLL")
    ax.set_title("SFT loss")
    ax.legend(fontsize=7)
    return fig


def _plot_grpo(plt: Any, grpo: list[dict[str, Any]]) -> Any:
    """GRPO reward (paper Eq. 6: -perplexity) and advantage per step, or None without steps."""
    steps = [r for r in grpo if "reward_clean_mean" in r]
    if not steps:
        return None
    fig, (reward_ax, advantage_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["step"] for r in steps]
    reward_ax.plot(x, [r["reward_clean_mean"] for r in steps], label="clean latent (k=0)")
    reward_ax.plot(x, [r.get("reward_noisy_mean", float("nan")) for r in steps], label="noisy")
    val = [(r["step"], r["val_reward"]) for r in grpo if "val_reward" in r and "step" in r]
    if val:
        reward_ax.plot(*zip(*val), "o-", label="validation (clean)")
    reward_ax.set_title("GRPO reward (-perplexity)")
    reward_ax.set_xlabel("optimizer step")
    reward_ax.legend(fontsize=7)
    advantage_ax.plot(x, [r.get("adv_abs_mean", float("nan")) for r in steps], label="|A| mean")
    advantage_ax.plot(x, [r.get("adv_mean", float("nan")) for r in steps], label="A mean")
    advantage_ax.set_title("advantage")
    advantage_ax.set_xlabel("optimizer step")
    advantage_ax.legend(fontsize=7)
    return fig


_BAR_WIDTH = 0.4


def _plot_metrics(plt: Any, results: Sequence[dict]) -> Any:
    """HR@10 and NDCG@10 bars per (model, scoring)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['model']}\n{r['scoring']}" for r in results]
    xs = range(len(results))
    ax.bar(
        [i - _BAR_WIDTH / 2 for i in xs],
        [r.get("HR@10", 0) for r in results],
        _BAR_WIDTH,
        label="HR@10",
    )
    ax.bar(
        [i + _BAR_WIDTH / 2 for i in xs],
        [r.get("NDCG@10", 0) for r in results],
        _BAR_WIDTH,
        label="NDCG@10",
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=6)
    ax.legend(fontsize=7)
    ax.set_title("test metrics")
    return fig


def _plot_groups(plt: Any, results: Sequence[dict]) -> Any:
    """NDCG@10 per popularity group (paper Sec. 4.3.1), or None without group metrics."""
    grouped = [r for r in results if r.get("groups")]
    if not grouped:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    groups = sorted({group for r in grouped for group in r["groups"]})
    for j, group in enumerate(groups):
        values = [r["groups"].get(group, {}).get("NDCG@10", 0) for r in grouped]
        positions = [i + (j - 0.5) * _BAR_WIDTH for i in range(len(grouped))]
        ax.bar(positions, values, _BAR_WIDTH, label=group)
    ax.set_xticks(list(range(len(grouped))))
    ax.set_xticklabels([f"{r['model']}\n{r['scoring']}" for r in grouped], fontsize=6)
    ax.set_title("NDCG@10 by popularity group")
    ax.legend(fontsize=7)
    return fig


def make_plots(
    out_dir: Path, logs: dict[str, list[dict[str, Any]]], results: Sequence[dict]
) -> tuple[list[str], str | None]:
    """PNG plots of the training logs and results. Returns (files, note if matplotlib is absent).

    ``logs`` maps a stage name ("sft", "sft_baseline", "grpo") to its JSON-lines records.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install matplotlib)"
    figures = [
        ("sft_loss.png", _plot_sft_loss(plt, logs)),
        ("grpo_reward.png", _plot_grpo(plt, logs.get("grpo", []))),
    ]
    if results:
        figures.append(("metrics.png", _plot_metrics(plt, results)))
        figures.append(("popularity_groups.png", _plot_groups(plt, results)))
    files: list[str] = []
    for name, fig in figures:
        if fig is None:
            continue
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files, None
