"""The evaluation loop: constrained decoding (or exact ranking) over a split, then metrics.

``evaluate(reasoner, dataset, split="test", num_beams=10, length_penalty=0.0, rank="beam")``
returns an :class:`EvalResult` with the SPEC section 6 metrics, per-popularity-group metrics,
the out-of-catalogue count and one prediction record per row (writable as JSON lines).
``evaluate_scorings`` does the same under several length penalties in one pass over the split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentr3_fast.errors import ConfigError

from .metrics import (
    DEFAULT_KS,
    first_hit_rank,
    group_metrics,
    out_of_catalogue_count,
    popularity_groups,
)

__all__ = ["EvalResult", "evaluate", "evaluate_scorings"]


@dataclass
class EvalResult:
    """Metrics and per-row predictions of one evaluation run.

    ``metrics`` holds ``HR@K``/``NDCG@K``/``n`` for all rows plus ``groups`` (popular /
    unpopular), ``out_of_catalogue``, ``num_returned`` and the settings used.
    """

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_jsonl(self, path: str | Path) -> Path:
        """Writes one JSON object per row; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row in self.predictions:
                f.write(json.dumps(row) + "\n")
        return path


@torch.no_grad()
def evaluate(
    reasoner: Any,
    dataset: Any,
    split: str = "test",
    num_beams: int = 10,
    length_penalty: float = 0.0,
    rank: str = "beam",
    max_samples: int | None = None,
    batch_size: int = 16,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    top_fraction: float = 0.2,
    prompt_builder: Any = None,
    backend: str = "auto",
    max_new_tokens: int = 128,
    predictions_path: str | Path | None = None,
    progress: bool = True,
    stop_rule: str = "reference",
) -> EvalResult:
    """Evaluates ``reasoner`` on ``dataset.split(split)``.

    Args:
        reasoner: a LatentReasoner (eval mode is set for the run and restored).
        dataset: a RecDataset.
        num_beams: beams (and returned hypotheses) for ``rank="beam"``.
        length_penalty: 0.0 = D3 scoring, 1.0 = BIGRec scoring.
        rank: ``"beam"`` (SPEC protocol) or ``"exact"`` (whole catalogue, any K is exact).
        max_samples: evaluate only the first rows of the split.
        batch_size: prompts per decoding batch (rows are grouped by prompt length).
        ks: metric cut-offs. A K larger than the number of ranked items per row
            (``num_beams`` with beam search) is not reported (HR@20 with 10 beams would only
            repeat HR@10); those K are listed in ``metrics["ks_beyond_returned"]``.
        top_fraction: share of items that are "popular" (by train-target frequency).
        predictions_path: if given, per-row predictions are written there as JSON lines.
        stop_rule: beam stopping rule: ``"reference"`` (HF ``generate``'s default, what the
            reference evaluation ran) or ``"exact"`` (see ``decode.beam_search``).
    Returns:
        EvalResult.
    """
    paths = None if predictions_path is None else [predictions_path]
    return evaluate_scorings(
        reasoner,
        dataset,
        [length_penalty],
        split=split,
        num_beams=num_beams,
        rank=rank,
        max_samples=max_samples,
        batch_size=batch_size,
        ks=ks,
        top_fraction=top_fraction,
        prompt_builder=prompt_builder,
        backend=backend,
        max_new_tokens=max_new_tokens,
        predictions_paths=paths,
        progress=progress,
        stop_rule=stop_rule,
    )[0]


