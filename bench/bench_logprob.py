"""Fused LM-head log-probs: ours (Triton) vs the chunked torch path vs a Liger-style reference.

Modes, per row count M (Qwen2.5-1.5B head by default: d=1536, V=151,936, bf16):
* ``fwd``        log-probs only (no autograd), e.g. the GRPO reward;
* ``fwd+bwd``    log-probs and dH with the head frozen (the GRPO loss);
* ``fwd+bwd+dW`` log-probs, dH and dW (SFT with a trainable head).

Variants: ``triton`` (``fused_linear_logprob_triton``, deterministic chunked backward),
``torch`` (``fused_linear_logprob_torch``, the package's CPU/fallback path) and ``liger``
(``bench/liger_style_logprob.py``: chunked logits, gradients computed in forward; it needs a
scalar loss, so it computes ``sum(logp)`` and has no ``fwd``-only mode of its own: its ``fwd``
row is the same forward with no tensor requiring grad). Reports median time and peak memory
above the inputs (CUDA ``max_memory_allocated``; not measured on CPU), the largest difference to
the torch path, and whether two ``triton`` backward passes are bit-identical.

    python bench/bench_logprob.py --out results.json               # GPU, full sizes
    python bench/bench_logprob.py --dry-run --out /tmp/x.json      # CPU, tiny, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402


def _measure(fn, device: str, reps: int) -> tuple[float, float | None, object]:
    """(median seconds, peak MiB above the baseline or None on CPU, last result); the warm-up
    call absorbs Triton compilation and autotuning."""
    timing = harness.time_call(fn, device, reps=reps, memory=device == "cuda")
    return timing.median_s, timing.peak_mib, timing.result


def _variant_fn(name: str, mode: str, h, w, t):
    import torch
    from liger_style_logprob import liger_style_sum_logprob

    from latentr3_fast.kernels.linear_logprob import fused_linear_logprob_triton
    from latentr3_fast.ops import fused_linear_logprob_torch

    need_h = mode != "fwd"
    need_w = mode == "fwd+bwd+dW"

    def run():
        hh = h.detach().requires_grad_(need_h)
        ww = w.detach().requires_grad_(need_w)
        with torch.set_grad_enabled(need_h or need_w):
            if name == "liger":
                total = liger_style_sum_logprob(hh, ww, t)
                grads = torch.autograd.grad(total, [x for x in (hh, ww) if x.requires_grad]) \
                    if (need_h or need_w) else ()  # fmt: skip
                return total.detach(), grads
            f = fused_linear_logprob_triton if name == "triton" else fused_linear_logprob_torch
            logp = f(hh, ww, t)
            grads = ()
            if need_h or need_w:
                grads = torch.autograd.grad(logp.sum(), [x for x in (hh, ww) if x.requires_grad])
            return logp.detach(), grads

    return run


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def bench(args) -> dict:
    import torch

    from latentr3_fast.kernels import linear_logprob as ll

    device, dtype = args.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(args.vocab, args.dim, generator=gen) / 4).to(device=device, dtype=dtype)
    rows = []
    for m in args.rows:
        h = (torch.randn(m, args.dim, generator=gen) / args.dim**0.25).to(device, dtype)
        t = torch.randint(0, args.vocab, (m,), generator=gen).to(device)
        results = {}
        for mode in args.modes:
            for name in args.variants:
                try:
                    sec, peak, out = _measure(_variant_fn(name, mode, h, w, t), device, args.reps)
                except torch.OutOfMemoryError as exc:  # report it, keep measuring the others
                    rows.append(dict(rows=m, mode=mode, variant=name, error=str(exc)[:200]))
                    continue
                results[(mode, name)] = out
                rows.append(dict(rows=m, mode=mode, variant=name, seconds=sec, peak_mib=peak,
                                 rows_per_s=m / sec))  # fmt: skip
            ref = results.get((mode, "torch"))
            for r in rows:
                if r.get("rows") != m or r.get("mode") != mode or "error" in r:
                    continue
                got = results.get((mode, r["variant"]))
                if ref is None or got is None:
                    continue
                val = got[0] if r["variant"] != "liger" else got[0].reshape(1)
                ref_val = ref[0] if r["variant"] != "liger" else ref[0].sum().reshape(1)
                r["max_diff_value_vs_torch"] = _diff(val, ref_val)
                if got[1] and ref[1]:
                    r["max_diff_dh_vs_torch"] = _diff(got[1][0], ref[1][0])
        if "triton" in args.variants and any(md != "fwd" for md in args.modes):
            mode = "fwd+bwd+dW" if "fwd+bwd+dW" in args.modes else "fwd+bwd"
            run = _variant_fn("triton", mode, h, w, t)
            a, b = run(), run()
            same = all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and torch.equal(a[0], b[0])
            rows.append(dict(rows=m, mode=mode, variant="triton", deterministic=bool(same)))
        del h, t, results
    return dict(rows=rows, autotuned=ll.autotuned_choices())


def markdown(result: dict) -> str:
    """The rows as a Markdown table (time, peak memory, ratio to the torch path)."""
    m = result["machine"]
    lines = [
        f"Fused log-prob, d={result['config']['dim']}, V={result['config']['vocab']}, "
        f"{result['config']['dtype']}, {m.get('gpu', m['device'])}",
        "",
        "| rows | mode | variant | ms | peak MiB | vs torch (time) | max diff vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {(r["rows"], r["mode"]): r["seconds"] for r in result["rows"]
            if r.get("variant") == "torch" and "seconds" in r}  # fmt: skip
    for r in result["rows"]:
        if "deterministic" in r:
            lines.append(f"| {r['rows']} | {r['mode']} | triton x2 | | | | bit-identical: "
                         f"{r['deterministic']} |")  # fmt: skip
            continue
        if "error" in r:
            lines.append(f"| {r['rows']} | {r['mode']} | {r['variant']} | error | | | "
                         f"{r['error'][:60]} |")  # fmt: skip
            continue
        ref = base.get((r["rows"], r["mode"]))
        ratio = f"{ref / r['seconds']:.2f}x" if ref else ""
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        diff = max(r.get("max_diff_value_vs_torch", 0.0), r.get("max_diff_dh_vs_torch", 0.0))
        lines.append(f"| {r['rows']} | {r['mode']} | {r['variant']} | {1e3 * r['seconds']:.2f} "
                     f"| {peak} | {ratio} | {diff:.3g} |")  # fmt: skip
    if result.get("autotuned"):
        lines += ["", "Autotuner choices: " + json.dumps(result["autotuned"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dry_help = "tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script)"
    ap.add_argument("--dry-run", action="store_true", help=dry_help)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rows", default="1024,4096,16384", help="comma-separated row counts")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--modes", default="fwd,fwd+bwd,fwd+bwd+dW")
    ap.add_argument("--variants", default="triton,torch,liger")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (Markdown beside it)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        args.device = "cpu"
        args.dim, args.vocab, args.rows, args.reps = 24, 1000, "5,33", 1
    import torch

    torch.set_num_threads(1)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("--device cpu runs Triton only under TRITON_INTERPRET=1 (use --dry-run)")
    args.rows = [int(x) for x in str(args.rows).split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    args.variants = [x for x in args.variants.split(",") if x]
    measured = bench(args)
    result = harness.results_document(
        "bench_logprob", measured["rows"], config=vars(args), device=args.device,
        autotuned=measured["autotuned"],
    )  # fmt: skip
    result["machine"].update(interpret=os.environ.get("TRITON_INTERPRET", "0"),
                             autotune=os.environ.get("LATENTR3_AUTOTUNE", "0"))  # fmt: skip
    table = markdown(result)
    print(table)
    if args.out:
        harness.write_json(args.out, result)
        args.out.with_suffix(".md").write_text(table)
    bad = [r for r in result["rows"] if r.get("deterministic") is False or "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
