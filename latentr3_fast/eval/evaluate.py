"""The evaluation loop: constrained decoding (or exact ranking) over a split, then metrics.

``evaluate(reasoner, dataset, split="test", num_beams=10, length_penalty=0.0, rank="beam")``
returns an :class:`EvalResult` with HR@K and NDCG@K (paper Sec. 4.1), per-popularity-group
metrics (paper Sec. 4.3.1), the out-of-catalogue count and one prediction record per row
(writable as JSON lines).
``evaluate_scorings`` does the same under several length penalties in one pass over the split.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from latentr3_fast.data import EncodedSample, ItemCatalog, PromptBuilder, RecDataset, Sample

__all__ = ["EvalResult", "eval_mode", "evaluate", "evaluate_scorings"]


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
    dataset: RecDataset,
    split: str = "test",
    num_beams: int = 10,
    length_penalty: float = 0.0,
    rank: str = "beam",
    max_samples: int | None = None,
    batch_size: int = 16,
    *,
    predictions_path: str | Path | None = None,
    **options: Any,
) -> EvalResult:
    """Evaluates ``reasoner`` on ``dataset.split(split)`` under one length penalty.

    Args:
        reasoner: a LatentReasoner (eval mode is set for the run and restored).
        dataset: a RecDataset.
        num_beams: beams (and returned hypotheses) for ``rank="beam"``.
        length_penalty: 0.0 = D3 scoring, 1.0 = BIGRec scoring (paper Sec. 4.1: the two
            LLM-based recommenders LatentR3 is applied to).
        rank: ``"beam"`` (constrained beam search over the catalogue trie, as the reference
            evaluation), ``"exact"`` (whole catalogue, any K is exact) or ``"ground"``
            (BIGRec: free generation grounded to the nearest titles).
        max_samples: evaluate only the first rows of the split.
        batch_size: prompts per decoding batch (rows are grouped by prompt length).
        predictions_path: if given, per-row predictions are written there as JSON lines.
        options: the keyword options of :func:`evaluate_scorings` (``ks``, ``top_fraction``,
            ``prompt_builder``, ``backend``, ``max_new_tokens``, ``progress``, ``stop_rule``,
            ``desc``, ``exclude_seen``), with the same defaults.
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
        predictions_paths=paths,
        **options,
    )[0]


@dataclass(frozen=True)
class _Search:
    """How rows are batched and ranked (the settings :func:`evaluate_scorings` passes down)."""

    rank: str
    num_beams: int
    num_return: int  # ranked items per row: num_beams for beam search, max(ks) otherwise
    backend: str
    max_new_tokens: int
    stop_rule: str
    batch_size: int
    exclude_seen: bool


def _check_options(
    rank: str,
    batch_size: int,
    length_penalties: Sequence[float],
    predictions_paths: Sequence[str | Path] | None,
) -> list[float]:
    """The length penalties as floats; ConfigError on an invalid option."""
    if rank not in ("beam", "exact", "ground"):
        raise ConfigError(f"rank={rank!r}: expected 'beam', 'exact' or 'ground'")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    penalties = [float(penalty) for penalty in length_penalties]
    if not penalties:
        raise ConfigError("length_penalties: give at least one value")
    if predictions_paths is not None and len(predictions_paths) != len(penalties):
        raise ConfigError(
            f"predictions_paths: {len(predictions_paths)} paths for {len(penalties)} "
            "length penalties"
        )
    return penalties


def _rank_batch(
    reasoner: Any,
    batch: list[EncodedSample],
    trie: Any,
    title_index: Any,
    penalties: list[float],
    search: _Search,
) -> list[Any]:
    """One ranked result (``item_ids``, ``scores`` per row) per length penalty for a batch."""
    from latentr3_fast.decode.recommend import rank_batch

    if title_index is not None:
        from latentr3_fast.decode.grounding import ground_batch

        grounded = ground_batch(reasoner, batch, title_index, search.num_return)
        return [grounded] * len(penalties)  # the length penalty plays no part in grounding
    return rank_batch(
        reasoner,
        batch,
        trie,
        k=search.num_return,
        num_beams=search.num_beams,
        length_penalty=penalties[0],
        rank=search.rank,
        backend=search.backend,
        max_new_tokens=search.max_new_tokens,
        length_penalties=penalties,
        stop_rule=search.stop_rule,
    )


