"""``fused_linear_logprob(..., return_lse=True)``: the per-row normalizer beam search uses."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.ops import fused_linear_logprob, fused_linear_logprob_torch


def _inputs(rows: int, vocab: int, dim: int, with_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return hidden, weight, bias, targets


def _reference(hidden, weight, bias, targets, temperature):
    logits = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, targets[:, None]).squeeze(1) - lse, lse


@pytest.mark.parametrize(("rows", "vocab", "dim"), [(1, 1, 1), (7, 1003, 13), (33, 257, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.37, 2.5])
@pytest.mark.parametrize("chunks", [{}, {"chunk_rows": 4, "chunk_vocab": 100}])
def test_lse_equals_torch_logsumexp(rows, vocab, dim, with_bias, temperature, chunks):
    hidden, weight, bias, targets = _inputs(rows, vocab, dim, with_bias)
    want_logp, want_lse = _reference(hidden, weight, bias, targets, temperature)
    logp, lse = fused_linear_logprob_torch(
        hidden, weight, targets, bias, temperature=temperature, return_lse=True, **chunks
    )
    assert lse.dtype == torch.float32 and lse.shape == (rows,)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    # the same log-probs as without return_lse, bit for bit
    plain = fused_linear_logprob_torch(
        hidden, weight, targets, bias, temperature=temperature, **chunks
    )
    assert torch.equal(plain, logp)


def test_dispatcher_returns_lse_for_ignored_rows_too():
    hidden, weight, bias, targets = _inputs(6, 300, 8, with_bias=True, seed=1)
    targets[[1, 4]] = -100
    logp, lse = fused_linear_logprob(
        hidden, weight, targets, bias, temperature=0.8, return_lse=True
    )
    want_lse = torch.logsumexp((hidden @ weight.T + bias) / 0.8, dim=-1)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert logp[1] == 0 and logp[4] == 0
    assert torch.equal(logp, fused_linear_logprob(hidden, weight, targets, bias, temperature=0.8))


@pytest.mark.parametrize("head_requires_grad", [False, True])
def test_lse_has_no_gradient_and_leaves_logp_gradients_unchanged(head_requires_grad):
    """lse is returned without gradient (both backward paths: frozen and trainable head)."""
    hidden, weight, _, targets = _inputs(5, 211, 7, with_bias=False, seed=2)
    weight.requires_grad_(head_requires_grad)
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    logp, lse = fused_linear_logprob_torch(h1, weight, targets, return_lse=True, chunk_vocab=64)
    assert not lse.requires_grad
    logp.sum().backward()
    fused_linear_logprob_torch(h2, weight, targets, chunk_vocab=64).sum().backward()
    assert torch.equal(h1.grad, h2.grad)


def test_empty_input_returns_empty_lse():
    weight = torch.randn(10, 4)
    logp, lse = fused_linear_logprob_torch(
        torch.zeros(0, 4), weight, torch.zeros(0, dtype=torch.long), return_lse=True
    )
    assert logp.shape == lse.shape == (0,) and lse.dtype == torch.float32
