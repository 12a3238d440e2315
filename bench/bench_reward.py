"""Reward throughput and peak memory: ``PerplexityReward`` vs the plain full-logits way.

Setting (issue 8): G = 8 rows of ONE prompt (prompt 512 tokens, answer 32 tokens, plus
``--extra`` continuous tokens per row, e.g. LatentR3's latent), a tiny-but-realistic backbone
(Qwen2, hidden 256, 2 layers, vocab 32768 by default).

Variants
* ``fused``      PerplexityReward: prompt forward once, KV cache expanded to G rows, one suffix
                 forward over [last prompt token, extra, answer[:-1]], fused LM head.
* ``plain``      the reference-style way: G full forwards over [prompt, extra, answer] with
                 full-vocabulary logits at every position, log_softmax, gather.
* ``plain_keep`` G full forwards, but logits only at the answer positions (HF
                 ``logits_to_keep``), log_softmax, gather: isolates the KV-sharing gain.

Each variant runs in a fresh subprocess, measured by ``bench/harness.py``. Peak memory = the
first (cold) call's peak RSS above the RSS before it, or ``torch.cuda.max_memory_allocated``
above the baseline on CUDA. Time = median of ``--repeats``
warm calls. ``--grad`` also back-propagates to the extra embeddings (the GRPO-training use).
The script checks that all variants give the same rewards.

    python bench/bench_reward.py [--vocab 32768] [--grad] [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import harness

VARIANTS = ("fused", "plain", "plain_keep")


def build(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.inter or 4 * args.hidden,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):  # initialise on the device (a 1.5B model on CPU is slow)
        model = Qwen2ForCausalLM(cfg).to(dtype=dtype).eval()
    model.requires_grad_(False)
    with torch.no_grad():  # a peaked head, like a trained model
        model.lm_head.weight.normal_(0.0, 0.1)
    g, d = args.generations, args.hidden
    gen = torch.Generator().manual_seed(1)
    pi = torch.randint(0, args.vocab, (1, args.prompt_len), generator=gen).to(args.device)
    pm = torch.ones_like(pi)
    ti = torch.randint(0, args.vocab, (g, args.answer_len), generator=gen).to(args.device)
    tm = torch.ones_like(ti)
    ex = None
    if args.extra:
        ex = (torch.randn(g, args.extra, d, generator=gen) * 0.02).to(args.device, dtype)
    return model, (pi, pm, ti, tm, ex)


def make_call(variant, model, inputs, args):
    import torch
    from reference_reward import plain_logprobs

    from latentr3_fast.ops import perplexity_reward
    from latentr3_fast.reward import PerplexityReward

    pi, pm, ti, tm, ex = inputs
    g = args.generations
    scorer = PerplexityReward(model)

    def run():
        extra = None if ex is None else ex.clone().requires_grad_(args.grad)
        with torch.set_grad_enabled(args.grad):
            if variant == "fused":
                s = scorer(pi, pm, ti, tm, extra_embeds=extra, num_generations=g)
            elif variant == "plain":
                logp = plain_logprobs(model, pi, pm, ti, tm, extra_embeds=extra, num_generations=g)
                s = perplexity_reward(logp, tm)
            else:  # plain_keep: full forwards, logits only where the answer is predicted
                emb = model.get_input_embeddings()
                parts = [emb(pi).expand(g, -1, -1)]
                if extra is not None:
                    parts.append(extra)
                parts.append(emb(ti))
                x = torch.cat(parts, dim=1)
                t = ti.shape[1]
                logits = model(inputs_embeds=x, logits_to_keep=t + 1).logits[:, :-1]
                logp = torch.log_softmax(logits.float(), -1).gather(2, ti[:, :, None])[:, :, 0]
                s = perplexity_reward(logp, tm)
            if args.grad and extra is not None:
                s.sum().backward()
        return s.detach().float().cpu()

    return run


def worker(args) -> dict:
    import torch

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = build(args)
    run = make_call(args.worker, model, inputs, args)
    # The first (cold) call gives the peak memory and is the warm-up of the timed calls.
    with harness.PeakMemory(args.device) as mem:
        rewards = run()
    timing = harness.time_call(run, args.device, reps=args.repeats, warmup=0)
    return {
        "variant": args.worker,
        "seconds": timing.median_s,
        "cpu_seconds": timing.cpu_median_s,
        "peak_bytes": mem.bytes,
        "memory_method": mem.method,
        "rewards": rewards.tolist(),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4, help="attention heads (Qwen2.5-1.5B: 12)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inter", type=int, default=0, help="MLP width (0: 4 x hidden)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--answer-len", type=int, default=32)
    ap.add_argument("--extra", type=int, default=1, help="continuous tokens per row (latents)")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad", action="store_true", help="also backward to the extra embeddings")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}

    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant]
        cmd += [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    g = args.generations
    print(
        f"G={g} rows of one prompt: prompt {args.prompt_len}, answer {args.answer_len}, extra "
        f"{args.extra}; Qwen2 hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; "
        f"{args.device} {args.dtype}{', +backward' if args.grad else ''}"
    )
    ref = results.get("fused")
    print(
        f"{'variant':<11} {'ms/group':>10} {'rows/s':>9} {'cpu ms':>9} {'peak MiB':>10} "
        f"{'time x':>7} {'cpu x':>7} {'mem x':>7}  max rel. diff of rewards vs fused"
    )
    for name, r in results.items():
        sec, mib = r["seconds"], r["peak_bytes"] / 2**20
        tx = r["seconds"] / ref["seconds"] if ref else float("nan")
        cx = r["cpu_seconds"] / ref["cpu_seconds"] if ref else float("nan")
        mx = r["peak_bytes"] / max(ref["peak_bytes"], 1) if ref else float("nan")
        diff = (
            max(abs(a - b) / abs(b) for a, b in zip(r["rewards"], ref["rewards"]))
            if ref
            else float("nan")
        )
        print(
            f"{name:<11} {sec * 1e3:10.1f} {g / sec:9.1f} {r['cpu_seconds'] * 1e3:9.1f} "
            f"{mib:10.1f} {tx:7.2f} {cx:7.2f} {mx:7.2f}  {diff:.2e}"
        )
    print(
        f"(memory: {ref['memory_method'] if ref else '-'}; x = variant / fused; cpu = process "
        "CPU time, the robust measure on a shared machine with --threads 1)"
    )
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    harness.write_results(args.out, "bench_reward", list(results.values()), config=config,
                          device=args.device)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
