"""grpo_advantage: hand-computed cases and a 2-process gloo run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentr3_fast.errors import ConfigError
from latentr3_fast.ops import grpo_advantage


def test_batch_mode_hand_computed():
    # two prompts, G = 2: clean rewards 1 and 3 -> m = 2; S - m = [-1, 0, 1, 2]; norm sqrt(6)
    a = grpo_advantage(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)
    s6 = math.sqrt(6) + 1e-6
    torch.testing.assert_close(a, torch.tensor([-1 / s6, 0.0, 1 / s6, 2 / s6]))


def test_group_and_none_modes_hand_computed():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # group 1: mean 2, unbiased std 1; group 2: constant -> 0
    a = grpo_advantage(s, 3, mode="group")
    torch.testing.assert_close(a, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    # none: m = mean(1, 10) = 5.5
    torch.testing.assert_close(grpo_advantage(s, 3, mode="none"), s - 5.5)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="mode"):
        grpo_advantage(torch.zeros(4), 2, mode="nope")
    with pytest.raises(ConfigError, match="G=3"):
        grpo_advantage(torch.zeros(4), 3)
    with pytest.raises(ConfigError, match="group"):
        grpo_advantage(torch.zeros(4), 1, mode="group")


def _worker(rank, world, init_file, shards, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = {m: grpo_advantage(shards[rank], 4, mode=m) for m in ("batch", "none", "group")}
        torch.save(res, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rewards = -torch.rand(5 * 4, generator=gen) * 7  # 5 prompts x G = 4
    shards = [rewards[:12].clone(), rewards[12:].clone()]  # uneven: 3 and 2 prompts
    out = str(tmp_path / "adv")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), shards, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for mode in ("batch", "none", "group"):
        whole = grpo_advantage(rewards, 4, mode=mode)
        assert torch.equal(torch.cat([parts[0][mode], parts[1][mode]]), whole), mode
    # and the distributed answer is not just the local one
    assert not torch.equal(parts[0]["batch"], grpo_advantage(shards[0], 4))
