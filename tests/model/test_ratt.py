"""LatentRATT against a hand-written reference (complex-number rotary, per-row loops)."""

from __future__ import annotations

import pytest
import torch
from ratt_reference import reference_ratt

from latentr3_fast.errors import ConfigError
from latentr3_fast.model import LatentRATT


def _random_ratt(d: int, heads: int = 1, seed: int = 0) -> LatentRATT:
    torch.manual_seed(seed)
    ratt = LatentRATT(d, num_heads=heads)
    with torch.no_grad():  # larger weights than the 0.02 init so attention is far from uniform
        for lin in (ratt.q_proj, ratt.k_proj, ratt.v_proj):
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 0.5)
    return ratt


@pytest.mark.parametrize("d,heads", [(6, 1), (32, 1), (24, 3)])
def test_ratt_matches_reference_left_padded(d, heads):
    ratt = _random_ratt(d, heads)
    lengths = [5, 1, 3]
    length = max(lengths)
    hidden = torch.randn(len(lengths), length, d)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, length - n :] = 1
    hidden[mask == 0] = float("nan")  # padding garbage must not leak
    got = ratt(hidden, mask)
    assert got.dtype == torch.float32 and got.shape == (3, d)
    torch.testing.assert_close(got, reference_ratt(ratt, hidden, mask), atol=1e-5, rtol=1e-4)


def test_ratt_padding_invariance():
    d = 16
    ratt = _random_ratt(d, seed=1)
    x = torch.randn(1, 7, d)
    unpadded = ratt(x, torch.ones(1, 7, dtype=torch.long))
    left = torch.cat([torch.randn(1, 3, d), x], 1)
    left_mask = torch.tensor([[0, 0, 0] + [1] * 7])
    right = torch.cat([x, torch.randn(1, 4, d)], 1)
    right_mask = torch.tensor([[1] * 7 + [0] * 4])
    torch.testing.assert_close(ratt(left, left_mask), unpadded, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ratt(right, right_mask), unpadded, atol=1e-6, rtol=1e-5)


def test_ratt_single_token_returns_value_projection():
    # With one key the softmax is 1, so r = W_v x + b_v exactly (rotary does not touch v).
    ratt = _random_ratt(8, seed=2)
    x = torch.randn(2, 1, 8)
    got = ratt(x, torch.ones(2, 1))
    torch.testing.assert_close(got, ratt.v_proj(x[:, 0]))


def test_ratt_init_and_fp32_master_weights():
    torch.manual_seed(0)
    ratt = LatentRATT(256)
    for lin in (ratt.q_proj, ratt.k_proj, ratt.v_proj):
        assert torch.all(lin.bias == 0)
        assert abs(lin.weight.std().item() - 0.02) < 2e-3
        assert abs(lin.weight.mean().item()) < 1e-3
    ratt = ratt.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in ratt.parameters())
    out = ratt(torch.randn(2, 3, 256, dtype=torch.bfloat16), torch.ones(2, 3))
    assert out.dtype == torch.float32


def test_ratt_gradients_reach_hidden():
    ratt = _random_ratt(8, seed=3)
    h = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ratt(h.float(), mask).sum().backward()
    assert torch.all(h.grad[0, 0] == 0)  # padding gets no gradient
    assert h.grad[:, 1:].abs().sum() > 0


def test_ratt_bad_shapes():
    with pytest.raises(ConfigError):
        LatentRATT(10, num_heads=3)
    with pytest.raises(ConfigError):
        LatentRATT(6, num_heads=2)  # odd head dim
    ratt = LatentRATT(8)
    with pytest.raises(ConfigError):
        ratt(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ConfigError):
        ratt(torch.randn(2, 3, 8), torch.ones(2, 4))
