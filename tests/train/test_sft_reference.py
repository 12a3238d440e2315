"""The benchmark's reference-style SFT step (two full forwards, full logits) gives the same loss
and gradients as the package's cached step: both the benchmark and the fast path are checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from latentr3_fast.data import EncodedSample, collate, train_tokenizer
from latentr3_fast.model import tiny_qwen2
from latentr3_fast.train.sft import sft_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from reference_sft import reference_sft_loss  # noqa: E402


@pytest.mark.parametrize("n,mode", [(0, "ratt"), (1, "ratt"), (2, "ratt"), (2, "hidden")])
def test_reference_step_matches_fast_step(n, mode):
    tok = train_tokenizer(["a b c d e f g h ij kl mn"] * 4, vocab_size=300)
    model = tiny_qwen2(
        tok,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate=48,
        num_latent=n,
        latent_mode=mode,
        seed=n,
    )
    if model.ratt is not None:
        with torch.no_grad():
            for p in model.ratt.parameters():
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    samples = []
    for lp, lt in [(9, 3), (4, 5), (13, 1), (7, 4)]:
        ids = torch.randint(0, model.thought_token_id, (lp + lt,), generator=g).tolist()
        samples.append(EncodedSample(ids[:lp], ids[lp:]))
    batch = collate(samples, tok.pad_token_id)
    grads = []
    losses = []
    for fn in (lambda m, b: sft_loss(m, b)[0], reference_sft_loss):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)
