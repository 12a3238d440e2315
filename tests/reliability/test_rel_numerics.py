"""Numerical guards: non-finite loss / gradient / reward is caught BEFORE the optimizer step,
the step is skipped and counted, training stops with TrainingError after ``max_bad_steps`` in
a row; the fused log-prob stays finite in bf16 with |logits| ~ 1e4."""

from __future__ import annotations

import pytest
import torch
from reliability_helpers import count
from reliability_tiny import tiny_data, tiny_model

from latentr3_fast.errors import TrainingError
from latentr3_fast.ops import fused_linear_logprob_torch
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer
from latentr3_fast.train.optim import NonFiniteGuard
from latentr3_fast.train.rollout_rewards import RewardResult, RolloutPerplexityReward
from latentr3_fast.train.sft import SFTConfig, SFTTrainer


@pytest.fixture(scope="module")
def data():
    return tiny_data(seed=1, n_train=16)[:2]


def _model(data):
    return tiny_model(data[0])


class StepSpy:
    """Counts optimizer.step calls and snapshots parameters after each trainer step."""

    def __init__(self, trainer) -> None:
        self.calls = 0
        real = trainer.optimizer.step

        def step(*a, **k):
            self.calls += 1
            return real(*a, **k)

        trainer.optimizer.step = step


def _poison_logprobs(model, bad_steps: set[int], value: float, trainer_ref: list):
    """model.target_logprobs returns ``value`` everywhere during the given (1-based) steps."""
    real = model.target_logprobs

    def patched(*a, **k):
        out = real(*a, **k)
        if trainer_ref and trainer_ref[0].global_step + 1 in bad_steps:
            return out * 0 + value  # keeps the graph: backward sees non-finite values too
        return out

    model.target_logprobs = patched


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_sft_transient_nonfinite_loss_is_skipped_and_counted(data, value):
    _, train = data
    model = _model(data)
    ref: list = []
    _poison_logprobs(model, {2, 3}, value, ref)
    snaps: list[dict[str, torch.Tensor]] = []
    cfg = SFTConfig(
        output_dir=None,
        epochs=1,
        batch_size=4,
        grad_accum=1,
        lr=1e-3,
        warmup_steps=0,
        max_steps=4,
        max_bad_steps=3,
        progress=False,
        seed=0,
    )
    tr = SFTTrainer(
        model,
        cfg,
        train,
        callbacks=[
            lambda t, rec: snaps.append(
                {k: v.detach().clone() for k, v in model.named_parameters()}
                | {"_skipped": torch.tensor(rec["skipped"])}
            )
        ],
    )
    ref.append(tr)
    spy = StepSpy(tr)
    res = tr.train()
    count("faults:sft-nonfinite-loss", 2)
    assert res.global_step == 4
    assert [bool(s["_skipped"]) for s in snaps] == [False, True, True, False]
    assert spy.calls == 2  # the optimizer never saw the bad steps
    assert tr.guard.total == 2 and tr.guard.consecutive == 0
    for k in snaps[0]:
        if k != "_skipped":
            assert torch.equal(snaps[0][k], snaps[2][k]), k  # steps 2-3 changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for st in tr.optimizer.state.values():
        assert torch.isfinite(st["exp_avg"]).all() and torch.isfinite(st["exp_avg_sq"]).all()


def test_sft_nonfinite_gradient_with_finite_loss_is_skipped(data):
    _, train = data
    model = _model(data)
    w = model.ratt.parameters().__next__()
    handle = w.register_hook(lambda g: g * float("nan"))
    cfg = SFTConfig(
        output_dir=None,
        epochs=1,
        batch_size=4,
        grad_accum=1,
        lr=1e-3,
        warmup_steps=0,
        max_steps=2,
        max_bad_steps=3,
        progress=False,
    )
    tr = SFTTrainer(model, cfg, train)
    spy = StepSpy(tr)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    tr.train()
    handle.remove()
    count("faults:sft-nonfinite-grad", 2)
    assert spy.calls == 0 and tr.guard.total == 2
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k


def test_sft_persistent_nan_stops_after_max_bad_steps(data):
    _, train = data
    model = _model(data)
    ref: list = []
    _poison_logprobs(model, set(range(1, 100)), float("nan"), ref)
    cfg = SFTConfig(
        output_dir=None,
        epochs=3,
        batch_size=4,
        grad_accum=1,
        lr=1e-3,
        max_steps=10,
        max_bad_steps=3,
        progress=False,
    )
    tr = SFTTrainer(model, cfg, train)
    ref.append(tr)
    spy = StepSpy(tr)
    with pytest.raises(TrainingError, match=r"SFT\b.*\b3 consecutive .*max_bad_steps=3"):
        tr.train()
    count("faults:sft-nonfinite-loss", 3)
    assert tr.global_step == 2 and spy.calls == 0  # raised during the 3rd step, none applied


def test_nan_stop_message_names_the_step(data):
    """The SFT stop names the step (sft.py wraps the guard's error; NonFiniteGuard.ok also
    takes step= itself, see test_rel_recovery.py)."""
    _, train = data
    model = _model(data)
    ref: list = []
    _poison_logprobs(model, {2, 3}, float("nan"), ref)
    cfg = SFTConfig(
        output_dir=None,
        epochs=1,
        batch_size=4,
        grad_accum=1,
        max_steps=4,
        max_bad_steps=2,
        progress=False,
    )
    tr = SFTTrainer(model, cfg, train)
    ref.append(tr)
    with pytest.raises(TrainingError, match=r"step 3"):
        tr.train()


