"""GRPO step: the prefix-shared, fused trainer vs the naive reference-style step.

Measures prompts/s of one full optimizer step (rollout + rewards + advantages + loss + backward
+ AdamW) and its peak memory, for ours (``loss_pass`` keep_graph and recompute) and for the
reference-style step of ``bench/reference_grpo.py``; checks that rewards, advantages, loss and
LatentRATT gradients agree (fp32); prints the ratios and writes
``bench/results/bench_grpo_<device>.json``.

Shapes: realistic proportions on a tiny backbone (default: d=256, 2 layers, vocab 32768,
prompts ~150 tokens, targets ~13, G=8, 8 prompts per step), or ``--preset qwen1.5b`` (the
Qwen2.5-1.5B config, random weights, bf16 by default; for a GPU).

Timing and peak memory through ``bench/harness.py``: CUDA ``max_memory_allocated`` above what
is held before the step; CPU: each variant runs in a fresh subprocess, which measures its RSS
high-water mark above the RSS before the step.

    python bench/bench_grpo.py                      # CPU, tiny backbone
    python bench/bench_grpo.py --device cuda --preset qwen1.5b --prompts 32 --micro 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from presets import PRESETS, preset_model  # noqa: E402


def build(args):
    """(model, samples): random-weight Qwen2 of the preset, P random prompts/targets."""
    from latentr3_fast.data import EncodedSample, train_tokenizer

    p = PRESETS[args.preset]
    tok = train_tokenizer(["a b c d e f g h"] * 4, vocab_size=300)
    model = preset_model(tok, p, args.dtype, args.device, args.attn)
    model.backbone.resize_token_embeddings(p["vocab"])  # realistic LM-head width
    model.to(args.device)
    # LatentRATT weights large enough that the latent matters (the 0.02 init makes r ~ 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in model.ratt.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g).to(prm.device))
    v = p["vocab"]
    thought = model.thought_token_id
    samples = []
    for i in range(args.prompts):
        lp = args.prompt_len + (i * 7) % 21 - 10  # 140..160: left padding in every batch
        lt = args.target_len + (i % 5) - 2
        ids = torch.randint(0, v - 1, (lp + lt,), generator=g)
        ids[ids == thought] = 0
        samples.append(EncodedSample(ids[:lp].tolist(), ids[lp:].tolist()))
    return model, samples


def grpo_cfg(args, loss_pass: str):
    from latentr3_fast.train.grpo import GRPOConfig

    return GRPOConfig(
        num_generations=args.G,
        prompts_per_step=args.prompts,
        micro_batch_prompts=args.micro,
        loss_pass=loss_pass,
        lr=1e-4,
        warmup_steps=0,
        progress=False,
        seed=0,
    )


def make_step(variant: str, args, model, samples):
    """A zero-argument callable running one optimizer step of ``variant``."""
    from latentr3_fast.train.grpo import GRPOTrainer, step_noise

    if variant in ("keep_graph", "recompute"):
        trainer = GRPOTrainer(model, grpo_cfg(args, variant), samples)
        trainer.total_steps = 10**9
        return lambda: trainer.train_rollout(0)

    import reference_grpo as ref

    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in model.ratt.parameters():
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(model.ratt.parameters(), lr=1e-4, weight_decay=0.0)
    noise = step_noise(0, 0, args.prompts, args.G, model.hidden_size)

    def run():
        ref.reference_grpo_step(
            model,
            [s.prompt_ids for s in samples],
            [s.target_ids for s in samples],
            noise,
            prompts_per_forward=args.micro,
        )
        torch.nn.utils.clip_grad_norm_(model.ratt.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def probe_memory(variant: str, args, model, samples) -> float:
    """Peak extra memory (MiB) of one step of ``variant``. CUDA: after a warm-up step. CPU: the
    first step in a fresh process (freed heap memory stays resident, so a warm-up step would
    hide the peak); it includes the optimizer state (KBs for LatentRATT)."""
    step = make_step(variant, args, model, samples)
    cuda = args.device.startswith("cuda")
    if cuda:
        step()  # warm-up: lazy inits, optimizer state, cuBLAS workspaces
    with harness.PeakMemory(args.device, empty_cache=cuda) as mem:
        step()
    return mem.mib


def time_variant(variant: str, args, model, samples) -> tuple[float, float]:
    """(min, median) seconds of one optimizer step (after a warm-up). The ratios use the
    minimum: on a shared machine other processes only ever add time."""
    timing = harness.time_call(make_step(variant, args, model, samples), args.device,
                               reps=args.repeats)  # fmt: skip
    return timing.min_s, timing.median_s


def check_numerics(args, model, samples) -> dict[str, float]:
    """Ours vs the reference-style step (fp32). Per-token log-probs and rewards are compared
    directly; an untrained model's rewards are all ~ -V (perplexity ~ vocab size), so the
    batch-normalized advantages amplify fp32 rounding of the rewards, and the loss/gradient
    check feeds both sides the same advantages."""
    import reference_grpo as ref

    from latentr3_fast.train.grpo import GRPOTrainer, step_noise

    tr = GRPOTrainer(model, grpo_cfg(args, "keep_graph"), samples)
    out = tr.compute_gradients(0)
    ours = {n: p.grad.detach().float().clone() for n, p in model.ratt.named_parameters()}
    idx = tr.step_sample_indices(0)
    noise = step_noise(0, 0, args.prompts, args.G, model.hidden_size)
    res = ref.reference_grpo_step(
        model,
        [samples[i].prompt_ids for i in idx],
        [samples[i].target_ids for i in idx],
        noise,
        prompts_per_forward=args.micro,
        advantages=out["advantages"],
    )
    ours_lp = [row for part in out["logp"] for row in part]
    lp_diff = max(
        float((a[: b.shape[0]].cpu() - b.cpu()).abs().max()) for a, b in zip(ours_lp, res.logp)
    )
    gmax = max(float((ours[n] - g.float()).abs().max()) for n, g in res.grads.items())
    gscale = max(float(g.abs().max()) for g in res.grads.values())
    s_ours, s_ref = out["rewards"].cpu().double(), res.rewards.cpu().double()
    own_adv = ref.reference_advantages(res.rewards.cpu(), args.G, "batch")
    formula = ref.reference_advantages(out["rewards"].cpu(), args.G, "batch")
    return {
        "logp_max_abs_diff": lp_diff,
        "rewards_max_rel_diff": float(((s_ours - s_ref) / s_ref).abs().max()),
        "adv_vs_formula_max_abs_diff": float((out["advantages"].cpu() - formula).abs().max()),
        "adv_vs_reference_max_abs_diff": float((out["advantages"].cpu() - own_adv).abs().max()),
        "loss_abs_diff_same_adv": abs(out["loss"] - res.loss),
        "grad_max_abs_diff_same_adv": gmax,
        "grad_max_abs": gscale,
    }


def hit_ratio(args) -> dict[str, float]:
    """Wall time per optimizer step of the PPL reward (LatentR3) vs the decoding 0/1 reward
    ("original GRPO", paper Sec. 4.3.4) on the synthetic catalogue with a tiny model: the hit
    variant decodes every row with the constrained beam search (``--hit-beams``) and, as in the
    paper, trains the full model (``trainable="all"``); ``hit_latent`` trains LatentRATT only."""
    from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer
    from latentr3_fast.decode import catalogue_trie
    from latentr3_fast.model import tiny_qwen2
    from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
    from latentr3_fast.train.rollout_rewards import HitReward, beam_decoder

    ds = make_synthetic(seed=0)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=1024)
    out = {}
    for name, reward, trainable in (
        ("ppl_latent", "ppl", "latent"),
        ("hit_latent", "hit", "latent"),
        ("hit_all", "hit", "all"),
    ):
        model = tiny_qwen2(tok, hidden_size=128, num_layers=2, seed=0, device=args.device)
        builder = PromptBuilder(tok, ds.category, num_latent=1)
        samples = [builder.encode(x) for x in ds.train[: 4 * args.prompts]]
        rew = None
        if reward == "hit":
            trie = catalogue_trie(ds.items, builder)
            rew = HitReward(beam_decoder(trie, num_beams=args.hit_beams), eos_id=tok.eos_token_id)
        cfg = GRPOConfig(
            num_generations=args.G,
            prompts_per_step=args.prompts,
            micro_batch_prompts=args.micro,
            reward=reward,
            advantage="group" if reward == "hit" else "batch",
            trainable=trainable,
            warmup_steps=0,
            progress=False,
        )
        tr = GRPOTrainer(model, cfg, samples, reward=rew)
        tr.total_steps = 10**9

        steps = iter(range(10**9))

        def rollout(tr=tr, steps=steps):  # rollout 0 is the warm-up
            tr.train_rollout(next(steps))

        timing = harness.time_call(rollout, args.device, reps=args.repeats)
        out[name] = timing.min_s  # shared machine: other processes only add time
    print("\nper-step wall time, synthetic catalogue, tiny Qwen2 d=128:")
    for k, v in out.items():
        print(f"  {k:<11} {v:8.3f} s  ({v / out['ppl_latent']:.1f}x ppl_latent)")
    return out


def _worker_main(argv: list[str]) -> None:
    args = parse(argv)
    torch.set_flush_denormal(True)
    model, samples = build(args)
    print(json.dumps({"peak_mib": probe_memory(args.worker, args, model, samples)}))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--micro", type=int, default=4, help="prompts per forward (both)")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--target-len", type=int, default=13)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="keep_graph,recompute,reference")
    ap.add_argument("--no-check", action="store_true", help="skip the numerics check")
    ap.add_argument("--hit-ratio", action="store_true", help="time reward=hit vs ppl instead")
    ap.add_argument("--hit-beams", type=int, default=1, help="beams per row for reward=hit")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.preset != "tiny" and args.device != "cpu" else "fp32"
    return args


def measure(args, argv, model, samples) -> dict[str, dict]:
    """Per variant: min/median step time, prompts/s and peak memory (CPU: in a fresh worker
    process, whose RSS high-water mark is not hidden by earlier steps)."""
    rows = {}
    for v in args.variants.split(","):
        secs, median = time_variant(v, args, model, samples)
        if args.device.startswith("cuda"):
            peak = probe_memory(v, args, model, samples)
        else:
            argv_w = (sys.argv[1:] if argv is None else list(argv)) + ["--worker", v]
            out = subprocess.run(
                [sys.executable, __file__, *argv_w],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(HERE.parent)},
            )
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        rows[v] = {
            "step_s": secs,
            "step_s_median": median,
            "prompts_per_s": args.prompts / secs,
            "peak_mib": peak,
        }
    return rows


def report(args, rows: dict[str, dict]) -> dict[str, dict]:
    """Print the table and the ratios to the reference step; return the ratios."""
    print(
        f"\nGRPO step, {args.preset} (d={PRESETS[args.preset]['hidden']}, "
        f"L={PRESETS[args.preset]['layers']}, V={PRESETS[args.preset]['vocab']}), {args.dtype}, "
        f"{args.device}; P={args.prompts} prompts x G={args.G}, {args.micro} prompts/forward, "
        f"prompt ~{args.prompt_len}, target ~{args.target_len} tokens"
    )
    print(f"{'variant':<12} {'min s':>9} {'median s':>9} {'prompts/s':>10} {'peak MiB':>10}")
    for v, r in rows.items():
        print(
            f"{v:<12} {r['step_s']:>9.3f} {r['step_s_median']:>9.3f} "
            f"{r['prompts_per_s']:>10.2f} {r['peak_mib']:>10.1f}"
        )
    ratios = {}
    if "reference" in rows:
        for v in rows:
            if v == "reference":
                continue
            ratios[v] = {
                "throughput_x": rows[v]["prompts_per_s"] / rows["reference"]["prompts_per_s"],
                "memory_frac": rows[v]["peak_mib"] / max(rows["reference"]["peak_mib"], 1e-9),
            }
            print(
                f"{v}: {ratios[v]['throughput_x']:.1f}x throughput, "
                f"{ratios[v]['memory_frac']:.3f} of the reference peak memory "
                f"(targets: >= 8x, <= 0.333)"
            )
    return ratios


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        _worker_main(argv if argv is not None else sys.argv[1:])
        return
    torch.set_flush_denormal(True)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.hit_ratio:
        rows = [{"variant": k, "step_s": v} for k, v in hit_ratio(args).items()]
        path = Path(args.out) if args.out else HERE / "results" / f"bench_grpo_hit_ratio_{dev}.json"
        harness.write_results(
            path, "bench_grpo_hit_ratio", rows, config=vars(args), device=args.device
        )
        return
    model, samples = build(args)
    numerics = None
    if not args.no_check and args.dtype == "fp32":
        numerics = check_numerics(args, model, samples)
    rows = measure(args, argv, model, samples)
    ratios = report(args, rows)
    if numerics is not None:
        print("numerics (ours vs reference, fp32):", json.dumps(numerics))
    path = Path(args.out) if args.out else HERE / "results" / f"bench_grpo_{dev}_{args.preset}.json"
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    table = [dict(variant=v, **r) for v, r in rows.items()]
    harness.write_results(
        path, "bench_grpo", table, config=config, device=args.device, ratios=ratios,
        numerics=numerics,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
