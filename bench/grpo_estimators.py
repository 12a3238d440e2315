"""Does GRPO raise the held-out clean-latent reward after SFT? Estimators side by side.

    python bench/grpo_estimators.py [--sft-steps 15 25 40 80] [--grpo-steps 40]

For each SFT length (a tiny 1-layer Qwen2 on a 120-item/200-user synthetic catalogue, all
weights trained), LatentRATT alone is then trained for ``--grpo-steps`` steps of 16 prompts
in several ways, each from the same SFT weights, and the change of the mean clean-latent
reward (-perplexity of the target) on the validation rows is printed:

* ``direct``: gradient ascent on the clean reward itself (AdamW) -- the headroom that any
  LatentRATT-only training has;
* GRPO with ``estimator`` reparam (the reference) / score, ``advantage`` group / batch.

The README table "GRPO: what the reference estimator does" comes from this script.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch

from latentr3_fast.data import PromptBuilder, collate, dataset_corpus, make_synthetic
from latentr3_fast.data import train_tokenizer as train_bpe
from latentr3_fast.model import tiny_qwen2
from latentr3_fast.ops import perplexity_reward
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
from latentr3_fast.train.sft import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# (label, estimator, advantage, lr, sigma, GRPO seed)
GRPO_RUNS = [
    ("score, group, lr 1e-2, sigma 0.5, seed 0", "score", "group", 1e-2, 0.5, 0),
    ("score, group, lr 1e-2, sigma 0.5, seed 1", "score", "group", 1e-2, 0.5, 1),
    ("score, group, lr 1e-2, sigma 0.5, seed 2", "score", "group", 1e-2, 0.5, 2),
    ("reparam, group, lr 1e-3, sigma 0.5", "reparam", "group", 1e-3, 0.5, 0),
    ("reparam, batch, lr 1e-4, sigma 1.5", "reparam", "batch", 1e-4, 1.5, 0),
    ("score, batch, lr 1e-2, sigma 0.5", "score", "batch", 1e-2, 0.5, 0),
]


def sft_model(steps: int):
    ds = make_synthetic(num_items=120, num_users=200, seed=0)
    tok = train_bpe(dataset_corpus(ds), vocab_size=512)
    model = tiny_qwen2(
        tok,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate=128,
        seed=0,
        num_latent=1,
        torch_dtype=torch.float32,
        device="cpu",
        attn_implementation="sdpa",
    )
    pb = PromptBuilder(tok, ds.category, num_latent=1, max_length=256)
    train, valid = pb.encode_many(ds.train), pb.encode_many(ds.valid)
    cfg = SFTConfig(
        output_dir=None,
        epochs=100,
        max_steps=steps,
        batch_size=32,
        grad_accum=1,
        lr=3e-3,
        warmup_steps=5,
        progress=False,
        seed=0,
        patience=10,
    )
    SFTTrainer(model, cfg, train, valid).train()
    return model, train, valid, tok.pad_token_id


def direct_ascent(model, train, pad_id: int, steps: int, lr: float = 1e-3) -> None:
    """AdamW on -reward of the clean latent, LatentRATT only (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.ratt.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.ratt.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(0)
    for _ in range(steps):
        batch = collate(rng.sample(train, 16), pad_id)
        hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
        r = model.latents(hidden, batch.prompt_mask, cache)
        h = model.suffix_forward(cache, batch.prompt_mask, r.to(model.dtype), batch.target_ids)
        logp = model.target_logprobs(h, batch.target_ids, batch.target_mask).float()
        loss = -perplexity_reward(logp, batch.target_mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def held_out(model, train, valid) -> float:
    """Mean clean-latent reward on the validation rows."""
    cfg = GRPOConfig(prompts_per_step=16, progress=False)
    return GRPOTrainer(model, cfg, train).mean_clean_reward(valid)["reward"]


def grpo_gain(model, train, valid, base: float, run: tuple, grpo_steps: int) -> float:
    """Held-out clean-reward change after ``grpo_steps`` GRPO steps of one ``GRPO_RUNS`` entry."""
    _, est, adv, lr, sigma, seed = run
    cfg = GRPOConfig(
        num_generations=8,
        sigma=sigma,
        advantage=adv,
        estimator=est,
        prompts_per_step=16,
        micro_batch_prompts=16,
        lr=lr,
        warmup_steps=0,
        schedule="constant",
        max_steps=grpo_steps,
        epochs=100,
        progress=False,
        seed=seed,
    )
    tr = GRPOTrainer(model, cfg, train)
    tr.train()
    return tr.mean_clean_reward(valid)["reward"] - base


def one_sft_length(sft_steps: int, grpo_steps: int) -> list[dict]:
    """The rows of one SFT length: direct ascent and every GRPO run, from the same weights."""
    model, train, valid, pad_id = sft_model(sft_steps)
    base = held_out(model, train, valid)
    print(f"== after {sft_steps} SFT steps: held-out clean reward {base:.4f}", flush=True)

    def direct():
        m = copy.deepcopy(model)
        direct_ascent(m, train, pad_id, grpo_steps)
        return held_out(m, train, valid) - base

    runs = [("direct ascent (ceiling), lr 1e-3", direct)]
    runs += [(r[0], lambda r=r: grpo_gain(copy.deepcopy(model), train, valid, base, r, grpo_steps))
             for r in GRPO_RUNS]  # fmt: skip
    rows = []
    for label, fn in runs:
        timing = harness.time_call(fn, reps=1, warmup=0)
        print(f"   {label:44s} {timing.result:+.4f}", flush=True)
        rows.append(dict(sft_steps=sft_steps, run=label, base_reward=base,
                         reward_gain=timing.result, seconds=timing.min_s))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft-steps", type=int, nargs="+", default=[15, 25, 40, 80])
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for sft_steps in args.sft_steps:
        timing = harness.time_call(lambda n=sft_steps: one_sft_length(n, args.grpo_steps),
                                   reps=1, warmup=0)  # fmt: skip
        rows += timing.result
        print(f"   ({timing.min_s:.0f} s)")
    harness.write_results(args.out, "grpo_estimators", rows, config=vars(args))


if __name__ == "__main__":
    main()
