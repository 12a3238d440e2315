"""make_trl_reward: text rendering, numerics against an unpadded full-logits forward, and a
real ``trl.GRPOTrainer`` run on a tiny model (skipped when trl is absent)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from latentr3_fast.errors import DataError
from latentr3_fast.reward import PerplexityReward, make_trl_reward

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def reference_scores(model, tokenizer, prompt_texts, completions, targets, eos=False):
    """-PPL of tok(target) after tok(prompt) + tok(completion): one unpadded forward per row."""
    out = []
    for p, c, t in zip(prompt_texts, completions, targets):
        ids_p = tokenizer(p)["input_ids"]
        ids_c = tokenizer(c, add_special_tokens=False)["input_ids"] if c else []
        ids_t = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids_t = ids_t + [tokenizer.eos_token_id] if eos else ids_t
        ids = torch.tensor([ids_p + ids_c + ids_t])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        start = len(ids_p) + len(ids_c)
        tok_lp = lp[start - 1 : start - 1 + len(ids_t)].gather(1, torch.tensor(ids_t)[:, None])
        out.append(-math.exp(-float(tok_lp.mean())))
    return out


def test_plain_prompts_match_reference(qwen, tokenizer):
    prompts = ["Kind of Blue", "Kind of Blue", "Abbey Road and", "Kind of Blue", "B"]
    completions = ["is jazz", "", "then", "Blue Train is", "x y z"]
    targets = ["Greatest Hits", "Abbey Road", "Blue Train", "Kind", "Songs in the Key of Life"]
    f = make_trl_reward(qwen, tokenizer, answer_prefix=" ->", append_eos=True, max_rows=2)
    assert f.__name__ == "ppl_reward_target"
    got = f(prompts=prompts, completions=completions, target=targets, trainer_state=None)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    want = reference_scores(
        qwen, tokenizer, prompts, [c + " ->" for c in completions], targets, eos=True
    )
    assert got == pytest.approx(want, rel=1e-5)
    # the same rows with every prompt in its own chunk
    f1 = make_trl_reward(qwen, tokenizer, answer_prefix=" ->", append_eos=True, max_rows=1)
    assert f1(prompts, completions, target=targets) == pytest.approx(want, rel=1e-5)


def test_conversational_prompts(qwen, tokenizer):
    prompts = [
        [{"role": "system", "content": "Recommend"}, {"role": "user", "content": "Abbey Road"}],
        [{"role": "user", "content": "Kind of Blue"}],
    ]
    completions = [
        [{"role": "assistant", "content": "I think"}],
        [{"role": "assistant", "content": ""}],
    ]
    targets = ["Let It Be", "Blue Train"]
    comp_text = ["I think", ""]
    # no chat template: "role: content" lines then "assistant: "
    f = make_trl_reward(qwen, tokenizer, target_column="answer", name="ppl")
    assert f.__name__ == "ppl"
    plain = ["system: Recommend\nuser: Abbey Road\nassistant: ", "user: Kind of Blue\nassistant: "]
    want = reference_scores(qwen, tokenizer, plain, comp_text, targets)
    assert f(prompts, completions, answer=targets) == pytest.approx(want, rel=1e-5)
    # with a chat template
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    f = make_trl_reward(qwen, tok, target_column="answer")
    rendered = [
        "<system>Recommend\n<user>Abbey Road\n<assistant>",
        "<user>Kind of Blue\n<assistant>",
    ]
    want = reference_scores(qwen, tok, rendered, comp_text, targets)
    assert f(prompts, completions, answer=targets) == pytest.approx(want, rel=1e-5)


def test_errors_and_mode_restored(qwen, tokenizer):
    f = make_trl_reward(qwen, tokenizer)
    with pytest.raises(DataError, match="'target' missing"):
        f(["a"], ["b"], solution=["c"])
    with pytest.raises(DataError, match="2 prompts, 1 completions"):
        f(["a", "b"], ["c"], target=["d", "e"])
    qwen.train()
    try:
        f(["Kind"], ["of"], target=["Blue"])
        assert qwen.training  # eval only while scoring
    finally:
        qwen.eval()
    with pytest.raises(Exception, match="tokenizer"):
        PerplexityReward(qwen).score_texts(["a"], ["b"])


def test_inside_trl_grpo_trainer(tokenizer, tmp_path):
    """Two real GRPOTrainer steps; each reward call is checked against the reference."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["Kind of Blue then", "Abbey Road then", "Blue Train then", "Greatest"],
            "target": ["Blue Train", "Let It Be", "Kind of Blue", "Hits"],
        }
    )
    inner = make_trl_reward(model, tokenizer, answer_prefix="\n", append_eos=True)
    calls = []

    def recorded(prompts, completions, **kwargs):
        out = inner(prompts, completions, **kwargs)
        was = model.training
        model.eval()
        want = reference_scores(
            model, tokenizer, prompts, [c + "\n" for c in completions], kwargs["target"], eos=True
        )
        model.train(was)
        calls.append((list(prompts), out, want))
        return out

    recorded.__name__ = inner.__name__
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        learning_rate=1e-3,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=recorded,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(calls) >= 2
    for prompts, out, want in calls:
        assert len(out) == len(prompts) == 2 and prompts[0] == prompts[1]  # one group of G=2
        assert out == pytest.approx(want, rel=1e-5)
    logged = [
        h[f"rewards/{inner.__name__}/mean"]
        for h in trainer.state.log_history
        if f"rewards/{inner.__name__}/mean" in h
    ]
    assert len(logged) == 2 and all(math.isfinite(x) and x < -1.0 for x in logged)
