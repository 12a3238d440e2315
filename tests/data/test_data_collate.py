"""Collation: left-padded prompts, right-padded targets, masks, devices, batch iteration."""

from __future__ import annotations

import pytest
import torch

from latentr3_fast.data import Batch, EncodedSample, batch_indices, collate, iterate_batches
from latentr3_fast.errors import DataError

PAD = 7


def test_collate_padding_sides_and_masks():
    items = [
        EncodedSample([1, 2, 3], [10]),
        EncodedSample([4], [11, 12, 13, 14]),
        EncodedSample([5, 6, 8, 9, 20], [15, 16]),
    ]
    b = collate(items, pad_id=PAD)
    assert isinstance(b, Batch) and len(b) == 3
    assert b.prompt_ids.dtype == torch.long and b.target_mask.dtype == torch.long
    assert b.prompt_ids.tolist() == [
        [PAD, PAD, 1, 2, 3],
        [PAD, PAD, PAD, PAD, 4],
        [5, 6, 8, 9, 20],
    ]
    assert b.prompt_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert b.target_ids.tolist() == [[10, PAD, PAD, PAD], [11, 12, 13, 14], [15, 16, PAD, PAD]]
    assert b.target_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("bsz", [1, 5, 13])
def test_collate_random_shapes(bsz):
    g = torch.Generator().manual_seed(bsz)
    items = []
    for _ in range(bsz):
        lp, lt = (int(x) for x in torch.randint(1, 30, (2,), generator=g))
        items.append(EncodedSample(torch.randint(0, 99, (lp,)).tolist(), [1] * lt))
    b = collate(items, pad_id=0)
    lp_max = max(len(x.prompt_ids) for x in items)
    lt_max = max(len(x.target_ids) for x in items)
    assert b.prompt_ids.shape == b.prompt_mask.shape == (bsz, lp_max)
    assert b.target_ids.shape == b.target_mask.shape == (bsz, lt_max)
    for i, x in enumerate(items):
        n = len(x.prompt_ids)
        # the real prompt tokens are exactly the last n positions, in order
        assert b.prompt_ids[i, lp_max - n :].tolist() == x.prompt_ids
        assert int(b.prompt_mask[i].sum()) == n and int(b.prompt_mask[i, -1]) == 1
        assert int(b.target_mask[i].sum()) == len(x.target_ids) and int(b.target_mask[i, 0]) == 1


def test_batch_to_device_and_empty():
    b = collate([EncodedSample([1], [2])], pad_id=0).to("cpu")
    assert b.prompt_ids.device.type == "cpu" and len(b) == 1
    with pytest.raises(DataError, match="empty"):
        collate([], pad_id=0)
    with pytest.raises(DataError, match="empty"):
        collate([EncodedSample([], [1])], pad_id=0)


def test_batch_indices_cover_everything_once():
    for shuffle in (False, True):
        idx = batch_indices(23, 5, shuffle=shuffle, seed=4)
        assert [len(x) for x in idx] == [5, 5, 5, 5, 3]
        assert sorted(i for x in idx for i in x) == list(range(23))
    assert batch_indices(23, 5) == [list(range(k, min(k + 5, 23))) for k in range(0, 23, 5)]
    assert batch_indices(23, 5, True, seed=1) == batch_indices(23, 5, True, seed=1)
    assert batch_indices(23, 5, True, seed=1) != batch_indices(23, 5, True, seed=2)
    assert len(batch_indices(23, 5, drop_last=True)) == 4
    with pytest.raises(DataError, match="batch_size"):
        batch_indices(3, 0)


def test_iterate_batches():
    enc = [EncodedSample([i + 1] * (i % 4 + 1), [i]) for i in range(10)]
    batches = list(iterate_batches(enc, 4, pad_id=0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[2].target_ids[:, 0].tolist() == [8, 9]
    shuffled = list(iterate_batches(enc, 4, shuffle=True, seed=0, pad_id=0))
    got = sorted(int(t) for b in shuffled for t in b.target_ids[:, 0])
    assert got == list(range(10))
