"""The package on a second, real architecture: a 2-layer slice of SmolLM2-135M (Llama-shaped,
GQA 9/3 heads, tied embeddings, 49,152-token vocabulary, EOS = pad = ``<|im_end|>``).

Every fast path is checked against its reference-style path on real tokenization.
"""

from __future__ import annotations

import math

import pytest
import torch
from bench_modules import load_bench_module

from latentr3_fast.data import EncodedSample, PromptBuilder, collate
from latentr3_fast.data.records import ItemCatalog, Sample
from latentr3_fast.decode import ItemTrie, beam_search, exact_rank
from latentr3_fast.reward import PerplexityReward
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer, step_noise
from latentr3_fast.train.sft import sft_loss

ref_sft = load_bench_module("reference_sft")
ref_grpo = load_bench_module("reference_grpo")
bench_decode = load_bench_module("bench_decode")

# real CD titles: duplicates ("Greatest Hits"), quotes, non-ASCII, digits, punctuation
TITLES = [
    "Greatest Hits",
    "Abbey Road",
    "Kind of Blue",
    "Greatest Hits",
    "Rumours",
    "The Dark Side of the Moon",
    'Live at "The Fillmore"',
    "Björk: Post",
    "1989",
    "Back in Black",
    "Greatest Hits Vol. 2",
    "Thriller (25th Anniversary Edition)",
    "Blue",
    "Blue Train",
    "Hotel California",
    "Nevermind",
    "OK Computer",
    "Ágætis byrjun",
    "The Essential Johnny Cash",
    "A Love Supreme",
]
SEG_A = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n### Instruction:\n"
    "Given a list of musics the user recetenly enjoy, please write a new musics that the user "
    "may bought\n"
)


def seg_b(history: list[str]) -> str:
    h = ", ".join(f'"{t}"' for t in history)
    return (
        "### User Input: \nThe user has palyed the following musicss before: "
        f"{h}\n\n### Response: \n"
    )


def samples(n: int) -> list[Sample]:
    """n samples with histories of 1..5 titles (prompts of different lengths)."""
    out = []
    for i in range(n):
        hist = [(3 * i + k) % len(TITLES) for k in range(1 + i % 5)]
        tgt = (7 * i + 5) % len(TITLES)
        out.append(Sample(tuple(hist), tuple(TITLES[j] for j in hist), tgt, TITLES[tgt]))
    return out


def test_backbone_is_the_real_llama(smol):
    m = smol()
    cfg = m.backbone.config
    assert type(m.backbone).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 9, 3)
    assert cfg.num_hidden_layers == 2
    # the thought token was added (49,152 -> 49,153) and the head is still tied to it
    tok = m.tokenizer
    assert m.thought_token_id == 49152 == len(tok) - 1
    emb, head = m.backbone.get_input_embeddings(), m.backbone.get_output_embeddings()
    assert emb.weight.shape[0] == len(tok)
    assert head.weight.data_ptr() == emb.weight.data_ptr()


def test_prompt_building_with_its_tokenizer(smol):
    m = smol()
    tok = m.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    pb = PromptBuilder(tok, "CDs_and_Vinyl", num_latent=1)
    s = samples(3)[2]
    enc = pb.encode(s)
    # independent expectation: segments written out from SPEC §2, encoded separately, no BOS
    want = tok.encode(SEG_A, add_special_tokens=False)
    want += tok.encode(seg_b(s.history_titles), add_special_tokens=False)
    assert enc.prompt_ids == want
    assert tok.bos_token_id not in enc.prompt_ids
    assert tok.decode(enc.prompt_ids) == SEG_A + seg_b(s.history_titles)
    t = f'"{s.target_title}"\n'
    assert enc.target_ids == tok.encode(t, add_special_tokens=False) + [2]
    assert tok.decode(enc.target_ids) == t + "<|im_end|>"
    ids, labels = pb.full_ids(s)
    assert ids == want + [m.thought_token_id] + enc.target_ids
    assert labels == [-100] * (len(want) + 1) + enc.target_ids