class FlakyReward:
    """The PPL reward, but NaN in one row of the rollouts listed in ``bad``."""

    name = "flaky"
    needs_target_logprobs = True
    uses_completions = False

    def __init__(self, bad: set[int], trainer_ref: list) -> None:
        self.inner = RolloutPerplexityReward()
        self.bad = bad
        self.ref = trainer_ref

    def __call__(self, rollout):
        r = self.inner(rollout).rewards.clone()
        if self.ref and self.ref[0].rollout_index in self.bad:
            r[1] = float("nan")
        return RewardResult(rewards=r)


def _grpo(data, bad, max_bad_steps=3, max_steps=4):
    model = _model(data)
    ref: list = []
    cfg = GRPOConfig(
        num_generations=4,
        sigma=1.0,
        prompts_per_step=4,
        micro_batch_prompts=4,
        lr=1e-3,
        warmup_steps=0,
        max_steps=max_steps,
        epochs=4.0,
        max_bad_steps=max_bad_steps,
        progress=False,
        seed=0,
    )
    tr = GRPOTrainer(model, cfg, data[1], reward=FlakyReward(bad, ref))
    ref.append(tr)
    return tr


def test_grpo_nan_reward_step_is_skipped(data):
    tr = _grpo(data, bad={1})
    spy = StepSpy(tr)
    snaps = []
    real = tr.train_rollout

    def rollout(*a, **k):
        out = real(*a, **k)
        snaps.append([p.detach().clone() for p in tr.params])
        return out

    tr.train_rollout = rollout
    hist = tr.train()
    count("faults:grpo-nan-reward")
    assert [m["skipped"] for m in hist] == [0.0, 1.0, 0.0, 0.0]
    assert spy.calls == 3 and tr.guard.total == 1
    assert all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1]))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))
    assert all(torch.isfinite(p).all() for p in tr.params)


def test_grpo_persistent_nan_reward_stops(data):
    tr = _grpo(data, bad=set(range(100)), max_bad_steps=2)
    spy = StepSpy(tr)
    with pytest.raises(TrainingError, match=r"GRPO: 2 consecutive"):
        tr.train()
    count("faults:grpo-nan-reward", 2)
    assert spy.calls == 0


def test_guard_unit_counts_and_resets():
    g = NonFiniteGuard(max_bad_steps=2, where="unit")
    assert g.ok(torch.tensor(1.0), 2.0)
    assert not g.ok(torch.tensor([1.0, float("nan")]))
    assert g.ok(0.5) and g.consecutive == 0 and g.total == 1
    assert not g.ok(float("inf"))
    with pytest.raises(TrainingError, match="unit: 2 consecutive"):
        g.ok(torch.tensor(float("-inf")))
    g2 = NonFiniteGuard(3)
    g2.load_state_dict(g.state_dict())
    assert g2.state_dict() == {"consecutive": 2, "total": 3}


# ------------------------------------------------------------------------ bf16 fused logprob
def _problem(m: int, v: int, d: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g)
    w = torch.randn(v, d, generator=g)
    # |logits| ~ scale: rows of h scaled so that max |h @ w.T| is about `scale`
    h = h * (scale / (h @ w.T).abs().amax(1, keepdim=True))
    t = torch.randint(0, v, (m,), generator=g)
    t[0] = int((h[0] @ w.T).argmax())  # a confident row: logp ~ 0
    t[-1] = -100
    return h.bfloat16(), w.bfloat16(), t


def _check_bf16(fn, h, w, t):
    hq = h.detach().clone().requires_grad_()
    got = fn(hq, w, t)
    ref = fused_linear_logprob_torch(h.double().float(), w.float(), t)  # fp32 on bf16 inputs
    logits_bf16 = (h @ w.T).float()  # torch doing it all in bf16 (the same-precision baseline)
    same = torch.log_softmax(logits_bf16, -1).gather(1, t.clamp_min(0)[:, None]).squeeze(1)
    same = torch.where(t == -100, 0.0, same)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got <= 0).all() and got[-1] == 0
    assert (ref.abs().max() > 1e3).item()  # the regime under test
    err = (got - ref).abs().max()
    assert err <= 2 * (same - ref).abs().max() + 1e-3, (err, (same - ref).abs().max())
    (grad,) = torch.autograd.grad(got.sum(), hq)
    assert torch.isfinite(grad.float()).all() and grad[-1].abs().sum() == 0


@pytest.mark.parametrize("scale", [1e4, 6e4])
def test_fused_logprob_torch_bf16_huge_logits(scale):
    count("faults:bf16-huge-logits")
    h, w, t = _problem(6, 517, 24, scale, seed=int(scale) % 97)
    _check_bf16(fused_linear_logprob_torch, h, w, t)
    _check_bf16(lambda a, b, c: fused_linear_logprob_torch(a, b, c, chunk_vocab=64), h, w, t)


@pytest.mark.kernel
def test_fused_logprob_triton_bf16_huge_logits():
    pytest.importorskip("triton")
    from latentr3_fast.kernels.linear_logprob import fused_linear_logprob_triton

    count("faults:bf16-huge-logits")
    h, w, t = _problem(5, 300, 32, 1e4, seed=7)
    _check_bf16(fused_linear_logprob_triton, h, w, t)