def _predict(
    reasoner: Any,
    dataset: RecDataset,
    samples: list[Sample],
    prompt_builder: PromptBuilder,
    penalties: list[float],
    search: _Search,
    bar: Any,
) -> list[list[dict[str, Any] | None]]:
    """Prediction records per length penalty, one per row of ``samples`` (in row order)."""
    from latentr3_fast.decode.recommend import catalogue_trie

    trie = catalogue_trie(dataset.items, prompt_builder)
    encoded = prompt_builder.encode_many(samples)
    # group by prompt length: less padding, identical results (positions ignore padding)
    order = np.argsort([len(e.prompt_ids) for e in encoded], kind="stable")
    predictions: list[list[dict[str, Any] | None]] = [[None] * len(samples) for _ in penalties]
    title_index = None
    if search.rank == "ground":  # BIGRec: free generation grounded by title embeddings
        from latentr3_fast.decode.grounding import TitleIndex

        title_index = TitleIndex(reasoner, list(dataset.items.titles))
    for first in range(0, len(order), search.batch_size):
        rows = order[first : first + search.batch_size].tolist()
        batch = [encoded[i] for i in rows]
        results = _rank_batch(reasoner, batch, trie, title_index, penalties, search)
        for records, result in zip(predictions, results):
            _record_rows(records, result, rows, samples, dataset.items, search.exclude_seen)
        if bar is not None:
            bar.update(len(rows))
    return predictions