def evaluate_scorings(
    reasoner: Any,
    dataset: Any,
    length_penalties: Sequence[float],
    split: str = "test",
    num_beams: int = 10,
    rank: str = "beam",
    max_samples: int | None = None,
    batch_size: int = 16,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    top_fraction: float = 0.2,
    prompt_builder: Any = None,
    backend: str = "auto",
    max_new_tokens: int = 128,
    predictions_paths: Sequence[str | Path] | None = None,
    progress: bool = True,
    stop_rule: str = "reference",
    desc: str | None = None,
    exclude_seen: bool = False,
) -> list[EvalResult]:
    """:func:`evaluate` under several length penalties (one EvalResult each, same order).

    With ``rank="exact"`` every prompt is scored once and ranked under all penalties (the
    summed log-probs do not depend on the penalty); grounding also runs once; beam search
    runs once per penalty, since the penalty steers the search.

    Args:
        predictions_paths: one JSON-lines path per penalty (or None). When the catalogue has
            source ids (RecBole tokens) the records also carry ``target_token`` and
            ``pred_item_tokens``.
        desc: progress-bar label (e.g. the model's name).
        exclude_seen: drop predictions whose title is in the row's history before ranking
            (the reference keeps them; with beam search fewer than ``num_beams`` may remain).
    """
    from latentr3_fast.decode.recommend import (
        catalogue_trie,
        default_prompt_builder,
        rank_batch,
    )

    if rank not in ("beam", "exact", "ground"):
        raise ConfigError(f"rank={rank!r}: expected 'beam', 'exact' or 'ground'")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    lps = [float(lp) for lp in length_penalties]
    if not lps:
        raise ConfigError("length_penalties: give at least one value")
    if predictions_paths is not None and len(predictions_paths) != len(lps):
        raise ConfigError(
            f"predictions_paths: {len(predictions_paths)} paths for {len(lps)} length penalties"
        )
    samples = list(dataset.split(split))
    if max_samples is not None:
        samples = samples[: int(max_samples)]
    pb = prompt_builder or default_prompt_builder(reasoner, dataset.category)
    trie = catalogue_trie(dataset.items, pb)
    n_return = num_beams if rank == "beam" else max(ks)
    encoded = pb.encode_many(samples)
    # group by prompt length: less padding, identical results (positions ignore padding)
    order = np.argsort([len(e.prompt_ids) for e in encoded], kind="stable")
    titles = list(dataset.items.titles)
    preds: list[list[dict[str, Any] | None]] = [[None] * len(samples) for _ in lps]
    was_training = reasoner.training
    reasoner.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        label = f"eval {desc} {split} ({rank})" if desc else f"eval {split} ({rank})"
        bar = tqdm(total=len(samples), desc=label, leave=False)
    try:
        index = None
        if rank == "ground":  # BIGRec: free generation grounded by title embeddings
            from latentr3_fast.decode.grounding import TitleIndex

            index = TitleIndex(reasoner, titles)
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size].tolist()
            if index is not None:
                from latentr3_fast.decode.grounding import ground_batch

                res = ground_batch(reasoner, [encoded[i] for i in idx], index, n_return)
                results = [res] * len(lps)  # the length penalty plays no part in grounding
            else:
                results = rank_batch(
                    reasoner,
                    [encoded[i] for i in idx],
                    trie,
                    k=n_return,
                    num_beams=num_beams,
                    length_penalty=lps[0],
                    rank=rank,
                    backend=backend,
                    max_new_tokens=max_new_tokens,
                    length_penalties=lps,
                    stop_rule=stop_rule,
                )
            for j, res in enumerate(results):
                _record_rows(preds[j], res, idx, samples, titles, exclude_seen, dataset.items)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        reasoner.train(was_training)

    is_pop = popularity_groups(dataset.popularity, top_fraction)
    out = []
    for j, lp in enumerate(lps):
        rows: list[dict[str, Any]] = [p for p in preds[j] if p is not None]
        ranks = [p["rank"] for p in rows]
        # K beyond the ranked list would silently equal the largest reachable K: omit it.
        # Beam search ranks num_beams per row; exact/grounded ranking at most the catalogue
        n_ranked = n_return
        if rank != "beam" and rows:
            n_ranked = min(n_return, max(len(p["pred_titles"]) for p in rows))
        ks_ok = tuple(k for k in ks if k <= n_ranked)
        groups = group_metrics(ranks, [p["target_id"] for p in rows], is_pop, ks_ok)
        metrics: dict[str, Any] = dict(groups["all"])
        metrics["groups"] = {"popular": groups["popular"], "unpopular": groups["unpopular"]}
        metrics["out_of_catalogue"] = out_of_catalogue_count(
            (p["pred_titles"] for p in rows), titles
        )
        metrics["num_returned"] = n_ranked
        metrics["ks_beyond_returned"] = [k for k in ks if k > n_ranked]
        metrics.update(
            split=split,
            rank=rank,
            num_beams=num_beams if rank == "beam" else None,
            length_penalty=lp,
            top_fraction=top_fraction,
        )
        result = EvalResult(metrics=metrics, predictions=rows)
        if predictions_paths is not None:
            result.to_jsonl(predictions_paths[j])
        out.append(result)
    return out


def _record_rows(
    preds: list,
    res: Any,
    idx: list[int],
    samples: list,
    titles: list,
    exclude_seen: bool = False,
    items: Any = None,
) -> None:
    """Per-row prediction records of one ranked batch (rows ``idx`` of ``samples``)."""
    scores = res.scores.float().cpu().tolist()
    tokens = getattr(items, "tokens", None)
    for row, i in enumerate(idx):
        s = samples[i]
        kept = [(it, sc) for it, sc in zip(res.item_ids[row], scores[row]) if it]
        if exclude_seen:
            seen = set(s.history_titles)
            kept = [(it, sc) for it, sc in kept if titles[it[0]] not in seen]
        ids = [it for it, _ in kept]
        pred_titles = [titles[it[0]] for it in ids]
        preds[i] = {
            "row": i,
            "user_id": s.user_id,
            "target_id": s.target_id,
            "target_title": s.target_title,
            "rank": first_hit_rank(pred_titles, s.target_title),
            "pred_titles": pred_titles,
            "pred_item_ids": ids,
            "scores": [sc for _, sc in kept],
        }
        if tokens is not None:  # the source data's own ids (RecBole item_id tokens)
            preds[i]["target_token"] = tokens[s.target_id]
            preds[i]["pred_item_tokens"] = [[tokens[t] for t in it] for it in ids]
