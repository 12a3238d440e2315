"""Triton fused_linear_logprob (interpreter on CPU) vs a plain full-logits float64 reference."""

from __future__ import annotations

import pytest
import torch
from reference_ops import make_problem, plain_logprob, plain_logprob_same_precision

TOL32 = dict(atol=1e-5, rtol=1e-4)


def _triton():
    from latentr3_fast.kernels.linear_logprob import fused_linear_logprob_triton

    return fused_linear_logprob_triton


def _go(n, device, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_fp32_values_and_grads(m, v, device):
    h, w, t, b = make_problem(m, v, 40, bias=(m == 7), seed=m * v, device=device)
    if m > 1:
        t[m // 2] = -100
    params = [x for x in (h, w, b) if x is not None]
    for x in params:
        x.requires_grad_()
    got = _triton()(h, w, t, b, temperature=1.0 if m == 33 else 0.6)
    ref_in = [x.detach().double().requires_grad_() for x in params]
    hd, wd, bd = ref_in[0], ref_in[1], (ref_in[2] if b is not None else None)
    ref = plain_logprob(hd, wd, t, bd, temperature=1.0 if m == 33 else 0.6)
    torch.testing.assert_close(got, ref.float(), **TOL32)
    go = _go(m, device)
    grads = torch.autograd.grad((got * go).sum(), params)
    refs = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r.float(), **TOL32)
    if m > 1:
        assert got[m // 2] == 0 and grads[0][m // 2].abs().sum() == 0


@pytest.mark.parametrize("splits", [3, 4])
def test_vocab_splits_and_k_loop(splits, device):
    """Several V splits (partials merged on the host) and a K loop with a ragged last block,
    as on the GPU, where the interpreter would otherwise use one split and one K block."""
    h, w, t, b = make_problem(19, 4099, 40, bias=True, seed=splits, device=device)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    got = _triton()(h, w, t, b, temperature=0.9, block_vocab=512, block_dim=16, splits=splits)
    ref_in = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = plain_logprob(*ref_in[:2], t, ref_in[2], temperature=0.9)
    torch.testing.assert_close(got, ref.float(), **TOL32)
    go = _go(19, device)
    grads = torch.autograd.grad((got * go).sum(), (h, w, b))
    refs = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r.float(), **TOL32)


def test_frozen_weight_only_dh(device):
    h, w, t, _ = make_problem(7, 1000, 32, device=device)
    h.requires_grad_()
    out = _triton()(h, w, t)
    out.sum().backward()
    assert w.grad is None
    hd = h.detach().double().requires_grad_()
    plain_logprob(hd, w, t).sum().backward()
    torch.testing.assert_close(h.grad, hd.grad.float(), **TOL32)


def test_large_logits(device):
    h, w, t, _ = make_problem(7, 1000, 32, scale=1e4, device=device)
    t[2] = int((h[2] @ w.T).argmax())
    got = _triton()(h, w, t)
    ref = plain_logprob(h, w, t)
    assert torch.isfinite(got).all() and ref.abs().max() > 1e3
    torch.testing.assert_close(got, ref.float(), **TOL32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_same_precision_rule(dtype, device):
    h, w, t, _ = make_problem(33, 1000, 64, dtype=dtype, device=device)
    h.requires_grad_()
    got = _triton()(h, w, t, temperature=0.8)
    ref = plain_logprob(h.detach(), w, t, temperature=0.8)
    same = plain_logprob_same_precision(h.detach(), w, t, temperature=0.8).double()
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 2 * (same - ref).abs().max() + 1e-6
    go = _go(33, device)
    (g_got,) = torch.autograd.grad((got * go).sum(), h)
    hd = h.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad((plain_logprob(hd, w, t, temperature=0.8) * go).sum(), hd)
    hs = h.detach().clone().requires_grad_()
    same_out = plain_logprob_same_precision(hs, w, t, temperature=0.8)
    (g_same,) = torch.autograd.grad((same_out * go.to(dtype)).sum(), hs)
    assert g_got.dtype == dtype
    err = (g_got.double() - g_ref).abs().max()
    assert err <= 2 * (g_same.double() - g_ref).abs().max() + 1e-6


def test_matches_torch_path_and_dispatch(monkeypatch, device):
    from latentr3_fast.ops import fused_linear_logprob, fused_linear_logprob_torch, select_backend

    monkeypatch.setenv("LATENTR3_KERNELS", "triton")
    h, w, t, _ = make_problem(9, 777, 24, device=device)
    assert select_backend(h, w) == "triton"
    torch.testing.assert_close(
        fused_linear_logprob(h, w, t), fused_linear_logprob_torch(h, w, t), **TOL32
    )


def test_non_contiguous_inputs(device):
    h, w, t, _ = make_problem(7, 1000, 32, device=device)
    hn = torch.stack([h, h], dim=2).reshape(7, 64)[:, ::2]  # stride 2 along d
    wn = w.T.contiguous().T  # column-major weight
    torch.testing.assert_close(_triton()(hn, wn, t), plain_logprob(h, w, t).float(), **TOL32)


def test_reward_from_hidden_through_triton(monkeypatch, device):
    from latentr3_fast.ops import perplexity_reward_from_hidden

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 16, generator=gen).to(device)
    weight = (torch.randn(300, 16, generator=gen) / 3).to(device)
    targets = torch.randint(0, 300, (4, 5), generator=gen).to(device)
    lengths = torch.tensor([5, 2, 1, 4], device=device)
    mask = torch.arange(5, device=device)[None] < lengths[:, None]
    monkeypatch.setenv("LATENTR3_KERNELS", "triton")
    got = perplexity_reward_from_hidden(hidden, weight, targets, mask)
    flat = plain_logprob(hidden.reshape(-1, 16), weight, targets.reshape(-1)).view(4, 5)
    expect = torch.stack([-torch.exp(-flat[i, : lengths[i]].mean()) for i in range(4)])
    torch.testing.assert_close(got, expect.float(), **TOL32)


@pytest.mark.parametrize("chunk_rows", [4, 16])
def test_backward_row_chunks_all_grads(chunk_rows, device):
    """The backward's [chunk, V] gradient buffer over several row chunks (a ragged last one),
    with the head and bias trainable (dW/db summed over chunks), against float64."""
    h, w, t, b = make_problem(19, 1031, 24, bias=True, seed=chunk_rows, device=device)
    t[5] = -100
    params = (h, w, b)
    for x in params:
        x.requires_grad_()
    got = _triton()(h, w, t, b, temperature=0.7, chunk_rows=chunk_rows)
    ref_in = [x.detach().double().requires_grad_() for x in params]
    ref = plain_logprob(*ref_in[:2], t, ref_in[2], temperature=0.7)
    go = _go(19, device, seed=chunk_rows)
    grads = torch.autograd.grad((got * go).sum(), params)
    refs = torch.autograd.grad((ref * go.double()).sum(), ref_in)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r.float(), **TOL32)
    assert grads[0][5].abs().sum() == 0


