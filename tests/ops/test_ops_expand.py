"""Torch path of gaussian_expand."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.errors import ConfigError
from latentr3_fast.ops import gaussian_expand, gaussian_expand_torch


def test_layout_noise_and_clean_rows():
    r = torch.randn(3, 2, 5)
    noise = torch.randn(3, 3, 5)
    out, used = gaussian_expand_torch(r, 4, 0.5, noise=noise)
    assert out.shape == (12, 2, 5) and torch.equal(used, noise)
    for p in range(3):
        assert torch.equal(out[p * 4], r[p])  # clean row
        for k in range(1, 4):
            torch.testing.assert_close(out[p * 4 + k, 0], r[p, 0] + 0.5 * noise[p, k - 1])
            assert torch.equal(out[p * 4 + k, 1], r[p, 1])  # later steps copied


def test_seed_determinism_and_default_generator():
    r = torch.randn(2, 1, 8)
    a = gaussian_expand_torch(r, 3, 1.0, seed=5)[1]
    b = gaussian_expand_torch(r, 3, 1.0, seed=5)[1]
    c = gaussian_expand_torch(r, 3, 1.0, seed=6)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    x = gaussian_expand(r, 3, 1.0)[1]
    torch.manual_seed(3)
    assert torch.equal(x, gaussian_expand(r, 3, 1.0)[1])


def test_gradient_is_group_sum_and_noise_is_constant():
    r = torch.randn(2, 3, 4, requires_grad=True)
    out, noise = gaussian_expand_torch(r, 5, 1.5, seed=0)
    wgt = torch.randn_like(out)
    (out * wgt).sum().backward()
    torch.testing.assert_close(r.grad, wgt.view(2, 5, 3, 4).sum(1))
    assert not noise.requires_grad


def test_out_buffer_is_written_in_place_with_gradient():
    r = torch.randn(2, 2, 4, requires_grad=True)
    buf = torch.full((6, 5, 4), 7.0)
    res, noise = gaussian_expand_torch(r, 3, 1.0, seed=1, out=buf[:, 1:3])
    ref, _ = gaussian_expand_torch(r, 3, 1.0, noise=noise)
    assert torch.equal(buf[:, 1:3], ref) and torch.equal(res, buf[:, 1:3])
    assert (buf[:, 0] == 7).all() and (buf[:, 3:] == 7).all()
    wgt = torch.randn_like(buf)
    (buf * wgt).sum().backward()
    torch.testing.assert_close(r.grad, wgt[:, 1:3].reshape(2, 3, 2, 4).sum(1))


def test_single_generation_and_zero_steps():
    r = torch.randn(2, 3, 4)
    out, noise = gaussian_expand_torch(r, 1, 1.0, seed=0)
    assert torch.equal(out, r) and noise.shape == (2, 0, 4)
    out, noise = gaussian_expand_torch(torch.randn(2, 0, 4), 3, 1.0, seed=0)
    assert out.shape == (6, 0, 4) and noise.shape == (2, 2, 4)


def test_bad_arguments():
    r = torch.randn(2, 1, 4)
    with pytest.raises(ConfigError, match="noise"):
        gaussian_expand_torch(r, 3, 1.0, noise=torch.randn(2, 3, 4))
    with pytest.raises(ConfigError, match="r must be"):
        gaussian_expand_torch(torch.randn(2, 4), 3, 1.0)
    with pytest.raises(ConfigError, match="out"):
        gaussian_expand_torch(r, 3, 1.0, out=torch.empty(5, 1, 4))
    with pytest.raises(ConfigError, match="num_generations"):
        gaussian_expand_torch(r, 0, 1.0)


def test_buffer_that_needs_grad():
    emb = torch.randn(6, 4, 8, requires_grad=True)
    buf = emb * 1.0
    r = torch.randn(2, 1, 8, requires_grad=True)
    gaussian_expand_torch(r, 3, 1.0, seed=1, out=buf[:, 0:1])
    wgt = torch.randn_like(buf)
    (buf * wgt).sum().backward()
    assert torch.equal(emb.grad[:, 0], torch.zeros(6, 8))
    assert torch.equal(emb.grad[:, 1:], wgt[:, 1:])
    torch.testing.assert_close(r.grad, wgt[:, 0:1].reshape(2, 3, 1, 8).sum(1))
