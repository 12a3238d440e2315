"""Top-K metrics HR@K and NDCG@K (paper Sec. 4.1) and popularity groups (paper Sec. 4.3.1,
App. D), as the reference evaluation computes them (pure functions over ranks and titles).

* A prediction hits if its title equals the target's after :func:`normalize_title` (the
  reference's rule, the one title-matching rule of the package); the rank is the 0-based
  position of the first hit (None, ``inf`` or a negative rank: no hit, the reference's
  "rank = infinity").
* HR@K = mean over ALL rows of [rank < K]; NDCG@K = mean of [rank < K] / log2(rank + 2).
* Popularity groups: items ranked by train-target frequency; the top ``top_fraction`` of
  items are "popular", the rest "unpopular"; test rows are grouped by their target item.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from latentr3_fast.errors import DataError

__all__ = [
    "DEFAULT_KS",
    "first_hit_rank",
    "group_metrics",
    "metrics_from_ranks",
    "normalize_title",
    "out_of_catalogue_count",
    "popularity_groups",
    "relative_gain",
]

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


def normalize_title(title: str) -> str:
    """Title for matching, the reference's rule: strip spaces and newlines, then double
    quotes, then spaces (at both ends; nothing else). ``'"Blue Train"\n'`` and ``"Blue Train"``
    both give ``"Blue Train"``; apostrophes (``"'70s Gold"``, ``"Smokin'"``), tabs and inner
    characters are kept. Used by the metrics and by the exact-match GRPO reward."""
    return title.strip(" \n").strip('"').strip(" ")


def first_hit_rank(predicted_titles: Sequence[str], target_title: str) -> int | None:
    """0-based position of the first prediction matching the target (None if none does)."""
    target = normalize_title(target_title)
    for i, title in enumerate(predicted_titles):
        if normalize_title(title) == target:
            return i
    return None


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """The cut-offs as a tuple; DataError unless every K is a positive int."""
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"ks: every K must be a positive int, got {k!r}")
    return ks


def _rank_array(ranks: Iterable[int | float | None]) -> np.ndarray:
    """Ranks as float64 with +inf for a miss (None, +-inf or a negative rank)."""
    out = []
    for i, rank in enumerate(ranks):
        if rank is None:
            out.append(math.inf)
            continue
        ok_type = isinstance(rank, (int, np.integer)) or (
            isinstance(rank, (float, np.floating))
            and (math.isinf(rank) or float(rank).is_integer())
        )
        if isinstance(rank, bool) or not ok_type:
            raise DataError(
                f"ranks[{i}]: expected a 0-based int rank, or None/inf/a negative rank for a "
                f"miss, got {rank!r}"
            )
        out.append(math.inf if rank < 0 or math.isinf(rank) else float(rank))
    return np.asarray(out, dtype=np.float64)


def metrics_from_ranks(
    ranks: Iterable[int | float | None], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """HR@K and NDCG@K over all rows.

    Args:
        ranks: per row the 0-based rank of the first hit; a miss is None, ``inf`` or any
            negative rank (the reference's "no hit = rank infinity"). NaN or a fractional
            rank is an error.
        ks: cut-offs.
    Returns:
        ``{"HR@K": ..., "NDCG@K": ..., "n": rows}``; with no rows every value is 0.0 (never
        NaN) and ``n`` is 0, so an empty group reads as "no hits among 0 rows".
    """
    ks = _check_ks(ks)
    rank = _rank_array(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = rank < k
        if len(rank) == 0:
            out[f"HR@{k}"] = out[f"NDCG@{k}"] = 0.0
            continue
        gain = np.where(hit, 1.0 / np.log2(np.where(hit, rank, 0.0) + 2.0), 0.0)
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(gain.mean())
    out["n"] = len(rank)
    return out


def popularity_groups(popularity_counts: Any, top_fraction: float = 0.2) -> np.ndarray:
    """[num_items] bool, True for the ``ceil(top_fraction * num_items)`` most frequent items.

    Ties in frequency are broken by the smaller item id (stable order).
    """
    counts = np.asarray(popularity_counts)
    if counts.ndim != 1:
        raise DataError(f"popularity_counts: expected 1-D, got shape {counts.shape}")
    if not 0.0 <= top_fraction <= 1.0:
        raise DataError(f"top_fraction must lie in [0, 1], got {top_fraction}")
    num_items = len(counts)
    num_popular = min(num_items, math.ceil(top_fraction * num_items - 1e-9))
    order = np.argsort(-counts.astype(np.float64), kind="stable")
    popular = np.zeros(num_items, dtype=bool)
    popular[order[:num_popular]] = True
    return popular


def group_metrics(
    ranks: Sequence[int | None],
    target_ids: Sequence[int],
    is_popular: Any,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, dict[str, float]]:
    """Metrics for all rows and per popularity group of the row's target item.

    Returns ``{"all": m, "popular": m, "unpopular": m}`` with ``m`` as in metrics_from_ranks.
    """
    ks = _check_ks(ks)
    if len(ranks) != len(target_ids):
        raise DataError(f"ranks has {len(ranks)} rows but target_ids has {len(target_ids)}")
    popular = np.asarray(is_popular, dtype=bool)
    targets = np.asarray(target_ids, dtype=np.int64)
    if len(targets) and (targets.min() < 0 or targets.max() >= len(popular)):
        bad = int(targets[(targets < 0) | (targets >= len(popular))][0])
        raise DataError(f"target_ids: item id {bad} is outside is_popular [0, {len(popular)})")
    row_popular = popular[targets] if len(targets) else np.zeros(0, dtype=bool)
    ranks = list(ranks)
    return {
        "all": metrics_from_ranks(ranks, ks),
        "popular": metrics_from_ranks([r for r, p in zip(ranks, row_popular) if p], ks),
        "unpopular": metrics_from_ranks([r for r, p in zip(ranks, row_popular) if not p], ks),
    }


def relative_gain(new: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """(new - base) / base for every metric both have (nested dicts, e.g. per group, recurse).

    The row count ``n`` is skipped; a zero base gives +inf (or NaN when new is 0 too).
    """
    out: dict[str, Any] = {}
    for key, base_value in base.items():
        if key == "n" or key not in new:
            continue
        new_value = new[key]
        if isinstance(base_value, Mapping):
            out[key] = relative_gain(new_value, base_value)
        elif base_value == 0:
            out[key] = math.nan if new_value == 0 else math.copysign(math.inf, new_value)
        else:
            out[key] = (new_value - base_value) / base_value
    return out


def out_of_catalogue_count(
    predicted_titles: Iterable[Sequence[str]], catalogue_titles: Iterable[str]
) -> int:
    """Number of predicted titles (over all rows) that match no catalogue title."""
    known = {normalize_title(title) for title in catalogue_titles}
    return sum(normalize_title(title) not in known for row in predicted_titles for title in row)
