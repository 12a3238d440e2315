"""The cached fast path against plain full-sequence Hugging Face forwards, save/load, variants."""

from __future__ import annotations

import pytest
import torch
from backbones import softcapped_gemma2
from ratt_reference import reference_ratt

from latentr3_fast.data import train_tokenizer
from latentr3_fast.errors import ConfigError, LatentR3Error
from latentr3_fast.model import THOUGHT_TOKEN, LatentReasoner, tiny_qwen2


def _batch(tok, prompts: list[str], targets: list[str]):
    """Left-padded prompts, right-padded targets (+EOS), as the data layer collates them."""
    pad = tok.pad_token_id
    p_ids = [tok.encode(p) for p in prompts]
    t_ids = [tok.encode(t) + [tok.eos_token_id] for t in targets]
    lp, lt = max(map(len, p_ids)), max(map(len, t_ids))
    prompt = torch.tensor([[pad] * (lp - len(p)) + p for p in p_ids])
    pmask = torch.tensor([[0] * (lp - len(p)) + [1] * len(p) for p in p_ids])
    target = torch.tensor([t + [pad] * (lt - len(t)) for t in t_ids])
    tmask = torch.tensor([[1] * len(t) + [0] * (lt - len(t)) for t in t_ids])
    return prompt, pmask, target, tmask


PROMPTS = [
    "Below is an instruction. ### Response: \n",
    "The user has palyed",
    'the following musics before: "Abbey Road", "Kind of Blue"\n\n### Response: \n',
]
TARGETS = ['"Greatest Hits"\n', '"Abbey Road"\n', '"Kind"\n']


@torch.no_grad()
def reference_logprobs(model: LatentReasoner, prompt, pmask, target, tmask, n: int):
    """Row by row, no padding, no cache: N+1 plain full forwards through the HF CausalLM.

    r_{i+1} = RATT_ref(hidden_states[-1] of [x, r_1..r_i]); then one forward of
    [x, <thought>*N, y] with the thoughts' embeddings overwritten, full logits, log_softmax.
    """
    bb = model.backbone
    emb = bb.get_input_embeddings()
    out = torch.zeros(target.shape, dtype=torch.float32)
    for b in range(prompt.shape[0]):
        x = prompt[b][pmask[b].bool()]
        y = target[b][tmask[b].bool()]
        rs: list[torch.Tensor] = []
        for _ in range(n):
            e = torch.cat([emb(x[None])] + [r.view(1, 1, -1) for r in rs], 1)
            hs = bb(inputs_embeds=e, output_hidden_states=True).hidden_states[-1]
            if model.latent_mode == "ratt":
                rs.append(reference_ratt(model.ratt, hs, torch.ones(hs.shape[:2]))[0])
            else:
                rs.append(hs[0, -1])
        ids = torch.cat([x, torch.full((n,), model.thought_token_id), y])
        e = emb(ids[None]).clone()
        for i, r in enumerate(rs):
            e[0, len(x) + i] = r
        logits = bb(inputs_embeds=e).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        start = len(x) + n - 1  # position predicting y[0]
        pos = torch.arange(start, start + len(y))
        out[b, : len(y)] = lp[pos, y]
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("tie", [False, True])
def test_cached_path_matches_full_forward(tokenizer, n, tie):
    model = tiny_qwen2(tokenizer, num_latent=n, tie_word_embeddings=tie, seed=n)
    with torch.no_grad():  # non-trivial RATT so a wrong latent shows up in the log-probs
        for p in model.ratt.parameters():
            p.normal_(0, 0.3)
    model.eval()
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    assert len(set(pmask.sum(1).tolist())) == 3 and len(set(tmask.sum(1).tolist())) > 1
    with torch.no_grad():
        hidden, cache = model.encode_prompt(prompt, pmask)
        r = model.latents(hidden, pmask, cache)
        assert r.shape == (3, n, model.hidden_size) and r.dtype == torch.float32
        assert cache.get_seq_length() == prompt.shape[1]  # latents leave the prompt cache alone
        h = model.suffix_forward(cache, pmask, r, target)
        got = model.target_logprobs(h, target, tmask)
    want = reference_logprobs(model, prompt, pmask, target, tmask, n)
    assert torch.all(got[tmask == 0] == 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(prompt, pmask, target, tmask), got, atol=0, rtol=0)