def test_trie_from_real_tokenization(smol):
    m = smol()
    pb = PromptBuilder(m.tokenizer, "CDs_and_Vinyl")
    cat = ItemCatalog(TITLES)
    trie = ItemTrie.from_catalog(cat, pb)
    seqs = {t: pb.target_ids(t) for t in cat.unique_titles}
    assert trie.num_items == len(TITLES)
    ref = bench_decode.DictTrie(seqs.values())
    for title, seq in seqs.items():
        state = trie.root()
        for k, tokn in enumerate(seq):  # every prefix allows exactly the dict trie's children
            allowed = set(trie.allowed([state])[1].tolist())
            assert allowed == set(ref.allowed(seq[:k], -1)), (title, k)
            state = int(trie.advance([state], [tokn])[0])
        assert bool(trie.is_terminal([state])[0])
        assert sorted(trie.items(state).tolist()) == cat.ids(title)
        assert trie.walk(seq) == state
    assert sorted(trie.items(trie.walk(seqs["Greatest Hits"])).tolist()) == [0, 3]
    # "Blue" and "Blue Train" share a prefix but end at different nodes
    assert trie.walk(seqs["Blue"]) != trie.walk(seqs["Blue Train"])
    assert trie.max_depth == max(len(s) for s in seqs.values())


