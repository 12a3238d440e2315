"""Input contract of a batch scored after shared prefixes (``PerplexityReward.forward``).

P prompts ``[P, Lp]``, LEFT-padded so that every prompt's last column is a real token (it is fed
in the suffix, see :mod:`latentr3_fast.reward`); R rows, row ``r`` continuing prompt
``prompt_index[r]``; per row optional extra tokens ``[R, N, d]`` (pads anywhere) and
RIGHT-padded targets ``[R, T]`` with at least one real token. Each check raises ConfigError
(wrong shape or argument) or DataError (wrong padding or values), its message prefixed by
``who``, and returns the tensors normalized to long on the scoring device. The text helpers at
the end build such batches from strings (``PerplexityReward.score_texts``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import ConfigError, DataError

__all__ = [
    "check_cache",
    "check_extra",
    "check_prompts",
    "check_targets",
    "pad_token_lists",
    "prompt_chunks",
    "row_prompt_index",
    "tokenize_texts",
]


def check_cache(cache: Any, expected_len: int, who: str) -> None:
    """Reject cache types the row expansion cannot handle, and a cache the model did not fill."""
    for layer in getattr(cache, "layers", []):
        name = type(layer).__name__
        if "Linear" in name or "Static" in name or "Quantized" in name:
            raise ConfigError(
                f"{who}: cache layer type {name} is not supported "
                "(expanding and padding a linear-attention/static/quantized cache); "
                "use a model with plain (sliding-window) attention"
            )
    if cache.get_seq_length() != expected_len:
        raise ConfigError(
            f"{who}: the model did not fill the KV cache (length "
            f"{cache.get_seq_length()}, expected {expected_len}). Gradient checkpointing "
            "in training mode disables the cache: call model.eval() (or run the reward "
            "under torch.no_grad()), or disable gradient checkpointing"
        )


def check_prompts(
    prompt_ids: torch.Tensor | None,
    prompt_embeds: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    device: torch.device,
    who: str,
) -> torch.Tensor:
    """The ``[P, Lp]`` long prompt mask on ``device``, after checking shapes and left padding."""
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ConfigError(f"{who}: pass exactly one of prompt_ids / prompt_embeds")
    if prompt_ids is not None:
        if prompt_ids.dim() != 2:
            raise ConfigError(f"{who}: prompt_ids must be [P, Lp], got {tuple(prompt_ids.shape)}")
        shape = tuple(prompt_ids.shape)
    else:
        if prompt_embeds.dim() != 3:
            raise ConfigError(
                f"{who}: prompt_embeds must be [P, Lp, d], got {tuple(prompt_embeds.shape)}"
            )
        shape = tuple(prompt_embeds.shape[:2])
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(f"{who}: empty prompt batch {shape}")
    if prompt_mask is None:
        prompt_mask = torch.ones(shape, dtype=torch.long, device=device)
    if tuple(prompt_mask.shape) != shape:
        raise ConfigError(f"{who}: prompt_mask must be {shape}, got {tuple(prompt_mask.shape)}")
    prompt_mask = prompt_mask.to(device).long()
    if not bool((prompt_mask[:, -1] == 1).all()):
        row = int((prompt_mask[:, -1] != 1).nonzero()[0, 0])
        raise DataError(
            f"{who}: prompt_mask row {row} does not end with a real token; "
            "prompts must be LEFT-padded and non-empty"
        )
    return prompt_mask


def row_prompt_index(
    num_prompts: int,
    num_generations: int,
    prompt_index: torch.Tensor | None,
    device: torch.device,
    who: str,
) -> torch.Tensor:
    """``[R]`` long: the prompt of every row (``num_generations`` consecutive rows by default)."""
    if prompt_index is None:
        if int(num_generations) < 1:
            raise ConfigError(f"{who}: num_generations must be >= 1, got {num_generations}")
        return torch.arange(num_prompts, device=device).repeat_interleave(int(num_generations))
    prompt_index = prompt_index.to(device).long()
    if prompt_index.dim() != 1:
        raise ConfigError(f"{who}: prompt_index must be [R]")
    if prompt_index.numel() and (
        int(prompt_index.min()) < 0 or int(prompt_index.max()) >= num_prompts
    ):
        raise DataError(f"{who}: prompt_index values must lie in [0, {num_prompts})")
    return prompt_index


def check_targets(
    target_ids: torch.Tensor | None,
    target_mask: torch.Tensor | None,
    prompt_index: torch.Tensor,
    num_prompts: int,
    who: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, T]`` long target ids and mask (``[P, T]`` repeated to rows), right padding checked."""
    if target_ids is None:
        raise ConfigError(f"{who}: target_ids is required")
    if target_ids.dim() != 2 or target_ids.shape[1] == 0:
        raise ConfigError(f"{who}: target_ids must be [R, T>0], got {tuple(target_ids.shape)}")
    rows, device = prompt_index.numel(), prompt_index.device
    if target_mask is None:
        target_mask = torch.ones_like(target_ids)
    if target_mask.shape != target_ids.shape:
        raise ConfigError(
            f"{who}: target_mask must be {tuple(target_ids.shape)}, got {tuple(target_mask.shape)}"
        )
    target_ids, target_mask = target_ids.to(device).long(), target_mask.to(device).long()
    if target_ids.shape[0] == num_prompts and rows != num_prompts:
        target_ids = target_ids[prompt_index]
        target_mask = target_mask[prompt_index]
    if target_ids.shape[0] != rows:
        raise ConfigError(
            f"{who}: target_ids has {target_ids.shape[0]} rows, expected "
            f"R={rows} (or P={num_prompts})"
        )
    if bool((target_mask[:, 1:] > target_mask[:, :-1]).any()):
        row = int((target_mask[:, 1:] > target_mask[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise DataError(f"{who}: target_mask row {row} is not RIGHT-padded")
    if bool((target_mask[:, 0] == 0).any()):
        row = int((target_mask[:, 0] == 0).nonzero()[0, 0])
        raise DataError(f"{who}: target row {row} has no target token")
    return target_ids, target_mask


def check_extra(
    extra_embeds: torch.Tensor | None,
    extra_mask: torch.Tensor | None,
    rows: int,
    device: torch.device,
    who: str,
) -> torch.Tensor:
    """The ``[R, N]`` long mask of the extra tokens (``N = 0`` without them)."""
    if extra_embeds is not None and (extra_embeds.dim() != 3 or extra_embeds.shape[0] != rows):
        raise ConfigError(
            f"{who}: extra_embeds must be [R={rows}, N, d], got {tuple(extra_embeds.shape)}"
        )
    num_extra = 0 if extra_embeds is None else extra_embeds.shape[1]
    if extra_mask is None:
        extra_mask = torch.ones(rows, num_extra, dtype=torch.long, device=device)
    if tuple(extra_mask.shape) != (rows, num_extra):
        raise ConfigError(
            f"{who}: extra_mask must be [{rows}, {num_extra}], got {tuple(extra_mask.shape)}"
        )
    return extra_mask.to(device).long()


def tokenize_texts(
    tokenizer: Any,
    prompt_texts: list[str],
    targets: Sequence[str],
    completions: Sequence[str] | None,
    add_special_tokens: bool,
    append_eos: bool,
    who: str,
) -> tuple[list[list[int]], list[list[int]], list[list[int]] | None]:
    """Token ids of each distinct prompt, each target (+ EOS) and each completion, each
    tokenized on its own (only the prompt with special tokens)."""
    prompt_ids = [
        tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompt_texts
    ]
    for text, ids in zip(prompt_texts, prompt_ids):
        if not ids:
            raise DataError(f"{who}: prompt {text!r} has no tokens")
    eos = [tokenizer.eos_token_id] if append_eos else []
    if append_eos and tokenizer.eos_token_id is None:
        raise ConfigError(f"{who}: append_eos but tokenizer has no EOS")
    target_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in targets]
    for i, ids in enumerate(target_ids):
        if not ids:
            raise DataError(f"{who}: target row {i} has no tokens")
    completion_ids = (
        [tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for c in completions]
        if completions is not None
        else None
    )
    return prompt_ids, target_ids, completion_ids


def prompt_chunks(rows_of_prompt: list[list[int]], max_rows: int) -> Iterator[list[int]]:
    """Consecutive prompt groups of about ``max_rows`` rows (a group is never split)."""
    chunk: list[int] = []
    num_rows = 0
    for prompt, rows in enumerate(rows_of_prompt):
        if chunk and num_rows + len(rows) > max_rows:
            yield chunk
            chunk, num_rows = [], 0
        chunk.append(prompt)
        num_rows += len(rows)
    if chunk:
        yield chunk


def pad_token_lists(
    seqs: list[list[int]], pad: int, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[len(seqs), longest]`` long, LEFT- or right-padded with ``pad``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            columns = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[i, columns] = torch.tensor(seq, dtype=torch.long)
            mask[i, columns] = 1
    return ids.to(device), mask.to(device)