def test_hidden_mode_matches_full_forward(tokenizer):
    model = tiny_qwen2(tokenizer, num_latent=2, latent_mode="hidden").eval()
    assert model.ratt is None
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        got = model(prompt, pmask, target, tmask)
    want = reference_logprobs(model, prompt, pmask, target, tmask, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_left_right_and_no_padding_agree(tokenizer):
    model = tiny_qwen2(tokenizer, num_latent=2).eval()
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        left = model(prompt, pmask, target, tmask)
        # right-pad the same prompts: the suffix then follows a hole, positions skip it
        order = torch.argsort(pmask, dim=1, stable=True, descending=True)
        right = model(prompt.gather(1, order), pmask.gather(1, order), target, tmask)
        single = torch.cat(
            [
                model(
                    prompt[b : b + 1][:, pmask[b].bool()],
                    pmask[b : b + 1][:, pmask[b].bool()],
                    target[b : b + 1],
                    tmask[b : b + 1],
                )
                for b in range(3)
            ]
        )
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, left, atol=1e-5, rtol=1e-5)


def test_gradients_match_full_forward(tokenizer):
    """d(sum logp)/d(params) of the cached path == that of one full forward (N=1)."""
    model = tiny_qwen2(tokenizer, num_latent=1, seed=3)
    with torch.no_grad():
        for p in model.ratt.parameters():
            p.normal_(0, 0.3)
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    model.zero_grad()
    model(prompt, pmask, target, tmask).sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # reference: prompt forward for r, then a full forward with r at the thought slot
    bb, emb = model.backbone, model.backbone.get_input_embeddings()
    pos = (pmask.cumsum(1) - 1).clamp_min(0)
    hs = bb(prompt, attention_mask=pmask, position_ids=pos, output_hidden_states=True)
    r = model.ratt(hs.hidden_states[-1], pmask)
    ids = torch.cat([prompt, torch.full((3, 1), model.thought_token_id), target], 1)
    e = torch.cat([emb(prompt), r[:, None].to(emb.weight.dtype), emb(target)], 1)
    mask = torch.cat([pmask, torch.ones(3, 1, dtype=torch.long), tmask], 1)
    logits = bb(
        inputs_embeds=e, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)
    ).logits
    lp = torch.log_softmax(logits.float(), -1)[:, prompt.shape[1] : -1]
    tgt = ids[:, prompt.shape[1] + 1 :]
    (lp.gather(-1, tgt[..., None])[..., 0] * tmask).sum().backward()
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    # the full forward also sends gradient to the thought token's embedding row (overwritten in
    # the fast path, so zero there); compare everything else
    assert set(fast) == set(ref)
    for k in fast:
        a, b = fast[k], ref[k]
        if "embed_tokens" in k:
            a, b = a.clone(), b.clone()
            a[model.thought_token_id] = b[model.thought_token_id] = 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def test_never_calls_lm_head(tokenizer):
    model = tiny_qwen2(tokenizer, num_latent=2)
    calls = []
    model.backbone.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    model(prompt, pmask, target, tmask).sum().backward()
    assert calls == []


def test_expand_cache_order(tokenizer):
    model = tiny_qwen2(tokenizer, num_latent=1).eval()
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        hidden, cache = model.encode_prompt(prompt, pmask)
        r = model.latents(hidden, pmask, cache)
        big = model.expand_cache(cache, 2)
        assert cache.layers[0].keys.shape[0] == 3 and big.layers[0].keys.shape[0] == 6
        rep = lambda t: t.repeat_interleave(2, 0)  # noqa: E731
        h = model.suffix_forward(big, rep(pmask), rep(r), rep(target))
        got = model.target_logprobs(h, rep(target), rep(tmask))
        want = model(prompt, pmask, target, tmask)
    torch.testing.assert_close(got, rep(want), atol=1e-6, rtol=1e-5)
    # N = 0 after expansion uses the expanded prompt-last hidden state
    m0 = tiny_qwen2(tokenizer, num_latent=0).eval()
    with torch.no_grad():
        hidden, cache = m0.encode_prompt(prompt, pmask)
        big = m0.expand_cache(cache, 3)
        h = m0.suffix_forward(
            big,
            pmask.repeat_interleave(3, 0),
            hidden.new_zeros(9, 0, 64),
            target.repeat_interleave(3, 0),
        )
        got = m0.target_logprobs(h, target.repeat_interleave(3, 0), tmask.repeat_interleave(3, 0))
        want = m0(prompt, pmask, target, tmask)
    torch.testing.assert_close(got, want.repeat_interleave(3, 0), atol=1e-6, rtol=1e-5)


