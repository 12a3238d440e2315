"""PerplexityReward against an independent per-row, unpadded, full-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch
from backbones import softcapped_gemma2
from reference_reward import plain_logprobs
from torch.utils._python_dispatch import TorchDispatchMode

import latentr3_fast.ops
from latentr3_fast.errors import ConfigError, DataError
from latentr3_fast.reward import PerplexityReward, grpo_advantage

ATOL = 1e-5
RTOL = 1e-5


def make_batch(prompt_lens, target_lens, g, vocab, d, n_extra=0, holes=False, seed=0):
    """Left-padded prompts [P, Lp], right-padded targets [P*G, T], extras [P*G, N, d]."""
    gen = torch.Generator().manual_seed(seed)
    p, lp = len(prompt_lens), max(prompt_lens)
    rows, t = p * g, max(target_lens)
    assert len(target_lens) == rows
    pi = torch.randint(0, vocab, (p, lp), generator=gen)
    pm = torch.zeros(p, lp, dtype=torch.long)
    for i, n in enumerate(prompt_lens):
        pm[i, lp - n :] = 1
    pi = pi * pm + 7 * (1 - pm)  # pad id 7 (any valid id)
    ti = torch.randint(0, vocab, (rows, t), generator=gen)
    tm = torch.zeros(rows, t, dtype=torch.long)
    for r, n in enumerate(target_lens):
        tm[r, :n] = 1
    ti = ti * tm
    ex = em = None
    if n_extra:
        ex = torch.randn(rows, n_extra, d, generator=gen) * 0.5
        em = torch.ones(rows, n_extra, dtype=torch.long)
        if holes:  # pads anywhere, including rows with no real extra token at all
            em[0, :] = 0
            em[1 % rows, 0] = 0
            em[2 % rows, -1] = 0
    return pi, pm, ti, tm, ex, em


def reference(model, pi, pm, ti, tm, ex=None, em=None, g=1, prompt_embeds=None):
    """Per row: strip all padding, one unpadded forward with full logits, log_softmax, gather."""
    emb = model.get_input_embeddings()
    rows, t = ti.shape
    logp = torch.zeros(rows, t)
    for r in range(rows):
        p = r // g
        keep = pm[p].bool()
        pe = emb(pi[p][keep]) if prompt_embeds is None else prompt_embeds[p][keep]
        parts = [pe]
        if ex is not None:
            parts.append(ex[r][em[r].bool()] if em is not None else ex[r])
        n_t = int(tm[r].sum())
        parts.append(emb(ti[r, :n_t]))
        x = torch.cat(parts)[None]
        logits = model(inputs_embeds=x).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        start = x.shape[1] - n_t
        logp[r, :n_t] = lp[start - 1 : start - 1 + n_t].gather(1, ti[r, :n_t, None])[:, 0]
    mean = (logp * tm).sum(1) / tm.sum(1)
    return -torch.exp(-mean), logp


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "g,n_extra,holes",
    [(1, 0, False), (3, 0, False), (3, 2, False), (2, 3, True), (1, 1, False)],
)
def test_matches_unpadded_full_logits(make_qwen2, attn, g, n_extra, holes):
    model = make_qwen2(attn=attn)
    prompt_lens = [5, 1, 9]  # very different lengths; one prompt is a single token
    target_lens = [4, 1, 3, 4, 2, 4, 1, 3, 2][: 3 * g]
    pi, pm, ti, tm, ex, em = make_batch(prompt_lens, target_lens, g, 300, 64, n_extra, holes)
    reward = PerplexityReward(model)
    with torch.no_grad():
        s, logp = reward(
            pi, pm, ti, tm, extra_embeds=ex, extra_mask=em, num_generations=g, return_logprobs=True
        )
        s_only = reward(pi, pm, ti, tm, extra_embeds=ex, extra_mask=em, num_generations=g)
        s_ref, logp_ref = reference(model, pi, pm, ti, tm, ex, em, g)
    assert s.shape == (3 * g,) and s.dtype == torch.float32
    torch.testing.assert_close(logp, logp_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=RTOL)
    torch.testing.assert_close(s_only, s_ref, atol=0, rtol=RTOL)
    assert (logp[tm == 0] == 0).all()


def test_single_token_prompts_no_cache(qwen):
    pi, pm, ti, tm, ex, em = make_batch([1, 1], [3, 2, 1, 3], 2, 300, 64, n_extra=1)
    with torch.no_grad():
        s = PerplexityReward(qwen)(pi, pm, ti, tm, extra_embeds=ex, num_generations=2)
        s_ref, _ = reference(qwen, pi, pm, ti, tm, ex, None, 2)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=RTOL)


def test_prompt_embeds_and_index_and_broadcast_targets(qwen):
    pi, pm, ti, tm, _, _ = make_batch([4, 6], [3, 2], 1, 300, 64)
    reward = PerplexityReward(qwen)
    with torch.no_grad():
        pe = qwen.get_input_embeddings()(pi)
        base = reward(pi, pm, ti, tm)
        torch.testing.assert_close(
            reward(prompt_embeds=pe, prompt_mask=pm, target_ids=ti, target_mask=tm),
            base,
            atol=0,
            rtol=RTOL,
        )
        # [P, T] targets are repeated to the G rows of each prompt
        rep = reward(pi, pm, ti, tm, num_generations=3)
        torch.testing.assert_close(rep, base.repeat_interleave(3), atol=0, rtol=RTOL)
        # arbitrary prompt_index (rows in any order, any multiplicity)
        idx = torch.tensor([1, 0, 1, 1])
        got = reward(pi, pm, ti[idx], tm[idx], prompt_index=idx)
        torch.testing.assert_close(got, base[idx], atol=0, rtol=RTOL)


def test_extra_ids_equal_extra_embeds(qwen):
    pi, pm, ti, tm, _, _ = make_batch([3, 5], [2, 3, 4, 1], 2, 300, 64)
    ids = torch.randint(0, 300, (4, 3))
    em = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    reward = PerplexityReward(qwen)
    with torch.no_grad():
        a = reward(pi, pm, ti, tm, extra_ids=ids, extra_mask=em, num_generations=2)
        b = reward(
            pi,
            pm,
            ti,
            tm,
            extra_embeds=qwen.get_input_embeddings()(ids),
            extra_mask=em,
            num_generations=2,
        )
        s_ref, _ = reference(qwen, pi, pm, ti, tm, qwen.get_input_embeddings()(ids), em, 2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, s_ref, atol=0, rtol=RTOL)


@pytest.mark.parametrize("kind", ["neg_ppl", "mean_logprob"])
def test_gradients_match_plain_autograd(make_qwen2, kind):
    model = make_qwen2(seed=1)
    g = 3
    pi, pm, ti, tm, ex, _ = make_batch([6, 2], [3, 4, 2, 1, 4, 3], g, 300, 64, n_extra=2)
    pe = model.get_input_embeddings()(pi).detach()
    weights = torch.randn(2 * g)

    ex1 = ex.clone().requires_grad_(True)
    pe1 = pe.clone().requires_grad_(True)
    s = PerplexityReward(model, reward=kind)(
        prompt_embeds=pe1,
        prompt_mask=pm,
        target_ids=ti,
        target_mask=tm,
        extra_embeds=ex1,
        num_generations=g,
    )
    (s * weights).sum().backward()

    ex2 = ex.clone().requires_grad_(True)
    pe2 = pe.clone().requires_grad_(True)
    s_ref, logp_ref = reference(model, pi, pm, ti, tm, ex2, None, g, prompt_embeds=pe2)
    if kind == "mean_logprob":
        s_ref = (logp_ref * tm).sum(1) / tm.sum(1)
    (s_ref * weights).sum().backward()

    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=RTOL)
    assert ex1.grad.abs().max() > 0
    # fp32 error relative to the gradient's scale (-PPL gradients reach ~1e3 here)
    for got, want in ((ex1.grad, ex2.grad), (pe1.grad, pe2.grad)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # padding positions of the prompt get no gradient
    assert (pe1.grad[1, :4] == 0).all()


def test_prompt_not_differentiated_by_default(qwen):
    """Frozen prompt: no autograd graph through the prefix unless asked for."""
    pi, pm, ti, tm, ex, _ = make_batch([5], [3, 2], 2, 300, 64, n_extra=1)
    ex = ex.requires_grad_(True)
    for p in qwen.parameters():
        p.requires_grad_(True)
    s = PerplexityReward(qwen)(pi, pm, ti, tm, extra_embeds=ex, num_generations=2)
    s.sum().backward()
    emb = qwen.get_input_embeddings().weight
    # only the last prompt token (fed in the suffix) and the target tokens that predict a
    # later target token get embedding gradient
    rows_with_grad = set(emb.grad.abs().sum(1).nonzero()[:, 0].tolist())
    expected = {int(pi[0, -1])} | set(ti[:, :-1][tm[:, 1:].bool()].tolist())
    assert rows_with_grad == expected
    qwen.zero_grad(set_to_none=True)
    s = PerplexityReward(qwen, grad_prompt=True)(pi, pm, ti, tm, extra_embeds=ex, num_generations=2)
    s.sum().backward()
    rows_with_grad = set(emb.grad.abs().sum(1).nonzero()[:, 0].tolist())
    assert set(pi[0].tolist()) <= rows_with_grad
    for p in qwen.parameters():
        p.requires_grad_(False)
        p.grad = None


class _LogitsDetector(TorchDispatchMode):
    """Records every op output of shape [..., V] holding at least `limit` elements."""

    def __init__(self, vocab, limit):
        super().__init__()
        self.vocab, self.limit, self.hits = vocab, limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            is_logits = isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] == self.vocab
            if is_logits and o.numel() >= self.limit:
                self.hits.append((str(func), tuple(o.shape)))
        return out


def test_no_rows_x_positions_x_vocab_tensor(make_qwen2, monkeypatch):
    vocab = 2048
    model = make_qwen2(vocab_size=vocab)
    # Small logits blocks in the torch path of the fused head (its default block is 16 MiB,
    # bigger than this whole tiny problem).
    monkeypatch.setattr(latentr3_fast.ops.logprob, "DEFAULT_CHUNK_ELEMENTS", 1 << 10)
    pi, pm, ti, tm, ex, _ = make_batch([7, 3], [5] * 8, 4, vocab, 64, n_extra=1)
    n_tokens = int(tm.sum())  # 40 target tokens
    called = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: called.append(1))
    try:
        with torch.no_grad(), _LogitsDetector(vocab, n_tokens * vocab) as det:
            PerplexityReward(model)(pi, pm, ti, tm, extra_embeds=ex, num_generations=4)
        assert det.hits == [] and called == []
        # the detector does catch the plain full-logits path
        with torch.no_grad(), _LogitsDetector(vocab, n_tokens * vocab) as det:
            plain_logprobs(model, pi, pm, ti, tm, extra_embeds=ex, num_generations=4)
        assert det.hits and called
    finally:
        hook.remove()


def test_other_architectures_and_logit_scale():
    """GPT-2 (learned positions, .transformer) and Cohere (logit_scale folded into T)."""
    from transformers import CohereConfig, CohereForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).eval()
    cohere = CohereForCausalLM(
        CohereConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            logit_scale=0.5,
            max_position_embeddings=64,
        )
    ).eval()
    for model in (gpt2, cohere):
        pi, pm, ti, tm, ex, _ = make_batch([4, 2], [3, 1, 2, 3], 2, 300, 32, n_extra=1)
        with torch.no_grad():
            s = PerplexityReward(model)(pi, pm, ti, tm, extra_embeds=ex, num_generations=2)
            s_ref, _ = reference(model, pi, pm, ti, tm, ex, None, 2)
        torch.testing.assert_close(s, s_ref, atol=0, rtol=RTOL)
    assert PerplexityReward(cohere, temperature=2.0).temperature == pytest.approx(4.0)


def test_softcapping_rejected():
    model = softcapped_gemma2(300)
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        PerplexityReward(model)


def test_bad_inputs(qwen):
    reward = PerplexityReward(qwen)
    pi, pm, ti, tm, _, _ = make_batch([3, 5], [2, 3], 1, 300, 64)
    right = pm.flip(1)
    with pytest.raises(DataError, match="LEFT-padded"):
        reward(pi, right, ti, tm)
    with pytest.raises(DataError, match="RIGHT-padded"):
        reward(pi, pm, ti, tm.flip(1))
    with pytest.raises(DataError, match="no target token"):
        reward(pi, pm, ti, torch.zeros_like(tm))
    with pytest.raises(ConfigError, match="target_ids has 4 rows"):
        reward(pi, pm, torch.cat([ti, ti]), torch.cat([tm, tm]), num_generations=3)
    with pytest.raises(ConfigError, match="exactly one"):
        reward(target_ids=ti)
    with pytest.raises(ConfigError, match="extra_embeds must be"):
        reward(pi, pm, ti, tm, extra_embeds=torch.zeros(3, 1, 64))
    with pytest.raises(DataError, match="prompt_index"):
        reward(pi, pm, ti, tm, prompt_index=torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="reward must be"):
        PerplexityReward(qwen, reward="ppl")
    with pytest.raises(ConfigError, match="output embeddings"):
        PerplexityReward(qwen.model)


def test_reward_holds_no_parameters_and_reexports(qwen):
    reward = PerplexityReward(qwen)
    assert list(reward.parameters()) == []
    assert grpo_advantage is latentr3_fast.ops.grpo_advantage
    s = torch.tensor([-3.0, -1.0, -5.0, -2.0])
    a = grpo_advantage(s, 2, mode="batch")
    m = (-3.0 + -5.0) / 2  # mean of the clean rows (k = 0)
    expected = (s - m) / ((s - m).norm() + 1e-6)
    torch.testing.assert_close(a, expected)


def test_bf16_error_within_twice_torch_bf16(make_qwen2):
    """FlashAttention's rule: vs an fp32 reference, the bf16 fused path errs at most ~2x the
    same computation done plainly by torch in bf16."""
    model = make_qwen2(seed=2)
    g = 2
    pi, pm, ti, tm, ex, _ = make_batch([6, 3], [3, 4, 2, 1], g, 300, 64, n_extra=1)
    with torch.no_grad():
        _, want = reference(model, pi, pm, ti, tm, ex, None, g)
        bf = copy.deepcopy(model).to(torch.bfloat16)
        exb = ex.to(torch.bfloat16)
        _, got = PerplexityReward(bf)(
            pi, pm, ti, tm, extra_embeds=exb, num_generations=g, return_logprobs=True
        )
        _, plain = reference(bf, pi, pm, ti, tm, exb, None, g)
    assert got.dtype == torch.float32
    err, plain_err = (got - want).abs().max(), (plain - want).abs().max()
    assert err <= 2 * plain_err + 1e-3, (err, plain_err)


def test_gradient_checkpointing_dropping_the_cache_is_caught(make_qwen2):
    model = make_qwen2()
    model.gradient_checkpointing_enable()
    model.train()
    pi, pm, ti, tm, ex, _ = make_batch([4, 2], [2, 3], 1, 300, 64, n_extra=1)
    reward = PerplexityReward(model)
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        with torch.no_grad():  # no backward to replay: HF keeps the cache, fine
            reward(pi, pm, ti, tm, extra_embeds=ex)
    else:  # 4.x checkpointing drops the cache in train mode even without grad: same error
        with torch.no_grad(), pytest.raises(ConfigError, match="gradient checkpointing"):
            reward(pi, pm, ti, tm, extra_embeds=ex)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        reward(pi, pm, ti, tm, extra_embeds=ex.requires_grad_(True))
