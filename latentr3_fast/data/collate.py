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

    prompt_ids:  [batch, prompt_len] LEFT-padded with pad_id
    prompt_mask: [batch, prompt_len] 1 = real token
    target_ids:  [batch, target_len] RIGHT-padded with pad_id
    target_mask: [batch, target_len] 1 = real token
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            *(
                tensor.to(device, non_blocking=non_blocking)
                for tensor in (self.prompt_ids, self.prompt_mask, self.target_ids, self.target_mask)
            )
        )

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory (for non-blocking copies)."""
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

    Returns a :class:`Batch` with prompt tensors ``[batch, max len(prompt)]`` and target
    tensors ``[batch, max len(target)]``.
    """
    if not items:
        raise DataError("collate: empty list of samples")
    batch = len(items)
    prompt_len = max(len(x.prompt_ids) for x in items)
    target_len = max(len(x.target_ids) for x in items)
    if prompt_len == 0 or target_len == 0:
        raise DataError("collate: a sample has an empty prompt or an empty target")
    prompt_ids = np.full((batch, prompt_len), pad_id, dtype=np.int64)
    prompt_mask = np.zeros((batch, prompt_len), dtype=np.int64)
    target_ids = np.full((batch, target_len), pad_id, dtype=np.int64)
    target_mask = np.zeros((batch, target_len), dtype=np.int64)
    for row, sample in enumerate(items):
        length = len(sample.prompt_ids)
        if length:
            prompt_ids[row, prompt_len - length :] = sample.prompt_ids
            prompt_mask[row, prompt_len - length :] = 1
        length = len(sample.target_ids)
        if length:
            target_ids[row, :length] = sample.target_ids
            target_mask[row, :length] = 1
    arrays = (prompt_ids, prompt_mask, target_ids, target_mask)
    return Batch(*(torch.from_numpy(array) for array in arrays))


def batch_indices(
    n: int, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """Index lists of consecutive batches over ``range(n)`` (a seeded permutation if shuffle)."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be >= 1")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    out = [order[first : first + batch_size].tolist() for first in range(0, n, batch_size)]
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
    for rows in batch_indices(len(encoded), batch_size, shuffle, seed, drop_last):
        yield collate([encoded[i] for i in rows], pad_id)
