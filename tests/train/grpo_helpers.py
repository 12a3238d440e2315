"""Shared builders of the GRPO tests: a tiny tokenizer/backbone on the synthetic catalogue."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer
from latentr3_fast.model import tiny_qwen2

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name: str):
    """Import ``bench/<name>.py`` (bench/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_setup(
    num_latent: int = 1,
    hidden: int = 64,
    vocab: int = 400,
    seed: int = 0,
    num_items: int = 60,
    num_users: int = 80,
    max_length: int = 512,
):
    """(dataset, tokenizer, builder, model) for a tiny fp32 Qwen2 on the synthetic catalogue."""
    ds = make_synthetic(num_items=num_items, num_users=num_users, seed=seed)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=vocab)
    model = tiny_qwen2(
        tok,
        hidden_size=hidden,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate=2 * hidden,
        seed=seed,
        num_latent=num_latent,
        torch_dtype=torch.float32,
        device="cpu",
        attn_implementation="sdpa",
    )
    builder = PromptBuilder(tok, ds.category, num_latent=num_latent, max_length=max_length)
    return ds, tok, builder, model


def varied_samples(ds, builder, count: int):
    """``count`` encoded samples whose prompts have different lengths (histories cut to 1..4)."""
    out = []
    for i, s in enumerate(ds.train[:count]):
        keep = 1 + (i % 4)
        s2 = type(s)(
            history_ids=s.history_ids[-keep:],
            history_titles=s.history_titles[-keep:],
            target_id=s.target_id,
            target_title=s.target_title,
        )
        out.append(builder.encode(s2))
    return out


# the tiny GRPO run of the checkpoint / resume tests: 4 steps of 2 prompts x 3 rows
RESUME_RUN = dict(
    num_generations=3,
    prompts_per_step=2,
    micro_batch_prompts=2,
    lr=1e-3,
    warmup_steps=1,
    progress=False,
    seed=2,
)


def resume_setup():
    """(samples, fresh model, reference model after 4 uninterrupted steps of ``RESUME_RUN``)."""
    from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer

    ds, _, builder, model = tiny_setup(hidden=32)
    samples = varied_samples(ds, builder, 12)
    ref_model = tiny_setup(hidden=32)[3]
    GRPOTrainer(ref_model, GRPOConfig(max_steps=4, **RESUME_RUN), samples).train()
    return samples, model, ref_model


def assert_resume_matches(out_dir, samples, ref_model, resumed_step: int = 2):
    """A new trainer resumes from ``out_dir`` at ``resumed_step`` and ends where the
    uninterrupted reference ended; returns its model."""
    from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer

    model2 = tiny_setup(hidden=32)[3]
    cfg2 = GRPOConfig(output_dir=str(out_dir), max_steps=4, resume=True, **RESUME_RUN)
    tr2 = GRPOTrainer(model2, cfg2, samples)
    assert tr2.global_step == resumed_step
    tr2.train()
    for (n, a), b in zip(model2.ratt.named_parameters(), ref_model.ratt.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    return model2