def test_single_token_target_n0(tokenizer):
    model = tiny_qwen2(tokenizer, num_latent=0).eval()
    prompt, pmask, _, _ = _batch(tokenizer, PROMPTS, TARGETS)
    target = torch.tensor([[5], [7], [9]])
    with torch.no_grad():
        got = model(prompt, pmask, target, torch.ones_like(target))
        logits = model.backbone(
            prompt, attention_mask=pmask, position_ids=(pmask.cumsum(1) - 1).clamp_min(0)
        ).logits[:, -1]
    want = torch.log_softmax(logits, -1).gather(1, target)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tokenizer, tmp_path):
    model = tiny_qwen2(tokenizer, num_latent=2, seed=5).eval()
    with torch.no_grad():
        for p in model.ratt.parameters():
            p.normal_(0, 0.3)
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latent_ratt.safetensors").is_file()
    loaded = LatentReasoner.from_pretrained(tmp_path / "ckpt", device="cpu").eval()
    assert loaded.num_latent == 2 and loaded.latent_mode == "ratt"
    assert loaded.thought_token_id == model.thought_token_id
    assert loaded.tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN) == model.thought_token_id
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(prompt, pmask, target, tmask),
            model(prompt, pmask, target, tmask),
            atol=0,
            rtol=0,
        )
    # overriding the saved options
    other = LatentReasoner.from_pretrained(tmp_path / "ckpt", num_latent=1, latent_mode="hidden")
    assert other.num_latent == 1 and other.ratt is None


