"""Chunked torch path of fused_linear_logprob against a plain full-logits float64 reference."""

from __future__ import annotations

import pytest
import torch
from reference_ops import make_problem, plain_logprob, plain_logprob_same_precision

from latentr3_fast.errors import ConfigError, DataError
from latentr3_fast.ops import fused_linear_logprob, fused_linear_logprob_torch, select_backend

TOL32 = dict(atol=1e-5, rtol=1e-4)
SMALL_CHUNKS = dict(chunk_rows=5, chunk_vocab=257)  # exercise several M and V chunks


def _grads(out, inputs, seed=1):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad((out * go).sum(), inputs)


@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_fp32_matches_plain_with_grads(m, v):
    h, w, t, b = make_problem(m, v, 24, bias=True, seed=m + v)
    t[0] = -100 if m > 1 else t[0]
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    got = fused_linear_logprob_torch(h, w, t, b, temperature=0.7, **SMALL_CHUNKS)
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = plain_logprob(hd, wd, t, bd, temperature=0.7)
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got, ref.float(), **TOL32)
    for g, r in zip(_grads(got, (h, w, b)), _grads(ref, (hd, wd, bd))):
        torch.testing.assert_close(g, r.float(), **TOL32)


@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_frozen_head_eager_gradient(m, v):
    """Frozen head: dH comes from the Jacobian accumulated online in forward (no recompute)."""
    h, w, t, b = make_problem(m, v, 24, bias=True, seed=2 * m + v)
    if m > 1:
        t[-1] = -100
    h.requires_grad_()
    got = fused_linear_logprob_torch(h, w, t, b, temperature=1.7, **SMALL_CHUNKS)
    hd = h.detach().double().requires_grad_()
    ref = plain_logprob(hd, w, t, b, temperature=1.7)
    torch.testing.assert_close(got, ref.float(), **TOL32)
    (g,), (r,) = _grads(got, (h,)), _grads(ref, (hd,))
    torch.testing.assert_close(g, r.float(), **TOL32)
    if m > 1:
        assert torch.equal(g[-1], torch.zeros(24))


def test_ignored_rows_are_zero_and_get_no_gradient():
    h, w, t, _ = make_problem(9, 300, 16)
    t[[1, 4, 8]] = -1
    h.requires_grad_()
    out = fused_linear_logprob_torch(h, w, t, ignore_index=-1, **SMALL_CHUNKS)
    assert torch.equal(out[[1, 4, 8]], torch.zeros(3))
    assert (out[[0, 2, 3, 5, 6, 7]] < 0).all()
    (gh,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(gh[[1, 4, 8]], torch.zeros(3, 16))
    assert gh[0].abs().sum() > 0


def test_large_logits_do_not_overflow():
    h, w, t, _ = make_problem(7, 1000, 32, scale=1e4)
    t[2] = int((h[2] @ w.T).argmax())  # one row whose target is the max logit (logp ~ 0)
    got = fused_linear_logprob_torch(h, w, t, **SMALL_CHUNKS)
    ref = plain_logprob(h, w, t)
    assert torch.isfinite(got).all()
    assert ref.abs().max() > 1e3  # really in the large-logit regime
    torch.testing.assert_close(got, ref.float(), **TOL32)


def test_frozen_weight_gets_no_gradient():
    h, w, t, _ = make_problem(5, 500, 16)
    h.requires_grad_()
    out = fused_linear_logprob_torch(h, w, t, **SMALL_CHUNKS)
    out.sum().backward()
    assert w.grad is None and h.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_same_precision_rule(dtype):
    h, w, t, _ = make_problem(33, 1000, 64, dtype=dtype)
    h.requires_grad_()
    ref = plain_logprob(h.detach(), w, t)  # fp64 on the low-precision values
    got = fused_linear_logprob_torch(h, w, t, **SMALL_CHUNKS)
    same = plain_logprob_same_precision(h.detach(), w, t).double()
    assert (got.double() - ref).abs().max() <= 2 * (same - ref).abs().max() + 1e-6
    hd = h.detach().double().requires_grad_()
    (g_ref,) = _grads(plain_logprob(hd, w, t), (hd,))
    (g_got,) = _grads(got, (h,))
    hs = h.detach().clone().requires_grad_()
    (g_same,) = _grads(plain_logprob_same_precision(hs, w, t).float(), (hs,))
    err_got = (g_got.double() - g_ref).abs().max()
    assert err_got <= 2 * (g_same.double() - g_ref).abs().max() + 1e-6


def test_dispatcher_uses_torch_on_cpu_and_matches(monkeypatch):
    monkeypatch.delenv("LATENTR3_KERNELS", raising=False)
    h, w, t, _ = make_problem(7, 1000, 16)
    assert select_backend(h, w) == "torch"
    torch.testing.assert_close(fused_linear_logprob(h, w, t), plain_logprob(h, w, t).float())


def test_bad_inputs_raise_package_errors():
    h, w, t, _ = make_problem(4, 50, 8)
    with pytest.raises(DataError, match=r"targets\[2\] = 50"):
        fused_linear_logprob_torch(h, w, torch.tensor([0, 1, 50, 3]))
    with pytest.raises(ConfigError, match="weight"):
        fused_linear_logprob_torch(h, w[:, :5], t)
    with pytest.raises(ConfigError, match="temperature"):
        fused_linear_logprob_torch(h, w, t, temperature=0.0)
    with pytest.raises(ConfigError, match="targets"):
        fused_linear_logprob_torch(h, w, t[:3])


def test_empty_input():
    w = torch.randn(10, 4)
    out = fused_linear_logprob_torch(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
