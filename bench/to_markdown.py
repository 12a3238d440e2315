"""Turn bench/results/*.json into Markdown tables (fused vs naive, with ratios).

Usage: python bench/to_markdown.py [results_dir_or_files...]  (default: bench/results)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def table(data: dict) -> str:
    """One Markdown table per results file; ratio columns compare with the naive row."""
    rows = data["rows"]
    info = data["machine"]
    where = info.get("gpu") or info.get("cpu_model") or info.get("processor")
    head = (
        f"*{where}; torch {info['torch']}, triton {info.get('triton')}, "
        f"{info.get('torch_threads')} threads, load {info.get('loadavg_1m', '?')}, "
        f"{info['timestamp_utc']}*\n\n"
        "| op | pass | rows (M) | dtype | impl | min time (ms) | median (ms) | time / naive "
        "| peak mem (MiB) | mem / naive | designed temporaries (MiB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    naive = {(r["op"], r["passes"], r["m"]): r for r in rows if r["impl"] == "naive"}
    out = []
    pairs = [r for r in rows if r["op"].endswith("_interleaved")]
    rows = [r for r in rows if not r["op"].endswith("_interleaved")]
    for r in sorted(rows, key=lambda r: (r["op"], r["passes"], r["m"], r["impl"] != "naive")):
        base = naive.get((r["op"], r["passes"], r["m"]))
        t_ratio = f"{r['min_s'] / base['min_s']:.2f}x" if base else "-"
        if base and r.get("peak_bytes") and base.get("peak_bytes"):
            m_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x"
        else:
            m_ratio = "-"
        out.append(
            f"| {r['op']} | {r['passes']} | {r['m']} ({r['layout']}) | {r['dtype']} | {r['impl']} "
            f"| {r['min_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} | {t_ratio} "
            f"| {_mib(r.get('peak_bytes'))} | {m_ratio} | {_mib(r.get('analytic_bytes'))} |"
        )
    text = head + "\n".join(out) + "\n"
    if pairs:
        text += (
            "\nInterleaved (naive and fused alternated in every round, same load):\n\n"
            "| op | pass | rows (M) | fused impl | naive min (ms) | fused min (ms) "
            "| fused / naive |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for r in sorted(pairs, key=lambda r: (r["passes"], r["m"])):
            text += (
                f"| {r['op'].removesuffix('_interleaved')} | {r['passes']} | {r['m']} "
                f"({r['layout']}) | {r['impl']} | {r['naive_min_s'] * 1e3:.1f} "
                f"| {r['min_s'] * 1e3:.1f} | {r['ratio']:.2f}x |\n"
            )
    return text


def main(argv: list[str]) -> None:
    targets = [Path(a) for a in argv] or [Path(__file__).parent / "results"]
    files = []
    for t in targets:
        files += sorted(t.glob("*.json")) if t.is_dir() else [t]
    for f in files:
        data = json.loads(f.read_text())
        if not (isinstance(data, dict) and "machine" in data and "rows" in data):
            print(f"(skipping {f}: not written by bench/conftest.py)", file=sys.stderr)
            continue
        print(f"### {f.stem}\n")
        print(table(data))


if __name__ == "__main__":
    main(sys.argv[1:])
