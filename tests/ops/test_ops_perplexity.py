"""perplexity_reward, mean_logprob and perplexity_reward_from_hidden."""

from __future__ import annotations

import math

import pytest
import torch
from reference_ops import plain_logprob

from latentr3_fast.errors import DataError
from latentr3_fast.ops import mean_logprob, perplexity_reward, perplexity_reward_from_hidden


def test_hand_computed_rewards():
    logp = torch.tensor([[-1.0, -3.0, -9.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_logprob(logp, mask), torch.tensor([-2.0, -0.5]))
    torch.testing.assert_close(
        perplexity_reward(logp, mask.bool()), torch.tensor([-math.exp(2.0), -math.exp(0.5)])
    )


def test_empty_row_raises():
    with pytest.raises(DataError, match="row 1"):
        perplexity_reward(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_reward_from_hidden_matches_plain():
    gen = torch.Generator().manual_seed(0)
    r, t, d, v = 5, 6, 16, 333
    hidden = torch.randn(r, t, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen) / 4
    targets = torch.randint(0, v, (r, t), generator=gen)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    mask = torch.arange(t)[None] < lengths[:, None]
    targets[~mask] = 0  # padding ids are arbitrary but in range
    got = perplexity_reward_from_hidden(hidden, weight, targets, mask, temperature=1.3)
    flat = plain_logprob(hidden.detach().reshape(-1, d), weight, targets.reshape(-1),
                         temperature=1.3).view(r, t)  # fmt: skip
    expect = torch.stack([-torch.exp(-flat[i, : lengths[i]].mean()) for i in range(r)]).float()
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    got.sum().backward()  # differentiable; padded positions get no gradient
    assert hidden.grad[1, 1:].abs().sum() == 0 and hidden.grad[0].abs().sum() > 0
