"""Summarise a CLI run (metrics, swap test, validation NLL) into one JSON + a Markdown table.

    python bench/smollm2_summary.py RUN_DIR --out bench/results/smollm2_cpu_cds.json \
        --note "budget: ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
STAGES = {"sft_baseline": "w/o reasoning", "sft": "SFT only", "grpo": "LatentR3"}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    run = args.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    usage = json.loads((run / "latent_usage.json").read_text())
    rows = []
    for rec in metrics:
        row = {k: rec.get(k) for k in ("model", "stage", "scoring", "n", *KS)}
        if rec["stage"] in STAGES:
            row["top1_distinct"] = top1_distinct(
                run / f"predictions-{rec['stage']}-{rec['scoring']}.jsonl"
            )
        rows.append(row)
    summary = {
        "note": args.note,
        "config": (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else "",
        "metrics": rows,
        "swap_test": usage,
        "validation_nll_after_sft": {
            "w/o reasoning": last_val_loss(run / "sft_baseline" / "sft_log.jsonl"),
            "SFT only": last_val_loss(run / "sft" / "sft_log.jsonl"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| model | scoring | " + " | ".join(KS) + " | distinct top-1 |")
    print("|---" * (len(KS) + 3) + "|")
    for r in rows:
        vals = " | ".join(f"{r[k]:.4f}" for k in KS)
        print(f"| {r['model']} | {r['scoring']} | {vals} | {r.get('top1_distinct', '-')} |")
    for name, u in usage.items():
        print(
            f"swap test, {name}: NLL {u['nll']:.4f} own vs {u['nll_swapped']:.4f} swapped "
            f"({100 * u['relative_gap']:+.2f} %, {u['rows']} rows)"
        )


if __name__ == "__main__":
    main()
