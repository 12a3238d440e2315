"""Batching: left-padded prompts (so the last prompt token of every row sits at the same, final
position, which the latent query and the KV-cache continuation rely on) and right-padded targets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

__all__ = ["EncodedSample", "Batch", "collate", "batch_indices", "iterate_batches"]


@dataclass
class EncodedSample:
    """Token ids of one sample: the (already truncated) prompt and the target (EOS included)."""

    prompt_ids: list[int]
    target_ids: list[int]


@dataclass
class Batch:
    """A collated batch (all LongTensors).

    prompt_ids:  [B, Lp] LEFT-padded with pad_id
    prompt_mask: [B, Lp] 1 = real token
    target_ids:  [B, Lt] RIGHT-padded with pad_id
    target_mask: [B, Lt] 1 = real token
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.prompt_ids, self.prompt_mask, self.target_ids, self.target_mask)
            )
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.prompt_ids.pin_memory(),
            self.prompt_mask.pin_memory(),
            self.target_ids.pin_memory(),
            self.target_mask.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])


def collate(items: Sequence[EncodedSample], pad_id: int) -> Batch:
    """Stack encoded samples: prompts left-padded, targets right-padded, both to the batch max.

    Returns a :class:`Batch` with prompt tensors ``[B, max len(prompt)]`` and target tensors
    ``[B, max len(target)]``.
    """
    if not items:
        raise DataError("collate: empty list of samples")
    b = len(items)
    lp = max(len(x.prompt_ids) for x in items)
    lt = max(len(x.target_ids) for x in items)
    if lp == 0 or lt == 0:
        raise DataError("collate: a sample has an empty prompt or an empty target")
    p = np.full((b, lp), pad_id, dtype=np.int64)
    pm = np.zeros((b, lp), dtype=np.int64)
    t = np.full((b, lt), pad_id, dtype=np.int64)
    tm = np.zeros((b, lt), dtype=np.int64)
    for i, x in enumerate(items):
        n = len(x.prompt_ids)
        if n:
            p[i, lp - n :] = x.prompt_ids
            pm[i, lp - n :] = 1
        m = len(x.target_ids)
        if m:
            t[i, :m] = x.target_ids
            tm[i, :m] = 1
    return Batch(*(torch.from_numpy(a) for a in (p, pm, t, tm)))


def batch_indices(
    n: int, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """Index lists of consecutive batches over ``range(n)`` (a seeded permutation if shuffle)."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be >= 1")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    out = [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out


def iterate_batches(
    encoded: Sequence[EncodedSample],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    pad_id: int,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Yield collated batches over ``encoded`` (in order, or a seeded shuffle)."""
    for idx in batch_indices(len(encoded), batch_size, shuffle, seed, drop_last):
        yield collate([encoded[i] for i in idx], pad_id)
