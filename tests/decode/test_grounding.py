"""BIGRec grounding: title embeddings, nearest-title ranking, free greedy generation."""

from __future__ import annotations

import torch

from latentr3_fast.data import PromptBuilder, collate, make_synthetic, train_tokenizer
from latentr3_fast.decode.grounding import TitleIndex, embed_texts, greedy_generate
from latentr3_fast.model import tiny_qwen2


def _model(num_latent: int = 1):
    ds = make_synthetic(num_items=40, num_users=30, seed=1)
    tok = train_tokenizer([PromptBuilder.target_text(t) for t in ds.items.titles] * 3, 300)
    return ds, tiny_qwen2(tok, hidden_size=32, seed=4, num_latent=num_latent).eval()


def test_embed_texts_is_last_token_final_hidden_state():
    _, model = _model()
    texts = ["Silent Harbor Mystery", "Red Moon", "A"]
    got = embed_texts(model, texts, batch_size=2)  # padding inside a batch
    for i, t in enumerate(texts):
        ids = torch.tensor([model.tokenizer.encode(t, add_special_tokens=False)])
        ref = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(got[i], ref.float(), atol=1e-5, rtol=1e-4)


def test_catalogue_titles_ground_to_themselves():
    ds, model = _model()
    index = TitleIndex(model, ds.items.titles)
    ids, dist = index.rank(ds.items.titles[:10], k=3)
    for i in range(10):
        assert ds.items.titles[int(ids[i, 0])] == ds.items.titles[i]  # itself or a same-title item
        assert float(dist[i, 0]) < 1e-4
        assert torch.all(dist[i, 1:] >= dist[i, :-1])  # nearest first
    # brute force agrees
    q = embed_texts(model, ["Golden River"])
    brute = ((index.embeddings - q) ** 2).sum(-1).sqrt().argsort()[:3]
    assert index.rank(["Golden River"], k=3)[0][0].tolist() == brute.tolist()


def _hf_greedy(model, batch, max_new_tokens):
    """Reference: HF greedy ``generate`` per unpadded prompt, cut at EOS."""
    eos = model.tokenizer.eos_token_id
    out = []
    for i in range(len(batch)):
        keep = batch.prompt_mask[i].bool()
        ids = batch.prompt_ids[i][keep][None]
        ref = model.backbone.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=eos,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        out.append(ref[: ref.index(eos)] if eos in ref else ref)
    return out


def _no_latent_batch(rows=3):
    ds, model = _model(num_latent=0)
    pb = PromptBuilder(model.tokenizer, ds.category, num_latent=0, max_length=256)
    return model, collate(pb.encode_many(ds.test[:rows]), model.tokenizer.pad_token_id)


def test_greedy_generate_matches_hf_generate_without_latent():
    model, batch = _no_latent_batch()
    got = greedy_generate(model, batch.prompt_ids, batch.prompt_mask, max_new_tokens=6)
    assert got == _hf_greedy(model, batch, 6)


def test_greedy_generate_uses_the_lm_head_bias():
    """A biased LM head (HF ``generate`` adds the bias): the bias must steer the argmax."""
    model, batch = _no_latent_batch()
    unbiased = greedy_generate(model, batch.prompt_ids, batch.prompt_mask, max_new_tokens=6)
    head = model.backbone.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(
            torch.randn(head.out_features, generator=torch.Generator().manual_seed(0))
        )
    model.backbone.set_output_embeddings(biased)
    assert model.lm_head_bias is biased.bias
    got = greedy_generate(model, batch.prompt_ids, batch.prompt_mask, max_new_tokens=6)
    assert got == _hf_greedy(model, batch, 6)
    assert got != unbiased  # the bias changes the decoded text here


def test_evaluate_with_grounding_ranks_by_distance_to_generated_text():
    from latentr3_fast.decode.grounding import ground_batch
    from latentr3_fast.eval import evaluate

    ds, model = _model()
    res = evaluate(model, ds, "test", rank="ground", max_samples=5, batch_size=2, progress=False)
    assert res.metrics["rank"] == "ground" and res.metrics["n"] == 5
    assert res.metrics["HR@1"] <= res.metrics["HR@5"] <= res.metrics["HR@10"]
    # each row's list is the nearest-title ranking of its own generated text
    pb = PromptBuilder(model.tokenizer, ds.category, num_latent=1)
    index = TitleIndex(model, ds.items.titles)
    rows = {p["row"]: p for p in res.predictions}
    for i, s in enumerate(ds.test[:5]):
        ref = ground_batch(model, [pb.encode(s)], index, k=20)
        assert rows[i]["pred_item_ids"] == ref.item_ids[0]
