"""latentr3_fast.eval: HR/NDCG metrics, popularity groups and the evaluation loop."""

from __future__ import annotations

from .evaluate import EvalResult, evaluate, evaluate_scorings
from .metrics import (
    DEFAULT_KS,
    first_hit_rank,
    group_metrics,
    metrics_from_ranks,
    normalize_title,
    out_of_catalogue_count,
    popularity_groups,
    relative_gain,
)

__all__ = [
    "DEFAULT_KS",
    "EvalResult",
    "evaluate",
    "evaluate_scorings",
    "first_hit_rank",
    "group_metrics",
    "metrics_from_ranks",
    "normalize_title",
    "out_of_catalogue_count",
    "popularity_groups",
    "relative_gain",
]
