"""Turn bench/results/*.json into Markdown tables.

Reads the one results schema of ``bench/harness.py`` (``machine``, ``config``, ``rows``): the
pytest-benchmark op files (``test_bench_ops_*``) get the fused-vs-naive table with ratios, every
other benchmark a plain table of its rows. Older files written before the harness are read when
they have ``machine`` and a list of ``rows``, and skipped (with a note) otherwise.

Usage: python bench/to_markdown.py [results_dir_or_files...]  (default: bench/results)
"""

from __future__ import annotations

import sys
from pathlib import Path

import harness


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def machine_line(info: dict) -> str:
    """Where and with what: one italic line above each table."""
    where = info.get("gpu") or info.get("cpu_model") or info.get("processor") or info.get("device")
    return (
        f"*{where}; torch {info.get('torch')}, triton {info.get('triton')}, "
        f"{info.get('torch_threads')} threads, load {info.get('loadavg_1m', '?')}, "
        f"{info.get('timestamp_utc', '?')}*\n\n"
    )


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return "…"
    return str(value)


def generic_table(data: dict) -> str:
    """Any benchmark's rows: one column per key holding a scalar in some row."""
    rows = data["rows"]
    keys = list(
        dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict | list))
    )
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return machine_line(data["machine"]) + "\n".join(lines) + "\n"


def table(data: dict) -> str:
    """The op benchmark's table; ratio columns compare with the naive row."""
    rows = data["rows"]
    head = (
        machine_line(data["machine"])
        + "| op | pass | rows (M) | dtype | impl | min time (ms) | median (ms) | time / naive "
        "| peak mem (MiB) | mem / naive | designed temporaries (MiB) |\n"
        + "|---|---|---|---|---|---|---|---|---|---|---|\n"
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
        data = harness.load_results(f)
        if not (
            isinstance(data, dict) and "machine" in data and isinstance(data.get("rows"), list)
        ):
            print(f"(skipping {f}: written before bench/harness.py's schema)", file=sys.stderr)
            continue
        print(f"### {f.stem}\n")
        is_op_table = bool(data["rows"]) and all("impl" in r and "op" in r for r in data["rows"])
        print(table(data) if is_op_table else generic_table(data))


if __name__ == "__main__":
    main(sys.argv[1:])
