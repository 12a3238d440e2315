"""GRPO validation: the values against an independent full-vocabulary computation, the kept
best step (step 0 included), early stopping, the reference's last step one flag away, and
resume with the best weights stored in the checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from grpo_helpers import load_bench_module, tiny_setup, varied_samples

from latentr3_fast.errors import ConfigError
from latentr3_fast.eval.latent_usage import latent_usage
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer, evenly_spaced

ref = load_bench_module("reference_grpo")


def _perturb_ratt(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ratt.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _cfg(**kw) -> GRPOConfig:
    base = dict(
        num_generations=3,
        prompts_per_step=2,
        micro_batch_prompts=2,
        lr=1e-2,
        warmup_steps=0,
        schedule="constant",
        epochs=100,
        progress=False,
        seed=3,
        eval_steps=1,
    )
    base.update(kw)
    return GRPOConfig(**base)


def _ratt(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.ratt.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ the values


def test_evenly_spaced_subset():
    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 5) == [0, 1, 2] and evenly_spaced(3, None) == [0, 1, 2]
    idx = evenly_spaced(1000, 7)
    gaps = [b - a for a, b in zip(idx, [*idx[1:], 1000])]  # incl. the gap to the end
    assert idx[0] == 0 and set(gaps) <= {142, 143}  # spread over the whole split


def test_validate_matches_full_vocabulary_reference():
    """Reward = mean over rows of -exp(mean token NLL), NLL = token-weighted: both against
    per-row full-sequence forwards with full-vocabulary log-softmax (bench/reference_grpo),
    on 7 prompts of different lengths in batches of 3 (padding, a short last batch)."""
    ds, tok, builder, model = tiny_setup(hidden=32)
    _perturb_ratt(model)
    samples = varied_samples(ds, builder, 12)
    valid = samples[5:12]
    tr = GRPOTrainer(model, _cfg(eval_batch_size=3, eval_samples=None), samples, valid_data=valid)
    got = tr.validate()
    rewards, nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for s in valid:
            prompt = torch.as_tensor(s.prompt_ids)
            target = torch.as_tensor(s.target_ids)
            r = ref._latents(model, prompt, 1)
            lp = ref._rows_logp(model, [prompt], [r], [target])[0].double()
            rewards.append(-math.exp(-float(lp.mean())))
            nll -= float(lp.sum())
            tokens += target.numel()
    assert got["rows"] == 7
    assert got["reward"] == pytest.approx(sum(rewards) / 7, rel=1e-5)
    assert got["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    # the same NLL as the swap test's own-latent NLL (another module, same definition)
    assert got["nll"] == pytest.approx(latent_usage(model, valid, batch_size=4).nll, rel=1e-5)


def test_bad_validation_config():
    for kw, match in [
        ({"eval_metric": "acc"}, "eval_metric"),
        ({"eval_steps": 0}, "eval_steps"),
        ({"eval_samples": 0}, "eval_samples"),
        ({"patience": 0}, "patience"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**kw).validate()


# ------------------------------------------------------------------ selection / stopping


class Scripted(GRPOTrainer):
    """validate() returns a scripted value per step and records the weights it saw."""

    script: dict[int, float] = {}

    def validate(self):
        self.seen = getattr(self, "seen", {})
        self.seen[self.global_step] = _ratt(self.model)
        v = self.script[self.global_step]
        return {"reward": v, "nll": -v, "rows": 1}


def _scripted(model, samples, script, **kw):
    tr = Scripted(model, _cfg(**kw), samples, valid_data=samples[:2])
    tr.script = script
    return tr


@pytest.fixture(scope="module")
def data():
    ds, tok, builder, _ = tiny_setup(hidden=32)
    return varied_samples(ds, builder, 8)


def _model():
    model = tiny_setup(hidden=32)[3]
    _perturb_ratt(model)
    return model


@pytest.mark.parametrize("metric", ["reward", "nll"])
def test_best_step_is_loaded_at_the_end(data, metric):
    model = _model()
    # Scripted reports nll = -value: with "nll" (lower is better) step 2 must win too
    script = {0: 1.0, 1: 2.0, 2: 5.0, 3: 3.0, 4: 4.0}
    tr = _scripted(model, data, script, max_steps=4, eval_metric=metric)
    tr.train()
    assert [h["step"] for h in tr.val_history] == [0, 1, 2, 3, 4]
    assert tr.best_step == 2 == tr.selected_step and tr.global_step == 4
    assert any(not torch.equal(tr.seen[2][k], tr.seen[4][k]) for k in tr.seen[2])  # it moved
    _assert_same(_ratt(model), tr.seen[2])


def test_step_zero_is_kept_when_grpo_only_worsens(data):
    model = _model()
    start = _ratt(model)
    tr = _scripted(model, data, {0: 0.0, 1: -1.0, 2: -2.0, 3: -0.5}, max_steps=3)
    tr.train()
    assert tr.best_step == 0 and tr.global_step == 3
    _assert_same(_ratt(model), start)


def test_last_step_one_flag_away(data):
    model = _model()
    script = {0: 9.0, 1: 1.0, 2: 2.0, 3: 3.0}
    tr = _scripted(model, data, script, max_steps=3, load_best_at_end=False)
    tr.train()
    assert tr.best_step == 0 and tr.selected_step == 3
    _assert_same(_ratt(model), tr.seen[3])


def test_early_stopping_after_patience(data):
    model = _model()
    script = {0: 1.0, 1: 3.0, 2: 2.0, 3: 2.5, 4: 9.0, 5: 9.0}
    tr = _scripted(model, data, script, max_steps=5, patience=2)
    tr.train()
    assert tr.stopped_early and tr.global_step == 3  # steps 2 and 3 did not beat step 1
    assert [h["step"] for h in tr.val_history] == [0, 1, 2, 3]
    _assert_same(_ratt(model), tr.seen[1])


def test_eval_steps_schedule_and_final_validation(data):
    model = _model()
    tr = _scripted(model, data, {k: float(k % 3) for k in range(10)}, max_steps=5, eval_steps=2)
    tr.train()
    assert [h["step"] for h in tr.val_history] == [0, 2, 4, 5]  # the last step always


def test_real_validation_does_not_perturb_training_and_selects_the_argmax(data):
    """With real validation: 'last' equals a run without validation bit for bit (validation
    draws no randomness); 'best' equals an independent run stopped at the best step
    (constant schedule, so a shorter run is a prefix of the longer one)."""
    kw = dict(max_steps=5, lr=3e-2)
    plain = _model()
    GRPOTrainer(plain, _cfg(**kw), data).train()
    last = _model()
    tr = GRPOTrainer(last, _cfg(load_best_at_end=False, **kw), data, valid_data=data[:5])
    tr.train()
    _assert_same(_ratt(last), _ratt(plain))
    curve = [h["val_reward"] for h in tr.val_history]
    assert len(curve) == 6 and tr.best_step == max(range(6), key=lambda i: curve[i])
    assert 0 < tr.best_step < 5  # this seed's best is inside the run (fp32, deterministic)

    best = _model()
    trb = GRPOTrainer(best, _cfg(**kw), data, valid_data=data[:5])
    trb.train()
    assert trb.best_step == tr.best_step
    prefix = _model()
    if tr.best_step > 0:
        GRPOTrainer(prefix, _cfg(max_steps=tr.best_step, lr=3e-2), data).train()
    _assert_same(_ratt(best), _ratt(prefix))


# ------------------------------------------------------------------ checkpoints / resume


def test_resume_keeps_the_best_weights_from_the_checkpoint(data, tmp_path):
    """Interrupted after step 3 (best = step 2, so the checkpoint must carry the step-2
    weights beside its own), resumed by a new trainer: same curve, same selected weights as
    an uninterrupted run."""
    script = {0: 1.0, 1: 2.0, 2: 5.0, 3: 3.0, 4: 4.0, 5: 0.0}
    full_model = _model()
    full = _scripted(full_model, data, script, max_steps=5)
    full.train()
    assert full.best_step == 2

    model = _model()
    tr = _scripted(model, data, script, max_steps=5, output_dir=str(tmp_path), save_steps=1)
    tr.train(num_steps=3)  # "crash" after step 3
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert (ckpt / "best_weights.safetensors").is_file()
    model2 = _model()
    tr2 = _scripted(model2, data, script, max_steps=5, output_dir=str(tmp_path), resume=True)
    assert tr2.global_step == 3 and tr2.best_step == 2
    tr2.train()
    assert [(h["step"], h["val_reward"]) for h in tr2.val_history] == [
        (h["step"], h["val_reward"]) for h in full.val_history
    ]
    _assert_same(_ratt(model2), _ratt(full_model))
    _assert_same(_ratt(model2), full.seen[2])
    summary = json.loads((tmp_path / "validation.json").read_text())
    assert summary["selected_step"] == 2 and summary["last_step"] == 5
    assert [c["step"] for c in summary["curve"]] == [0, 1, 2, 3, 4, 5]
    lines = [json.loads(x) for x in (tmp_path / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("event") == "validation"] == [0, 1, 2, 3, 4, 5]

    # a finished run resumed again does not train and still selects step 2
    model3 = _model()
    tr3 = _scripted(model3, data, script, max_steps=5, output_dir=str(tmp_path), resume=True)
    tr3.train()
    assert tr3.global_step == 5 and len(tr3.val_history) == 6
    _assert_same(_ratt(model3), full.seen[2])


def test_resume_with_another_metric_is_refused(data, tmp_path):
    tr = _scripted(_model(), data, {0: 1.0, 1: 2.0}, max_steps=1, output_dir=str(tmp_path))
    tr.train()
    with pytest.raises(ConfigError, match="eval_metric"):
        _scripted(
            _model(),
            data,
            {},
            max_steps=1,
            output_dir=str(tmp_path),
            resume=True,
            eval_metric="nll",
        )


def test_resume_without_checkpoint_logs_step_zero_once(data, tmp_path):
    """A run killed before its first checkpoint had logged the step-0 validation: the resumed
    run starts over and logs it once."""
    (tmp_path / "grpo_log.jsonl").write_text(
        json.dumps({"step": 0, "event": "validation", "val_reward": 7.0}) + "\n"
    )
    tr = _scripted(_model(), data, {0: 1.0, 1: 2.0}, max_steps=1, output_dir=str(tmp_path))
    tr.cfg.resume = True
    tr.train()
    lines = [json.loads(x) for x in (tmp_path / "grpo_log.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_reward"]) for r in lines if r.get("event") == "validation"]
    assert vals == [(0, 1.0), (1, 2.0)]


def _all_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class ScriptedAll(Scripted):
    def validate(self):
        self.seen_all = getattr(self, "seen_all", {})
        self.seen_all[self.global_step] = _all_params(self.model)
        return super().validate()


def test_trainable_all_best_weights_survive_resume(data, tmp_path):
    """With the whole model trainable the best copy is the whole model (backbone included),
    stored in the checkpoint and loaded at the end of a resumed run."""
    script = {0: 1.0, 1: 5.0, 2: 2.0, 3: 3.0}
    kw = dict(max_steps=3, trainable="all", lr=1e-3, output_dir=str(tmp_path), save_steps=1)
    tr = ScriptedAll(_model(), _cfg(**kw), data, valid_data=data[:2])
    tr.script = script
    tr.train(num_steps=2)  # "crash" after step 2; best = step 1
    assert (tmp_path / "checkpoints" / "step-00000002" / "best_weights.safetensors").is_file()
    model = _model()
    tr2 = ScriptedAll(model, _cfg(resume=True, **kw), data, valid_data=data[:2])
    tr2.script = script
    tr2.train()
    assert tr2.best_step == 1 and tr2.global_step == 3
    want = tr.seen_all[1]
    got = _all_params(model)
    backbone = [k for k in want if not k.startswith("ratt.")]
    assert backbone and any(not torch.equal(want[k], tr2.seen_all[3][k]) for k in backbone)
    _assert_same(got, want)


def test_cli_rejects_bad_grpo_validation_flags():
    from latentr3_fast.train.config import RunConfig

    for kw, flag in [
        ({"grpo_select": "first"}, "--grpo-select"),
        ({"grpo_eval_metric": "hr"}, "--grpo-eval-metric"),
        ({"grpo_eval_steps": 0}, "--grpo-eval-steps"),
        ({"grpo_eval_samples": 0}, "--grpo-eval-samples"),
        ({"grpo_patience": 0}, "--grpo-patience"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            RunConfig(**kw).validate()
