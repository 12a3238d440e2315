"""Summarise CLI runs (one per seed) into one JSON + Markdown tables: test metrics, distinct
top-1 titles, the latent swap test, validation NLL after SFT and the GRPO validation curve.

    python bench/smollm2_summary.py RUN_DIR [RUN_DIR ...] \
        --out bench/results/smollm2_cpu_cds.json --note "budget: ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
STAGES = {"sft_baseline": "w/o reasoning", "sft": "SFT only", "grpo": "LatentR3"}


def read_json(path: Path) -> Any:
    """The JSON at ``path``; a clear error naming it when it is missing."""
    if not path.is_file():
        raise SystemExit(f"smollm2_summary: {path} is missing (did the run's eval stage finish?)")
    return json.loads(path.read_text(encoding="utf-8"))


def last_val_loss(path: Path) -> float | None:
    """The last validation loss of an SFT log (None if absent)."""
    if not path.is_file():
        return None
    vals = [json.loads(x).get("val_loss") for x in path.read_text().splitlines() if x.strip()]
    vals = [v for v in vals if v is not None]
    return vals[-1] if vals else None


def top1_distinct(path: Path) -> int | None:
    """Distinct top-1 titles over the evaluated rows (how personalised the ranking is)."""
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return len({r["pred_titles"][0] for r in rows if r["pred_titles"]})


def seed_of(run: Path) -> int | None:
    """``seed:`` of the run's config.yaml (None if absent)."""
    cfg = run / "config.yaml"
    for line in cfg.read_text().splitlines() if cfg.is_file() else []:
        if line.startswith("seed:"):
            return int(line.split(":", 1)[1])
    return None


def summarise(run: Path) -> dict[str, Any]:
    """One run directory as a JSON-able dict."""
    metrics = read_json(run / "metrics.json")
    rows = []
    for rec in metrics:
        row = {k: rec.get(k) for k in ("model", "stage", "scoring", "n", *KS)}
        if rec["stage"] in STAGES:
            row["top1_distinct"] = top1_distinct(
                run / f"predictions-{rec['stage']}-{rec['scoring']}.jsonl"
            )
        rows.append(row)
    grpo_val = run / "grpo" / "validation.json"
    return {
        "run_dir": str(run),
        "seed": seed_of(run),
        "config": (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else "",
        "metrics": rows,
        "swap_test": read_json(run / "latent_usage.json"),
        "validation_nll_after_sft": {
            "w/o reasoning": last_val_loss(run / "sft_baseline" / "sft_log.jsonl"),
            "SFT only": last_val_loss(run / "sft" / "sft_log.jsonl"),
        },
        "grpo_validation": read_json(grpo_val) if grpo_val.is_file() else None,
        "timings_s": read_json(run / "timings.json") if (run / "timings.json").is_file() else None,
    }


def print_run(run: dict[str, Any]) -> None:
    """The run's Markdown metrics table and swap-test lines."""
    print(f"\n{run['run_dir']} (seed {run['seed']})")
    print("| model | scoring | " + " | ".join(KS) + " | distinct top-1 |")
    print("|---" * (len(KS) + 3) + "|")
    for r in run["metrics"]:
        vals = " | ".join(f"{r[k]:.4f}" for k in KS)
        print(f"| {r['model']} | {r['scoring']} | {vals} | {r.get('top1_distinct', '-')} |")
    for name, u in run["swap_test"].items():
        print(
            f"swap test, {name}: NLL {u['nll']:.4f} own vs {u['nll_swapped']:.4f} swapped "
            f"({100 * u['relative_gap']:+.3f} %, {u['rows']} rows)"
        )
    val = run["grpo_validation"]
    if val:
        curve = [
            f"{c['step']}: {c['val_reward']:.2f}/{c['val_nll']:.4f}"
            for c in val["curve"]
            if c.get("event") == "validation"
        ]
        kept = val["selected_step"]
        print(f"GRPO validation reward/NLL by step: {', '.join(curve)}; kept step {kept}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", help="CLI --output-dir, one per seed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    runs = [summarise(run) for run in args.run_dirs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"note": args.note, "runs": runs}, indent=2) + "\n")
    for run in runs:
        print_run(run)


if __name__ == "__main__":
    main()
