"""Triton gaussian_expand: in-kernel Philox noise, explicit noise, gradients, out buffer."""

from __future__ import annotations

import pytest
import torch


def _triton():
    from latentr3_fast.kernels.gaussian_expand import gaussian_expand_triton

    return gaussian_expand_triton


def test_seed_determinism_and_distinct_seeds(device):
    r = torch.randn(3, 2, 50, device=device)
    a, na = _triton()(r, 4, 1.5, seed=11)
    b, nb = _triton()(r, 4, 1.5, seed=11)
    c, nc = _triton()(r, 4, 1.5, seed=12)
    assert torch.equal(a, b) and torch.equal(na, nb)
    assert not torch.equal(na, nc) and not torch.equal(a, c)
    assert na.shape == (3, 3, 50) and na.dtype == torch.float32


def test_noise_statistics_and_layout(device):
    sigma = 1.5
    r = torch.randn(8, 2, 300, device=device)
    out, noise = _triton()(r, 9, sigma, seed=3)  # 8*8*300 = 19200 draws
    grid = out.view(8, 9, 2, 300)
    assert torch.equal(grid[:, 0], r)  # clean rows
    assert torch.equal(grid[:, 1:, 1], r[:, None, 1].expand(8, 8, 300))  # later steps copied
    eps = (grid[:, 1:, 0] - r[:, None, 0]) / sigma
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=1e-5)
    assert abs(noise.mean().item()) < 0.03  # 4 sigma of the mean estimate is 0.029
    assert abs((grid[:, 1:, 0] - r[:, None, 0]).std().item() - sigma) < 0.03
    # rows of different prompts/generations get different noise
    assert not torch.equal(noise[0, 0], noise[0, 1]) and not torch.equal(noise[0, 0], noise[1, 0])


def test_explicit_noise_matches_torch_path(device):
    from latentr3_fast.ops import gaussian_expand_torch

    r = torch.randn(2, 3, 33, device=device)
    noise = torch.randn(2, 4, 33, device=device)
    got, used = _triton()(r, 5, 0.7, noise=noise)
    ref, _ = gaussian_expand_torch(r, 5, 0.7, noise=noise)
    assert torch.equal(used, noise)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_group_sum(dtype, device):
    r = torch.randn(3, 2, 20, device=device, dtype=dtype, requires_grad=True)
    out, noise = _triton()(r, 4, 1.0, seed=0)
    assert out.dtype == dtype
    wgt = torch.randn(out.shape, device=device, dtype=dtype)
    (out * wgt).float().sum().backward()
    torch.testing.assert_close(r.grad.float(), wgt.view(3, 4, 2, 20).float().sum(1),
                               atol=1e-2, rtol=1e-2)  # fmt: skip
    # the value side: r + sigma * noise rounded once to the output dtype
    expect = (r.detach()[:, None, 0].float() + noise).to(dtype)
    got = out.detach().view(3, 4, 2, 20)[:, 1:, 0]
    if device == "cuda":
        assert torch.equal(got, expect)
    else:  # the interpreter's fp32 -> bf16 cast is not round-to-nearest: allow one ulp
        torch.testing.assert_close(got.float(), expect.float(), rtol=2**-7, atol=1e-6)


def test_writes_into_suffix_buffer_with_gradient(device):
    r = torch.randn(2, 2, 16, device=device, requires_grad=True)
    buf = torch.full((6, 5, 16), 3.0, device=device)
    res, noise = _triton()(r, 3, 1.0, seed=4, out=buf[:, 0:2])
    plain, _ = _triton()(r.detach(), 3, 1.0, noise=noise)
    assert torch.equal(buf[:, 0:2], plain) and (buf[:, 2:] == 3).all()
    wgt = torch.randn_like(buf)
    (buf * wgt).sum().backward()
    torch.testing.assert_close(r.grad, wgt[:, 0:2].reshape(2, 3, 2, 16).sum(1))


def test_dispatch_forced_triton(monkeypatch, device):
    from latentr3_fast.ops import gaussian_expand

    monkeypatch.setenv("LATENTR3_KERNELS", "triton")
    r = torch.randn(2, 1, 8, device=device)
    a = gaussian_expand(r, 3, 1.0, seed=9)[1]
    assert torch.equal(a, _triton()(r, 3, 1.0, seed=9)[1])


def test_default_seed_follows_torch_manual_seed(device):
    r = torch.randn(2, 1, 8, device=device)
    torch.manual_seed(5)
    a = _triton()(r, 3, 1.0)[1]
    torch.manual_seed(5)
    b = _triton()(r, 3, 1.0)[1]
    c = _triton()(r, 3, 1.0)[1]
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("r_grad", [False, True])
def test_buffer_that_needs_grad(r_grad, device):
    """Suffix buffer built from trainable embeddings: the overwritten latent slots get zero
    gradient, every other slot its own, and r the group sums."""
    emb = torch.randn(6, 4, 8, device=device, requires_grad=True)
    buf = emb * 1.0
    r = torch.randn(2, 1, 8, device=device, requires_grad=r_grad)
    _triton()(r, 3, 1.0, seed=1, out=buf[:, 0:1])
    wgt = torch.randn_like(buf)
    (buf * wgt).sum().backward()
    assert torch.equal(emb.grad[:, 0], torch.zeros(6, 8, device=device))
    assert torch.equal(emb.grad[:, 1:], wgt[:, 1:])
    if r_grad:
        torch.testing.assert_close(r.grad, wgt[:, 0:1].reshape(2, 3, 1, 8).sum(1))