def test_backward_is_deterministic(device):
    """No atomics: two backward passes give bit-identical gradients (meaningful on a GPU)."""
    h, w, t, b = make_problem(21, 1500, 32, bias=True, seed=4, device=device)
    go = _go(21, device)

    def grads():
        xs = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        out = _triton()(xs[0], xs[1], t, xs[2], splits=3, block_vocab=256, chunk_rows=8)
        return torch.autograd.grad((out * go).sum(), xs)

    for a, c in zip(grads(), grads()):
        assert torch.equal(a, c)


def test_fp32_hidden_bf16_head_uses_head_dtype(device):
    """Mixed dtypes: hidden is converted to the head's dtype (like the chunked torch path)."""
    h, w, t, _ = make_problem(9, 700, 32, seed=8, device=device)
    wb = w.to(torch.bfloat16)
    hq = h.clone().requires_grad_()
    got = _triton()(hq, wb, t)
    ref = plain_logprob(h.to(torch.bfloat16), wb, t)
    same = plain_logprob_same_precision(h.to(torch.bfloat16), wb, t).double()
    assert (got.double() - ref).abs().max() <= 2 * (same - ref).abs().max() + 1e-6
    (g,) = torch.autograd.grad(got.sum(), hq)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_config_tables_and_dispatch_choice():
    """Configs: row buckets, one family per operand dtype, splits capped by the tile count."""
    from latentr3_fast.kernels import linear_logprob as ll
    from latentr3_fast.kernels import logprob_configs as lc

    assert [lc.row_bucket(r) for r in (1, 16, 17, 32, 33, 20000)] == [16, 16, 32, 32, 64, 64]
    assert lc.family(torch.float32) == "fp32" and lc.family(torch.bfloat16) == "16bit"
    assert lc.arch_class((9, 0)) == "sm90" and lc.arch_class((8, 0)) == "sm80"
    assert lc.arch_class((8, 9)) == "sm80"
    for (arch, fam), configs in lc.reachable_configs().items():
        for bucket in lc.ROW_BUCKETS:
            assert all(c.block_rows == bucket for c in lc.CONFIGS[arch][fam][bucket])
        for c in configs:  # powers of two, at least 16 (tl.dot's minimum)
            for size in c[:3]:
                assert size >= 16 and size & (size - 1) == 0
    plan = ll._Plan({}, 64, 128, False, "sm90", "16bit", 64, 132)
    assert ll._num_splits(2000, 151_936, plan, None) == max(1, 4 * 132 // 32)
    assert ll._num_splits(64, 1000, plan, None) == 8  # capped: 1000 / 128 -> 8 tiles


def test_return_lse(device):
    """The optional per-row log-sum-exp equals torch's, for ignored rows too, without grad."""
    h, w, t, b = make_problem(11, 1000, 24, bias=True, seed=6, device=device)
    t[3] = -100
    hq = h.clone().requires_grad_()
    logp, lse = _triton()(hq, w, t, b, temperature=0.8, splits=3, block_vocab=128, return_lse=True)
    logits = (h.double() @ w.double().T + b.double()) / 0.8
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1).float(), **TOL32)
    assert not lse.requires_grad and logp.requires_grad
    torch.testing.assert_close(logp, _triton()(h, w, t, b, temperature=0.8), **TOL32)
    (g,) = torch.autograd.grad(logp.sum(), hq)
    assert torch.isfinite(g).all() and g[3].abs().sum() == 0
    empty = _triton()(h[:0], w, t[:0], return_lse=True)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_kernels_do_not_import_ops():
    """Layering: the kernels sit below the ops (the ops import the kernels' checks)."""
    import ast
    from pathlib import Path

    kernels = Path(__file__).resolve().parents[2] / "kernels"
    for path in kernels.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "ops" not in mod.split("."), (path.name, mod)
            elif isinstance(node, ast.Import):
                assert not any(".ops" in a.name for a in node.names), path.name


