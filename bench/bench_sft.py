"""SFT step: the package's cached path vs the reference-style step, side by side.

Ours (``latentr3_fast.train.sft.sft_loss``): one prompt forward of the base model (no LM head)
giving H and the KV cache, LatentRATT, one suffix forward of ``[r, target[:-1]]`` on the cache,
fused LM-head log-probs at the T target positions only.
Reference-style (``bench/reference_sft.py``): a full forward over the prompt (LM head at every
position), then a full forward over ``[prompt, r, target]`` with full-vocabulary logits at every
position and Hugging Face's cross-entropy.

Each timed step = zero_grad + loss + backward + AdamW step, on the same weights and batch.
Reports tokens/s (real prompt + target tokens per second) of both, the ratio, the loss
difference and the largest gradient difference (fp32), and writes
``bench/results/bench_sft_<device>.json``.

    python bench/bench_sft.py                          # CPU, tiny backbone, vocab 32768
    python bench/bench_sft.py --vocab 151936           # Qwen-sized LM head
    python bench/bench_sft.py --device cuda --preset qwen1.5b --dtype bf16 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from presets import PRESETS, preset_model  # noqa: E402


def build(args):
    """(model, batch): random-weight Qwen2 of the preset and one collated batch."""
    from latentr3_fast.data import EncodedSample, collate, train_tokenizer

    p = dict(PRESETS[args.preset])
    if args.vocab:
        p["vocab"] = args.vocab
    tok = train_tokenizer(["a b c d e f g h"] * 4, vocab_size=300)
    model = preset_model(tok, p, args.dtype, args.device, args.attn, num_latent=args.num_latent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.backbone.resize_token_embeddings(p["vocab"], mean_resizing=False)
    model.to(args.device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a latent that matters (the 0.02 init makes r ~ 0)
        for prm in model.ratt.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g).to(prm.device))
    samples = []
    for i in range(args.batch):
        lp = args.prompt_len + (i * 7) % 21 - 10  # +-10 tokens: left padding in the batch
        lt = args.target_len + (i % 5) - 2
        ids = torch.randint(0, model.thought_token_id, (lp + lt,), generator=g)
        samples.append(EncodedSample(ids[:lp].tolist(), ids[lp:].tolist()))
    batch = collate(samples, tok.pad_token_id).to(args.device)
    return model, batch, p


def loss_fn(variant: str):
    from latentr3_fast.train.sft import sft_loss

    if variant == "ours":
        return lambda model, batch: sft_loss(model, batch)[0]
    import reference_sft

    return reference_sft.reference_sft_loss


def check_numerics(model, batch) -> dict[str, float]:
    """Loss and gradients of both variants on the same weights (no optimizer step)."""
    out = {}
    grads = {}
    for variant in ("ours", "reference"):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(variant)(model, batch)
        loss.backward()
        out[f"loss_{variant}"] = float(loss.detach())
        grads[variant] = {
            k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None
        }
    model.zero_grad(set_to_none=True)
    a, b = grads["ours"], grads["reference"]
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_reference"])
    out["grad_keys_equal"] = float(set(a) == set(b))
    out["grad_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    out["grad_max_abs"] = max(float(b[k].abs().max()) for k in b)
    out["grad_max_rel_diff"] = max(
        float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a
    )
    return out


def time_variants(args, model, batch) -> dict[str, dict[str, list[float]]]:
    """Alternate the variants rep by rep (fair on a noisy machine). Per rep and variant:
    seconds of loss + backward ("fwd_bwd") and of the whole step incl. AdamW ("step")."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    times = {v: {"fwd_bwd": [], "step": []} for v in ("ours", "reference")}
    fns = {v: loss_fn(v) for v in times}
    for rep in range(args.warmup + args.reps):
        for variant, fn in fns.items():
            harness.sync(args.device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(model, batch).backward()
            harness.sync(args.device)
            t1 = time.perf_counter()
            opt.step()
            harness.sync(args.device)
            if rep >= args.warmup:
                times[variant]["fwd_bwd"].append(t1 - t0)
                times[variant]["step"].append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return times


def peak_memory(args, model, batch, variant: str) -> float | None:
    """CUDA: peak bytes above the resident model during one loss + backward (None on CPU: this
    process has run the step before, so its RSS high-water mark would hide the peak)."""
    if not args.device.startswith("cuda"):
        return None
    model.zero_grad(set_to_none=True)
    with harness.PeakMemory(args.device) as mem:
        loss_fn(variant)(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return float(mem.bytes)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocab")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--attn", default=None, help="attn_implementation (default: automatic)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--target-len", type=int, default=12)
    ap.add_argument("--num-latent", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    torch.set_flush_denormal(True)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch, shape = build(args)
    tokens = int(batch.prompt_mask.sum() + batch.target_mask.sum())
    numerics = check_numerics(model, batch)
    times = time_variants(args, model, batch)
    med = {k: statistics.median(v["step"]) for k, v in times.items()}
    med_fb = {k: statistics.median(v["fwd_bwd"]) for k, v in times.items()}
    rows = [
        dict(variant=k, median_step_s=med[k], median_fwd_bwd_s=med_fb[k],
             tokens_per_s=tokens / med[k], tokens_per_s_fwd_bwd=tokens / med_fb[k],
             peak_bytes=peak_memory(args, model, batch, k), seconds=times[k])
        for k in ("ours", "reference")
    ]  # fmt: skip
    summary = {
        "speedup": med["reference"] / med["ours"],
        "speedup_fwd_bwd": med_fb["reference"] / med_fb["ours"],
        # median of per-rep ratios (the variants alternate): robust to load drifting over time
        "speedup_paired": statistics.median(
            r / o for r, o in zip(times["reference"]["step"], times["ours"]["step"])
        ),
        "speedup_fwd_bwd_paired": statistics.median(
            r / o for r, o in zip(times["reference"]["fwd_bwd"], times["ours"]["fwd_bwd"])
        ),
        **numerics,
    }
    config = dict(vars(args), attn_implementation=model.backbone.config._attn_implementation,
                  shape=dict(shape, tokens_per_step=tokens,
                             prompt_cols=int(batch.prompt_ids.shape[1]),
                             target_cols=int(batch.target_ids.shape[1])))  # fmt: skip
    out = Path(args.out) if args.out else HERE / "results" / f"bench_sft_{args.device}.json"
    result = harness.write_results(out, "bench_sft", rows, config=config, device=args.device,
                                   summary=summary)  # fmt: skip
    _report(args, shape, tokens, med, med_fb, summary)
    print(f"  wrote {out}")
    return result


def _report(args, shape, tokens, med, med_fb, summary) -> None:
    print(
        f"SFT step  preset={args.preset} vocab={shape['vocab']} device={args.device} "
        f"dtype={args.dtype} B={args.batch} Lp~{args.prompt_len} T~{args.target_len} "
        f"N={args.num_latent} tokens/step={tokens}"
    )
    for k in ("ours", "reference"):
        print(
            f"  {k:9s}: step {med[k] * 1e3:9.1f} ms  {tokens / med[k]:9.0f} tokens/s   "
            f"fwd+bwd {med_fb[k] * 1e3:9.1f} ms  {tokens / med_fb[k]:9.0f} tokens/s"
        )
    print(
        f"  speedup  : {summary['speedup']:.2f}x (whole step incl. AdamW), "
        f"{summary['speedup_fwd_bwd']:.2f}x (fwd+bwd); paired per-rep medians "
        f"{summary['speedup_paired']:.2f}x / {summary['speedup_fwd_bwd_paired']:.2f}x"
    )
    print(
        f"  loss ours={summary['loss_ours']:.6f} reference={summary['loss_reference']:.6f} "
        f"|diff|={summary['loss_abs_diff']:.2e}"
    )
    print(
        f"  grads max|diff|={summary['grad_max_abs_diff']:.2e} "
        f"(max|g|={summary['grad_max_abs']:.2e}, max rel={summary['grad_max_rel_diff']:.2e})"
    )


if __name__ == "__main__":
    main()