@pytest.mark.parametrize("num_latent", [0, 1])
def test_sft_step_matches_reference_step(smol, num_latent):
    m = smol(num_latent=num_latent)
    pb = PromptBuilder(m.tokenizer, "CDs_and_Vinyl", num_latent=num_latent)
    batch = collate(pb.encode_many(samples(4)), m.tokenizer.pad_token_id)
    assert len(set(batch.prompt_mask.sum(1).tolist())) > 1  # left padding exercised
    losses, grads = [], []
    for fn in (lambda mm, b: sft_loss(mm, b)[0], ref_sft.reference_sft_loss):
        m.zero_grad(set_to_none=True)
        loss = fn(m, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert math.isfinite(float(losses[1])) and float(losses[1]) > 0.5  # a real LM loss
    torch.testing.assert_close(losses[0], losses[1], atol=2e-5, rtol=0)
    assert set(grads[0]) == set(grads[1])
    if num_latent:
        assert any(k.startswith("ratt.") for k in grads[0])
    for k in grads[0]:
        g_ref = grads[1][k]
        tol = 1e-4 * float(g_ref.abs().max()) + 1e-7
        torch.testing.assert_close(grads[0][k], g_ref, atol=tol, rtol=1e-3, msg=k)


def test_grpo_step_matches_reference_step(smol):
    m = smol(num_latent=1, seed=1)
    pb = PromptBuilder(m.tokenizer, "CDs_and_Vinyl", num_latent=1)
    data = pb.encode_many(samples(4))
    cfg = GRPOConfig(
        num_generations=3,
        prompts_per_step=3,
        micro_batch_prompts=2,  # micro-batches of 2 and 1 prompts
        sigma=1.0,
        progress=False,
        seed=2,
    )
    trainer = GRPOTrainer(m, cfg, data)
    out = trainer.compute_gradients(rollout_index=0)
    ours = {n: p.grad.detach().clone() for n, p in m.ratt.named_parameters()}
    idx = trainer.step_sample_indices(0)
    assert len({len(data[i].prompt_ids) for i in idx}) > 1
    noise = step_noise(cfg.seed, 0, cfg.prompts_per_step, cfg.num_generations, m.hidden_size)
    res = ref_grpo.reference_grpo_step(
        m,
        [data[i].prompt_ids for i in idx],
        [data[i].target_ids for i in idx],
        noise,
        sigma=cfg.sigma,
        advantage=cfg.advantage,
        include_clean=cfg.include_clean_in_loss,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
    )
    ours_logp = [row for part in out["logp"] for row in part]
    for a, b in zip(ours_logp, res.logp, strict=True):
        torch.testing.assert_close(a[: b.shape[0]], b, atol=5e-5, rtol=0)
        assert (a[b.shape[0] :] == 0).all()
    torch.testing.assert_close(out["rewards"], res.rewards, atol=1e-4, rtol=1e-5)
    assert float(out["rewards"].std()) > 0  # the noisy latents change the reward
    torch.testing.assert_close(out["advantages"], res.advantages, atol=1e-4, rtol=1e-4)
    assert abs(out["loss"] - res.loss) < 1e-4 * max(1.0, abs(res.loss))
    for name, g_ref in res.grads.items():
        assert g_ref.abs().max() > 0, name
        tol = 1e-3 * float(g_ref.abs().max())
        torch.testing.assert_close(ours[name], g_ref, atol=tol, rtol=1e-3, msg=name)


def _catalogue(m):
    pb = PromptBuilder(m.tokenizer, "CDs_and_Vinyl", num_latent=m.num_latent)
    cat = ItemCatalog(TITLES)
    trie = ItemTrie.from_catalog(cat, pb)
    return pb, cat, trie


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_beam_search_matches_hf_generate(smol, lp):
    m = smol(num_latent=1).eval()
    pb, cat, trie = _catalogue(m)
    batch = collate(pb.encode_many(samples(3)), m.tokenizer.pad_token_id)
    dict_trie = bench_decode.DictTrie(pb.target_ids(t) for t in cat.unique_titles)
    eos = m.tokenizer.eos_token_id
    ref = bench_decode.hf_reference(m, batch, dict_trie, eos, 5, lp, trie.max_depth)
    with torch.no_grad():
        ours = beam_search(m, batch.prompt_ids, batch.prompt_mask, trie, 5, length_penalty=lp)
    seqs = ours.sequences(trie)
    for b, hyps in enumerate(ref):
        assert len(hyps) == 5
        assert [h[0] for h in hyps] == seqs[b][:5]
        want = torch.tensor([h[1] for h in hyps])
        torch.testing.assert_close(ours.scores[b, :5], want, atol=1e-4, rtol=1e-5)


def _teacher_forced_logp(m, prompt_ids, seqs):
    """Independent: per title, one unpadded forward over [prompt, r, title] with full logits;
    returns (sum of log-probs, length) per title."""
    p = torch.tensor([prompt_ids])
    with torch.no_grad():
        hidden, cache = m.encode_prompt(p, torch.ones_like(p))
        r = m.latents(hidden, torch.ones_like(p), cache)
        emb = m.backbone.get_input_embeddings()
        out = []
        for seq in seqs:
            t = torch.tensor([seq])
            x = torch.cat([emb(p), r.to(emb.weight.dtype), emb(t)], 1)
            logp = torch.log_softmax(m.backbone(inputs_embeds=x).logits[0].float(), -1)
            start = p.shape[1] + r.shape[1]
            out.append(
                (
                    float(logp[start - 1 : start - 1 + len(seq)].gather(1, t[0, :, None]).sum()),
                    len(seq),
                )
            )
    return out


def test_exact_ranking_matches_teacher_forcing(smol):
    m = smol(num_latent=1).eval()
    pb, cat, trie = _catalogue(m)
    enc = pb.encode_many(samples(2))
    batch = collate(enc, m.tokenizer.pad_token_id)
    titles = cat.unique_titles
    for b in range(2):
        tf = _teacher_forced_logp(m, enc[b].prompt_ids, [pb.target_ids(t) for t in titles])
        for lp in (0.0, 1.0):  # BIGRec and D3 scoring
            with torch.no_grad():
                ex = exact_rank(
                    m, batch.prompt_ids[b : b + 1], batch.prompt_mask[b : b + 1], trie, lp
                )
            want = [s / n**lp for s, n in tf]
            got = {ex.titles[0][j]: float(ex.scores[0, j]) for j in range(len(titles))}
            assert set(got) == set(titles)
            for t, w in zip(titles, want):
                assert math.isclose(got[t], w, rel_tol=1e-5, abs_tol=1e-4), (t, lp)
            order = sorted(titles, key=lambda t: -want[titles.index(t)])
            assert ex.titles[0][:3] == order[:3]


def test_reward_module_matches_full_logits(smol):
    m = smol(num_latent=0)
    pb = PromptBuilder(m.tokenizer, "CDs_and_Vinyl", num_latent=0)
    enc = pb.encode_many(samples(3))
    g = 2
    batch = collate(enc, m.tokenizer.pad_token_id)
    rows = [
        EncodedSample(e.prompt_ids, pb.target_ids(TITLES[(i * 5) % 20]))
        for i, e in enumerate(x for x in enc for _ in range(g))
    ]
    tb = collate(rows, m.tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    extra = torch.randn(len(rows), 1, m.hidden_size, generator=gen) * 0.05
    reward = PerplexityReward(m.backbone)
    with torch.no_grad():
        s, logp = reward(
            batch.prompt_ids,
            batch.prompt_mask,
            tb.target_ids,
            tb.target_mask,
            extra_embeds=extra,
            num_generations=g,
            return_logprobs=True,
        )
        emb = m.backbone.get_input_embeddings()
        for r, row in enumerate(rows):
            t = torch.tensor(row.target_ids)
            x = torch.cat([emb(torch.tensor(row.prompt_ids)), extra[r], emb(t)])[None]
            lp = torch.log_softmax(m.backbone(inputs_embeds=x).logits[0].float(), -1)
            start = x.shape[1] - len(t)
            want = lp[start - 1 : start - 1 + len(t)].gather(1, t[:, None])[:, 0]
            torch.testing.assert_close(logp[r, : len(t)], want, atol=5e-5, rtol=0)
            assert math.isclose(float(s[r]), -math.exp(-float(want.mean())), rel_tol=1e-5)