def test_autotuner_lists_exactly_the_table(monkeypatch):
    """LATENTR3_AUTOTUNE=1 on a GPU: one autotuner per (kernel, arch, family, row bucket) whose
    configs are exactly the checked table entries (so every tuned choice passed the codegen
    test); keyed on V and d. Building it needs no GPU; running it does."""
    from latentr3_fast.kernels import linear_logprob as ll
    from latentr3_fast.kernels.logprob_configs import CONFIGS

    for arch, fam, bucket in [("sm80", "16bit", 64), ("sm90", "16bit", 16), ("sm90", "fp32", 32)]:
        tuner = ll._tuned("grad", arch, fam, bucket)
        assert ll._tuned("grad", arch, fam, bucket) is tuner  # built once
        got = [(c.kwargs["BLOCK_ROWS"], c.kwargs["BLOCK_VOCAB"], c.kwargs["BLOCK_DIM"], c.num_warps,
                c.num_stages) for c in tuner.configs]  # fmt: skip
        assert got == [tuple(c) for c in CONFIGS[arch][fam][bucket]]
        assert list(tuner.keys) == ["V", "D"]
    monkeypatch.setenv(ll.AUTOTUNE_ENV, "1")
    cpu = torch.device("cpu")
    assert not ll._plan(40, 64, torch.bfloat16, cpu, {}).autotuned  # never off a GPU
