"""evaluate_scorings: RecBole tokens in the prediction records, exclude_seen, and the
progress-bar label naming the model (issue 16)."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.data import (
    ItemCatalog,
    PromptBuilder,
    dataset_corpus,
    make_synthetic,
    train_tokenizer,
)
from latentr3_fast.eval import evaluate_scorings
from latentr3_fast.model import tiny_qwen2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ds = make_synthetic(num_items=30, num_users=40, seed=0, max_len=8)
    ds.items = ItemCatalog(ds.items.titles, tokens=[f"tok{i}" for i in range(len(ds.items))])
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=300)
    model = tiny_qwen2(tok, hidden_size=32, seed=0).eval()
    return ds, model, PromptBuilder(tok, ds.category, max_length=100)


def test_tokens_exclude_seen_and_label(setup, capsys):
    ds, model, pb = setup
    kw = dict(num_beams=10, max_samples=12, batch_size=4, prompt_builder=pb)
    (full,) = evaluate_scorings(model, ds, [0.0], **kw, desc="SFT only")
    assert "eval SFT only test (beam)" in capsys.readouterr().err
    (drop,) = evaluate_scorings(model, ds, [0.0], **kw, exclude_seen=True, progress=False)
    changed = 0
    for f, d, s in zip(full.predictions, drop.predictions, ds.test):
        assert f["target_token"] == f"tok{s.target_id}"
        assert f["pred_item_tokens"] == [[f"tok{i}" for i in ids] for ids in f["pred_item_ids"]]
        keep = [k for k, t in enumerate(f["pred_titles"]) if t not in set(s.history_titles)]
        assert d["pred_titles"] == [f["pred_titles"][k] for k in keep]
        assert d["scores"] == [f["scores"][k] for k in keep]
        hit = s.target_title in d["pred_titles"]
        assert d["rank"] == (d["pred_titles"].index(s.target_title) if hit else None)
        changed += len(keep) < len(f["pred_titles"])
    assert changed  # some rows had a seen title among the beams