def _result(
    records: list[dict[str, Any] | None],
    is_popular: Any,
    titles: list[str],
    search: _Search,
    ks: tuple[int, ...],
    settings: dict[str, Any],
) -> EvalResult:
    """Metrics (all rows, popularity groups, out-of-catalogue) of one penalty's records."""
    rows: list[dict[str, Any]] = [p for p in records if p is not None]
    ranks = [p["rank"] for p in rows]
    # K beyond the ranked list would silently equal the largest reachable K: omit it.
    # Beam search ranks num_beams per row; exact/grounded ranking at most the catalogue
    num_ranked = search.num_return
    if search.rank != "beam" and rows:
        num_ranked = min(search.num_return, max(len(p["pred_titles"]) for p in rows))
    reachable_ks = tuple(k for k in ks if k <= num_ranked)
    groups = group_metrics(ranks, [p["target_id"] for p in rows], is_popular, reachable_ks)
    metrics: dict[str, Any] = dict(groups["all"])
    metrics["groups"] = {"popular": groups["popular"], "unpopular": groups["unpopular"]}
    metrics["out_of_catalogue"] = out_of_catalogue_count((p["pred_titles"] for p in rows), titles)
    metrics["num_returned"] = num_ranked
    metrics["ks_beyond_returned"] = [k for k in ks if k > num_ranked]
    metrics.update(settings)
    return EvalResult(metrics=metrics, predictions=rows)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` for the block; the previous train/eval mode is restored after it
    (also used by the swap test)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _progress_bar(show: bool, total: int, label: str) -> Iterator[Any]:
    """A tqdm bar over ``total`` rows (None when ``show`` is false), closed after the block."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def evaluate_scorings(
    reasoner: Any,
    dataset: RecDataset,
    length_penalties: Sequence[float],
    split: str = "test",
    num_beams: int = 10,
    rank: str = "beam",
    max_samples: int | None = None,
    batch_size: int = 16,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    top_fraction: float = 0.2,
    prompt_builder: PromptBuilder | None = None,
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
        ks: metric cut-offs (HR@K, NDCG@K; paper Sec. 4.1 uses 5 and 10). A K larger than
            the number of ranked items per row (``num_beams`` with beam search) is not
            reported (HR@20 with 10 beams would only repeat HR@10); those K are listed in
            ``metrics["ks_beyond_returned"]``.
        top_fraction: share of items that are "popular" by train-target frequency (paper
            App. D: the top 20 %).
        prompt_builder: default: the reasoner's own prompt format for ``dataset.category``.
        backend: beam-search backend (see ``decode.beam_search``).
        max_new_tokens: longest generated title.
        predictions_paths: one JSON-lines path per penalty (or None). When the catalogue has
            source ids (RecBole tokens) the records also carry ``target_token`` and
            ``pred_item_tokens``.
        progress: show a progress bar.
        stop_rule: beam stopping rule: ``"reference"`` (HF ``generate``'s default, what the
            reference evaluation ran) or ``"exact"`` (see ``decode.beam_search``).
        desc: progress-bar label (e.g. the model's name).
        exclude_seen: drop predictions whose title is in the row's history before ranking
            (the reference keeps them; with beam search fewer than ``num_beams`` may remain).
        Others: as for :func:`evaluate`.
    """
    from latentr3_fast.decode.recommend import default_prompt_builder

    penalties = _check_options(rank, batch_size, length_penalties, predictions_paths)
    samples = list(dataset.split(split))
    if max_samples is not None:
        samples = samples[: int(max_samples)]
    prompt_builder = prompt_builder or default_prompt_builder(reasoner, dataset.category)
    search = _Search(
        rank=rank,
        num_beams=num_beams,
        num_return=num_beams if rank == "beam" else max(ks),
        backend=backend,
        max_new_tokens=max_new_tokens,
        stop_rule=stop_rule,
        batch_size=batch_size,
        exclude_seen=exclude_seen,
    )
    label = f"eval {desc} {split} ({rank})" if desc else f"eval {split} ({rank})"
    with eval_mode(reasoner), _progress_bar(progress, len(samples), label) as bar:
        predictions = _predict(reasoner, dataset, samples, prompt_builder, penalties, search, bar)

    is_popular = popularity_groups(dataset.popularity, top_fraction)
    titles = list(dataset.items.titles)
    reported = {"split": split, "rank": rank, "num_beams": num_beams if rank == "beam" else None}
    results = []
    for j, penalty in enumerate(penalties):
        settings = {**reported, "length_penalty": penalty, "top_fraction": top_fraction}
        result = _result(predictions[j], is_popular, titles, search, ks, settings)
        if predictions_paths is not None:
            result.to_jsonl(predictions_paths[j])
        results.append(result)
    return results


def _record_rows(
    predictions: list[dict[str, Any] | None],
    result: Any,
    rows: list[int],
    samples: list[Sample],
    items: ItemCatalog,
    exclude_seen: bool = False,
) -> None:
    """Fills ``predictions[i]`` for the rows ``rows`` of ``samples`` from one ranked batch.

    ``result.item_ids[b]`` lists the b-th row's hypotheses best first, each as the ids of the
    items with that title (empty: no item); ``result.scores`` is ``[B, num_hypotheses]``.
    """
    scores = result.scores.float().cpu().tolist()
    titles = items.titles
    tokens = getattr(items, "tokens", None)
    for position, i in enumerate(rows):
        sample = samples[i]
        kept = [
            (item, score)
            for item, score in zip(result.item_ids[position], scores[position])
            if item
        ]
        if exclude_seen:
            seen = set(sample.history_titles)
            kept = [(item, score) for item, score in kept if titles[item[0]] not in seen]
        item_ids = [item for item, _ in kept]
        pred_titles = [titles[item[0]] for item in item_ids]
        predictions[i] = {
            "row": i,
            "user_id": sample.user_id,
            "target_id": sample.target_id,
            "target_title": sample.target_title,
            "rank": first_hit_rank(pred_titles, sample.target_title),
            "pred_titles": pred_titles,
            "pred_item_ids": item_ids,
            "scores": [score for _, score in kept],
        }
        if tokens is not None:  # the source data's own ids (RecBole item_id tokens)
            predictions[i]["target_token"] = tokens[sample.target_id]
            predictions[i]["pred_item_tokens"] = [[tokens[t] for t in item] for item in item_ids]
