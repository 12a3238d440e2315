"""SFT trainer: learning, early stopping, resume after a kill, accumulation, NaN guard."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.data import PromptBuilder, dataset_corpus, make_synthetic, train_tokenizer
from latentr3_fast.errors import ConfigError, TrainingError
from latentr3_fast.model import tiny_qwen2
from latentr3_fast.train.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint
from latentr3_fast.train.sft import SFTConfig, SFTTrainer, sft_loss


@pytest.fixture(scope="module")
def data():
    """(tokenizer-free pieces) a small synthetic catalogue, encoded with short prompts."""
    ds = make_synthetic(num_items=40, num_users=60, seed=0)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=400)
    pb = PromptBuilder(tok, ds.category, num_latent=1, max_length=96)
    return tok, pb.encode_many(ds.train), pb.encode_many(ds.valid)


def _model(data, seed=0, num_latent=1):
    tok = data[0]
    return tiny_qwen2(
        tok,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate=64,
        seed=seed,
        num_latent=num_latent,
    )


def _cfg(**kw):
    base = dict(
        output_dir=None,
        epochs=1,
        batch_size=8,
        grad_accum=1,
        lr=3e-3,
        warmup_steps=2,
        progress=False,
        max_train_samples=96,
        max_eval_samples=32,
        eval_batch_size=32,
    )
    base.update(kw)
    return SFTConfig(**base)


def test_one_epoch_lowers_validation_loss(data):
    _, train, valid = data
    model = _model(data)
    trainer = SFTTrainer(model, _cfg(epochs=1, lr=1e-2), train, valid)
    before = trainer.evaluate()
    res = trainer.train()
    after = trainer.evaluate()
    assert res.global_step == 12 and res.epochs_completed == 1
    assert after == pytest.approx(res.best_val_loss)
    assert after < 0.75 * before, (before, after)


def test_loss_is_token_mean_and_accumulation_invariant(data):
    """One step over 8 samples == one step over 2 micro-batches of 4 (token-weighted mean)."""
    _, train, valid = data
    m1, m2 = _model(data, seed=1), _model(data, seed=1)
    SFTTrainer(m1, _cfg(max_steps=1, batch_size=8, grad_accum=1, warmup_steps=0), train).train()
    SFTTrainer(m2, _cfg(max_steps=1, batch_size=4, grad_accum=2, warmup_steps=0), train).train()
    moved = 0.0
    ref = _model(data, seed=1).state_dict()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=k)
        moved += float((a - ref[k]).abs().sum())
    assert moved > 0
    # the loss itself: mean over all target tokens of -log p
    from latentr3_fast.data import collate

    batch = collate(train[:5], data[0].pad_token_id)
    loss, nll = sft_loss(m1, batch)
    with torch.no_grad():
        logp = m1(batch.prompt_ids, batch.prompt_mask, batch.target_ids, batch.target_mask)
    want = -(logp.sum() / batch.target_mask.sum())
    torch.testing.assert_close(loss.detach(), want)


def test_early_stopping_stops_and_keeps_best(data, tmp_path, monkeypatch):
    _, train, valid = data
    model = _model(data)
    cfg = _cfg(output_dir=str(tmp_path), epochs=3, eval_steps=2, patience=1)
    trainer = SFTTrainer(model, cfg, train, valid)
    scripted = iter([5.0, 4.0, 4.5, 1.0, 1.0])  # step 2, step 4 (best), step 6 (worse) -> stop
    snapshots = {}

    def fake_eval(data=None):
        snapshots[trainer.global_step] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(scripted)

    monkeypatch.setattr(trainer, "evaluate", fake_eval)
    res = trainer.train()
    assert res.stopped_early and res.global_step == 6
    assert res.best_val_loss == 4.0 and res.best_step == 4
    assert [h["val_loss"] for h in res.history] == [5.0, 4.0, 4.5]
    # best weights were saved at step 4 and reloaded at the end
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[4][k]), k
    assert (tmp_path / "best" / "latentr3_config.json").is_file()
    assert (tmp_path / "sft_log.jsonl").is_file()
    # a resumed, already-stopped run does nothing more
    again = SFTTrainer(
        _model(data, seed=9), SFTConfig(**{**cfg.__dict__, "resume": True}), train, valid
    )
    assert again.stopped_early and again.train().global_step == 6


def test_killed_run_resumes_to_same_parameters(data, tmp_path):
    _, train, valid = data
    common = dict(
        epochs=2,
        batch_size=8,
        grad_accum=2,
        save_steps=2,
        max_train_samples=40,
        keep_checkpoints=2,
        seed=3,
    )
    full = _model(data, seed=4)
    SFTTrainer(full, _cfg(output_dir=str(tmp_path / "a"), **common), train, valid).train()

    class Killed(Exception):
        pass

    def kill_at_5(trainer, rec):
        if trainer.global_step == 5:  # after the step-4 checkpoint, mid-epoch 2
            raise Killed

    first = _model(data, seed=4)
    out_b = str(tmp_path / "b")
    with pytest.raises(Killed):
        SFTTrainer(
            first, _cfg(output_dir=out_b, **common), train, valid, callbacks=[kill_at_5]
        ).train()
    assert latest_checkpoint(out_b).name == "step-00000004"
    resumed = _model(data, seed=77)  # different init: everything must come from the checkpoint
    tr = SFTTrainer(resumed, _cfg(output_dir=out_b, resume=True, **common), train, valid)
    assert tr.global_step == 4 and tr.epoch == 1 and tr.micro == 2
    res = tr.train()
    assert res.global_step == 6  # 2 epochs x ceil(ceil(40/8)/2)=3 steps
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=k)
    # rotation kept 2 complete checkpoints, no temp debris
    assert len(checkpoint_dirs(out_b)) == 2
    assert not [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    _, train, valid = data
    model = _model(data)

    def poison(trainer, rec):
        if trainer.global_step == 2:  # from step 3 on every loss is NaN (weights untouched)
            model.base_model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))

    cfg = _cfg(output_dir=str(tmp_path), save_steps=2, max_bad_steps=2)
    with pytest.raises(TrainingError, match="consecutive"):
        SFTTrainer(model, cfg, train, valid, callbacks=[poison]).train()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-00000002"
    fresh = _model(data, seed=5)
    load_checkpoint(ckpt, fresh)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    # the skipped step 3 did not touch the weights: they still equal the step-2 checkpoint
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("poison_valid", [True, False])
def test_non_finite_run_is_never_an_early_stop(data, tmp_path, poison_valid):
    """A run whose steps all turn non-finite must end with TrainingError (non-zero exit in
    the CLI), not through early stopping (patience 1 < max_bad_steps 4, validation every
    step). poison_valid: the validation loss is NaN too (outputs NaN) vs only the training
    loss (the weights never move, so validation never improves)."""
    _, train, valid = data
    model = _model(data)
    state = {}

    def poison(trainer, rec):
        if trainer.global_step == 1 and not state:
            if poison_valid:
                h = model.base_model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
            else:
                h = model.base_model.norm.register_forward_hook(
                    lambda m, i, o: o * float("nan") if m.training else o
                )
            state["hook"] = h

    cfg = _cfg(output_dir=str(tmp_path), eval_steps=1, patience=1, max_bad_steps=4, epochs=3)
    with pytest.raises(TrainingError, match="non-finite") as err:
        SFTTrainer(model, cfg, train, valid, callbacks=[poison]).train()
    assert "step" in str(err.value)


def test_one_skipped_step_does_not_delay_early_stopping(data):
    """Steps applied since the last validation count: a single non-finite step right before a
    validation must not postpone an early stop (patience 1, validation every 3 steps)."""
    _, train, valid = data

    def run(poison_step):
        model = _model(data)
        vals = iter([1.0, 2.0, 3.0, 4.0])  # never improves after the first validation
        hooks = []

        def cb(trainer, rec):
            if trainer.global_step == poison_step - 1:
                hooks.append(
                    model.base_model.norm.register_forward_hook(
                        lambda m, i, o: o * float("nan") if m.training else o
                    )
                )
            elif hooks:
                hooks.pop().remove()

        cfg = _cfg(eval_steps=3, patience=1, max_bad_steps=4, epochs=3)
        tr = SFTTrainer(model, cfg, train, valid, callbacks=[cb])
        tr.evaluate = lambda data=None: next(vals)
        res = tr.train()
        return res.stopped_early, res.global_step, tr.guard.total

    assert run(poison_step=-1) == (True, 6, 0)
    assert run(poison_step=6) == (True, 6, 1)


def test_gradient_checkpointing_option_same_step(data):
    _, train, _ = data
    m1, m2 = _model(data, seed=2, num_latent=2), _model(data, seed=2, num_latent=2)
    SFTTrainer(m1, _cfg(max_steps=2), train).train()
    SFTTrainer(m2, _cfg(max_steps=2, gradient_checkpointing=True), train).train()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_bad_config(data):
    _, train, valid = data
    model = _model(data)
    with pytest.raises(ConfigError, match="grad_accum"):
        SFTTrainer(model, _cfg(grad_accum=0), train)
    with pytest.raises(ConfigError, match="schedule"):
        SFTTrainer(model, _cfg(schedule="poly"), train)
    with pytest.raises(ConfigError, match="resume"):
        SFTTrainer(model, _cfg(resume=True), train)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="adamw_8bit"):
            SFTTrainer(model, _cfg(optim="adamw_8bit"), train)
        with pytest.raises(ConfigError, match="bf16"):
            SFTTrainer(model, _cfg(bf16=True), train)


def test_epoch_orders_are_seeded_and_differ(data):
    _, train, _ = data
    t1 = SFTTrainer(_model(data), _cfg(seed=11), train)
    t2 = SFTTrainer(_model(data), _cfg(seed=11), train)
    e0, e1 = t1.epoch_order(0), t1.epoch_order(1)
    assert e0 == t2.epoch_order(0) and e0 != e1
    assert sorted(i for b in e0 for i in b) == list(range(96))  # max_train_samples=96


def test_from_dataset_encodes_with_model_tokenizer():
    ds = make_synthetic(num_items=30, num_users=30, seed=1)
    tok = train_tokenizer(dataset_corpus(ds), vocab_size=300)
    model = tiny_qwen2(tok, hidden_size=32, num_heads=2, num_kv_heads=1, num_latent=2)
    cfg = _cfg(max_train_samples=7, max_eval_samples=3)
    tr = SFTTrainer.from_dataset(model, cfg, ds, max_length=64)
    pb = PromptBuilder(tok, ds.category, num_latent=2, max_length=64)
    assert tr.train_data == [pb.encode(s) for s in ds.train[:7]]
    assert tr.valid_data == [pb.encode(s) for s in ds.valid[:3]]
    assert all(len(e.prompt_ids) + 2 + len(e.target_ids) <= 64 for e in tr.train_data)
