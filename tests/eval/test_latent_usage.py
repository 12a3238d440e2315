"""The latent swap test against row-by-row full forwards, and its properties."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.data import PromptBuilder
from latentr3_fast.errors import ConfigError
from latentr3_fast.eval.latent_usage import latent_usage
from latentr3_fast.model import tiny_qwen2


def _encoded(ds, model, n_rows):
    pb = PromptBuilder(model.tokenizer, ds.category, num_latent=model.num_latent)
    return pb.encode_many(ds.valid[:n_rows] + ds.test[: max(0, n_rows - len(ds.valid))])


@torch.no_grad()
def _reference_nll(model, samples, swap: bool) -> float:
    """One unpadded, uncached full HF forward per row; row i uses row i+1's latent if swap."""
    bb = model.backbone
    emb = bb.get_input_embeddings()
    rs = []
    for s in samples:
        x = torch.tensor(s.prompt_ids)
        hs = bb(inputs_embeds=emb(x[None]), output_hidden_states=True).hidden_states[-1]
        rs.append(model.ratt(hs, torch.ones(hs.shape[:2]))[0])
    total, tokens = 0.0, 0
    for i, s in enumerate(samples):
        x, y = torch.tensor(s.prompt_ids), torch.tensor(s.target_ids)
        ids = torch.cat([x, torch.tensor([model.thought_token_id]), y])
        e = emb(ids[None]).clone()
        e[0, len(x)] = rs[(i + 1) % len(samples)] if swap else rs[i]
        lp = torch.log_softmax(bb(inputs_embeds=e).logits[0].float(), -1)
        pos = torch.arange(len(x), len(x) + len(y))  # the thought slot predicts y[0]
        total -= lp[pos, y].sum().item()
        tokens += len(y)
    return total / tokens


@pytest.fixture(scope="module")
def latent_model(tiny_eval):
    ds, base = tiny_eval
    model = tiny_qwen2(base.tokenizer, hidden_size=32, num_latent=1, seed=3)
    with torch.no_grad():
        # far from the near-zero init: a random-init tiny model predicts an almost uniform
        # distribution whatever its latent, which would hide a wrong pairing of rows
        for p in model.ratt.parameters():
            p.normal_(0, 0.5)
        for p in model.backbone.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return ds, model.eval()


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_matches_row_by_row_reference(latent_model, batch_size):
    ds, model = latent_model
    samples = _encoded(ds, model, 7)  # 7 rows: batches of 3 leave a ragged last batch
    got = latent_usage(model, samples, batch_size=batch_size)
    assert got.rows == 7 and got.tokens == sum(len(s.target_ids) for s in samples)
    assert got.nll == pytest.approx(_reference_nll(model, samples, swap=False), rel=1e-6)
    assert got.nll_swapped == pytest.approx(_reference_nll(model, samples, swap=True), rel=1e-6)
    assert abs(got.gap) > 1e-4 * got.nll  # the latent's content matters in this model


def test_constant_latent_has_zero_gap(latent_model):
    ds, model = latent_model
    const = tiny_qwen2(model.tokenizer, hidden_size=32, num_latent=1, seed=3).eval()
    const.backbone.load_state_dict(model.backbone.state_dict())  # the same sharp backbone
    with torch.no_grad():  # zero weights, non-zero bias: r is the same vector for every row
        for lin in (const.ratt.q_proj, const.ratt.k_proj, const.ratt.v_proj):
            lin.weight.zero_()
            lin.bias.normal_(0, 1.0)
    got = latent_usage(const, _encoded(ds, const, 6), batch_size=4)
    assert got.gap == pytest.approx(0.0, abs=1e-5)
    assert got.nll > 0


def test_bad_input(latent_model):
    ds, model = latent_model
    no_latent = tiny_qwen2(model.tokenizer, hidden_size=32, num_latent=0, seed=3)
    with pytest.raises(ConfigError, match="num_latent=0"):
        latent_usage(no_latent, _encoded(ds, no_latent, 3))
    with pytest.raises(ConfigError, match=">= 2 samples"):
        latent_usage(model, _encoded(ds, model, 1))
    with pytest.raises(ConfigError, match="batch_size"):
        latent_usage(model, _encoded(ds, model, 3), batch_size=0)


def test_restores_training_mode(latent_model):
    ds, model = latent_model
    model.train()
    try:
        latent_usage(model, _encoded(ds, model, 3))
        assert model.training
    finally:
        model.eval()