def test_save_load_keeps_tokenization(tmp_path):
    """The reloaded tokenizer encodes exactly as the trained one (digits included).

    Regression: AutoTokenizer picked Qwen2Tokenizer from config.json and split " 3" into
    " " + "3", so a saved model saw other tokens than it was trained on.
    """
    texts = [f'"The Quiet Tower Mystery Vol. {i}"\n' for i in range(1, 12)] * 20
    tok = train_tokenizer(texts + ["Below is an instruction 2024"], vocab_size=400)
    model = tiny_qwen2(tok, hidden_size=32, seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LatentReasoner.from_pretrained(tmp_path / "ckpt", device="cpu")
    probe = [*texts[:11], "Vol. 10 and 2024 and 3.5"]
    assert [loaded.tokenizer.encode(t) for t in probe] == [tok.encode(t) for t in probe]


def test_from_plain_hf_backbone_adds_thought_token(tokenizer, tmp_path):
    """A plain HF model dir (no thought token yet) gets the token and resized embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model = LatentReasoner.from_pretrained(tmp_path / "hf")
    assert model.thought_token_id == cfg.vocab_size == len(model.tokenizer) - 1
    assert model.backbone.get_input_embeddings().weight.shape[0] == cfg.vocab_size + 1
    assert model.lm_head_weight.shape[0] == cfg.vocab_size + 1
    assert model.dtype == torch.float32 and model.backbone.config._attn_implementation == "sdpa"
    assert model.num_latent == 1 and model.ratt is not None


def test_bad_options(tokenizer):
    with pytest.raises(ConfigError):
        tiny_qwen2(tokenizer, latent_mode="bogus")
    with pytest.raises(ConfigError):
        tiny_qwen2(tokenizer, num_latent=-1)
    model = tiny_qwen2(tokenizer)
    with pytest.raises(LatentR3Error):
        model.encode_prompt(torch.tensor([[1, 2]]), torch.tensor([[0, 0]]))
    hidden, cache = model.encode_prompt(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))
    with pytest.raises(LatentR3Error):
        model.forward_embeds(torch.zeros(1, 1, 64), torch.ones(1, 5), cache)


@pytest.mark.parametrize("n", [0, 2])
def test_gradient_checkpointing_same_gradients(tokenizer, n):
    model = tiny_qwen2(tokenizer, num_latent=n, seed=7).train()
    with torch.no_grad():
        for p in model.ratt.parameters():
            p.normal_(0, 0.3)
    prompt, pmask, target, tmask = _batch(tokenizer, PROMPTS, TARGETS)

    def grads():
        model.zero_grad()
        (model(prompt, pmask, target, tmask) * tmask).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    calls = []
    model.base_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    plain = grads()
    n_plain = len(calls)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    ckpt = grads()
    assert len(calls) - n_plain == 2 * n_plain  # every layer call was recomputed in backward
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert set(plain) == set(ckpt)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_recommend_takes_the_reasoner(tokenizer):
    """``latentr3_fast.decode.recommend(model, ...)`` is the one entry point: the model layer
    does not import decode (no ``reasoner.recommend`` method)."""
    from latentr3_fast.data import make_synthetic
    from latentr3_fast.decode import recommend

    ds = make_synthetic(num_items=30, num_users=20, seed=3)
    tok = train_tokenizer([t + "\n" for t in ds.items.titles] * 3, vocab_size=300)
    model = tiny_qwen2(tok, hidden_size=32, seed=2).eval()
    assert not hasattr(model, "recommend")
    histories = [list(s.history_titles) for s in ds.test[:2]]
    a = recommend(model, histories, k=3, catalog=ds, num_beams=4)
    b = recommend(model, histories, 3, catalog=ds, num_beams=4)
    assert a == b
    assert all(len(row) == 3 for row in a)


@torch.no_grad()
def test_latents_from_a_given_first_latent(tokenizer):
    """``latents(first=...)`` continues the chain from the given r_1 (GRPO's noisy first
    latent): checked against plain full forwards over [x, r_1, ...] with reference RATT."""
    model = tiny_qwen2(tokenizer, num_latent=3, seed=2).eval()
    with torch.no_grad():
        for p in model.ratt.parameters():  # a chain that depends on its input
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    prompt, pmask, _, _ = _batch(tokenizer, PROMPTS, TARGETS)
    hidden, cache = model.encode_prompt(prompt, pmask)
    first = torch.randn(len(PROMPTS), model.hidden_size, generator=torch.Generator().manual_seed(3))
    got = model.latents(hidden, pmask, cache, first=first)
    assert cache.get_seq_length() == prompt.shape[1]  # cropped back to the prompt
    emb = model.backbone.get_input_embeddings()
    for b in range(len(PROMPTS)):
        x = prompt[b][pmask[b].bool()]
        rs = [first[b]]
        for _ in range(2):
            e = torch.cat([emb(x[None])] + [r.view(1, 1, -1) for r in rs], 1)
            hs = model.backbone(inputs_embeds=e, output_hidden_states=True).hidden_states[-1]
            rs.append(reference_ratt(model.ratt, hs, torch.ones(hs.shape[:2]))[0])
        torch.testing.assert_close(got[b], torch.stack(rs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="first must be"):
        model.latents(hidden, pmask, cache, first=first[:, :-1])


def _scaled_backbone(tokenizer, kind: str):
    """Tiny Cohere (logits * logit_scale) or Granite (logits / logits_scaling) with sharp
    weights, so a missing scale changes the log-probs visibly."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    common = dict(
        vocab_size=len(tokenizer) + 1,  # room for the thought token
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    if kind == "cohere":
        bb = CohereForCausalLM(CohereConfig(logit_scale=2.5, **common))
    else:
        bb = GraniteForCausalLM(GraniteConfig(logits_scaling=0.4, **common))
    bb.config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return bb.eval()


@pytest.mark.parametrize("kind", ["cohere", "granite"])
@pytest.mark.parametrize("n", [1, 2])
def test_final_logit_scale_matches_the_models_own_logits(tokenizer, kind, n):
    """Cohere multiplies its logits by logit_scale, Granite divides by logits_scaling: the
    reasoner's fused log-probs must equal log_softmax of the model's own logits."""
    bb = _scaled_backbone(tokenizer, kind)
    model = LatentReasoner(bb, tokenizer, num_latent=n).eval()
    want_scale = 2.5 if kind == "cohere" else 1 / 0.4
    assert model.logit_scale == pytest.approx(want_scale)
    with torch.no_grad():
        for p in model.ratt.parameters():
            p.normal_(0, 0.3)
    batch = _batch(tokenizer, PROMPTS, TARGETS)
    ref = reference_logprobs(model, *batch, n=n)
    with torch.no_grad():
        got = model(*batch)
        model.logit_scale = 1.0  # what ignoring the scale would give
        unscaled = model(*batch)
    tmask = batch[3].bool()
    torch.testing.assert_close(got[tmask], ref[tmask], atol=2e-5, rtol=1e-5)
    assert (unscaled[tmask] - ref[tmask]).abs().max() > 1e-2


def test_softcapping_backbone_is_rejected(tokenizer):
    """Gemma 2's tanh soft-cap is not a linear map the fused head could fold in: a clear
    error at construction instead of silently wrong losses, rewards and beam scores."""
    bb = softcapped_gemma2(len(tokenizer) + 1)
    with pytest.raises(ConfigError, match="LatentReasoner: .*final_logit_softcapping=30.0"):
        LatentReasoner(bb, tokenizer)
    bb.config.final_logit_softcapping = None  # the same model without the cap is accepted
    assert LatentReasoner(bb, tokenizer).logit_scale == 1.0
