"""latentr3_fast.eval: HR/NDCG metrics, popularity groups and the evaluation loop."""

from __future__ import annotations

from . import metrics
from .evaluate import EvalResult, evaluate, evaluate_scorings
from .metrics import *  # noqa: F403  (the metric functions: metrics.__all__)

__all__ = ["EvalResult", "evaluate", "evaluate_scorings"]
__all__ += metrics.__all__
