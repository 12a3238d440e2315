"""Serving helpers: the cached catalogue trie and ``recommend`` (top-k items per user,
paper Sec. 4.1's top-N recommendation task)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from latentr3_fast.errors import ConfigError, DataError

from .beam import beam_search
from .exact import exact_rank_scorings
from .protocol import Reasoner
from .result import BeamResult
from .trie import ItemTrie

__all__ = ["catalogue_trie", "default_prompt_builder", "rank_batch", "recommend"]

_TRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def catalogue_trie(catalog: Any, prompt_builder: Any) -> ItemTrie:
    """The trie of ``catalog``'s target strings, built once per (catalogue, tokenizer).

    The cache lives as long as the catalogue object; a tokenizer that grew (new tokens)
    or a different target format gets a new trie.
    """
    tok = prompt_builder.tokenizer
    key = (id(tok), len(tok), type(prompt_builder).__name__, prompt_builder.target_text("x"))
    try:
        per_cat = _TRIES.setdefault(catalog, {})
    except TypeError:  # not weak-referenceable: build without caching
        return ItemTrie.from_catalog(catalog, prompt_builder)
    trie = per_cat.get(key)
    if trie is None:
        trie = per_cat[key] = ItemTrie.from_catalog(catalog, prompt_builder)
    return trie


def default_prompt_builder(reasoner: Reasoner, category: str, template: str = "reference") -> Any:
    """PromptBuilder on the reasoner's tokenizer with its number of latent slots."""
    from latentr3_fast.data import PromptBuilder

    return PromptBuilder(
        reasoner.tokenizer, category, template=template, num_latent=reasoner.num_latent
    )


def rank_batch(
    reasoner: Reasoner,
    encoded: Sequence[Any],
    trie: ItemTrie,
    *,
    k: int,
    num_beams: int,
    length_penalty: float,
    rank: str = "beam",
    backend: str = "auto",
    max_new_tokens: int = 128,
    length_penalties: Sequence[float] | None = None,
    stop_rule: str = "reference",
) -> BeamResult | list[BeamResult]:
    """Ranks the catalogue for a batch of EncodedSamples (prompt ids; targets unused).

    With ``length_penalties`` it returns one BeamResult per penalty (``length_penalty`` is
    then ignored): exact ranking scores the catalogue once for all of them, beam search
    runs once per penalty (the penalty steers the search)."""
    from latentr3_fast.data import collate

    if rank not in ("beam", "exact"):
        raise ConfigError(f"rank={rank!r}: expected 'beam' or 'exact'")
    pad = reasoner.tokenizer.pad_token_id
    batch = collate(list(encoded), pad).to(reasoner.device)
    penalties = [length_penalty] if length_penalties is None else list(length_penalties)
    if rank == "exact":
        results = exact_rank_scorings(
            reasoner, batch.prompt_ids, batch.prompt_mask, trie, penalties, top_k=k
        )
    else:
        results = [
            beam_search(
                reasoner,
                batch.prompt_ids,
                batch.prompt_mask,
                trie,
                num_beams=num_beams,
                num_return=min(k, num_beams),
                length_penalty=penalty,
                max_new_tokens=max_new_tokens,
                backend=backend,
                stop_rule=stop_rule,
            )
            for penalty in penalties
        ]
    return results if length_penalties is not None else results[0]


@torch.no_grad()
def recommend(
    reasoner: Reasoner,
    histories: Sequence[Sequence[str] | Sequence[int]],
    k: int = 10,
    *,
    catalog: Any,
    category: str | None = None,
    num_beams: int | None = None,
    length_penalty: float = 0.0,
    rank: str = "beam",
    batch_size: int = 16,
    prompt_builder: Any = None,
    backend: str = "auto",
    stop_rule: str = "reference",
    exclude_seen: bool = False,
) -> list[list[dict[str, Any]]]:
    """Top-k catalogue items per user from raw history titles (or item ids).

    Args:
        reasoner: a LatentReasoner (see :class:`~latentr3_fast.decode.protocol.Reasoner`).
        histories: per user, the history (oldest first). Each entry is an item id of
            ``catalog`` (a Python or numpy integer), a title of the catalogue, or, when the
            catalogue came from RecBole, an ``item_id`` token of its ``.inter`` file (a string
            that is not a title; a title wins when a string is both). Other strings are used
            as free-text titles.
        k: items per user. With beam search ``num_beams`` defaults to ``max(k, 10)``.
        catalog: an ItemCatalog or a RecDataset (then ``category`` defaults to its category).
        category: the category word/name used in the prompt.
        length_penalty: 0.0 (D3) or 1.0 (BIGRec); see paper Sec. 4.1.
        rank: ``"beam"`` or ``"exact"`` (full-catalogue scoring).
        stop_rule: beam stopping rule, ``"reference"`` or ``"exact"`` (see ``beam_search``).
        exclude_seen: drop items whose title is in the user's history (the reference keeps
            them); the search then looks at ``k`` + history-length more candidates.
    Returns:
        per user a list of ``{"item_ids": [...], "title": str, "score": float}``, best first
        (one entry per distinct title; items sharing a title are listed together); with a
        RecBole catalogue also ``"item_tokens"``: the RecBole ids of ``item_ids``.
    """
    items = getattr(catalog, "items", catalog)
    if category is None:
        category = getattr(catalog, "category", None)
    if prompt_builder is None:
        if category is None:
            raise ConfigError("recommend: pass category= (or a RecDataset as catalog)")
        prompt_builder = default_prompt_builder(reasoner, category)
    if k < 1:
        raise ConfigError(f"recommend: k={k} must be >= 1")
    trie = catalogue_trie(items, prompt_builder)
    titles = list(items.titles)
    tokens = getattr(items, "tokens", None)
    out: list[list[dict[str, Any]]] = []
    for start in range(0, len(histories), batch_size):
        chunk = histories[start : start + batch_size]
        encoded, seen = _encode_histories(items, chunk, start, prompt_builder, exclude_seen)
        want = k + (max(len(x) for x in seen) if exclude_seen else 0)
        beams = max(want, 10) if num_beams is None else max(int(num_beams), want)
        res = rank_batch(
            reasoner,
            encoded,
            trie,
            k=want,
            num_beams=beams,
            length_penalty=length_penalty,
            rank=rank,
            backend=backend,
            stop_rule=stop_rule,
        )
        out.extend(_recommendations(res, titles, tokens, seen, k))
    return out


def _encode_histories(
    items: Any,
    histories: Sequence[Sequence[Any]],
    start: int,
    prompt_builder: Any,
    exclude_seen: bool,
) -> tuple[list[Any], list[set[str]]]:
    """Prompts of users ``start, start + 1, ...`` and, with ``exclude_seen``, their history
    titles (else empty sets)."""
    from latentr3_fast.data import Sample

    encoded, seen = [], []
    for user, history in enumerate(histories, start=start):
        titles = tuple(history_title(items, h, f"histories[{user}]") for h in history)
        seen.append(set(titles) if exclude_seen else set())
        # a dummy target: encode() then left-truncates the prompt exactly as in training
        encoded.append(prompt_builder.encode(Sample((), titles, 0, "")))
    return encoded, seen


def _recommendations(
    res: BeamResult,
    titles: list[str],
    tokens: Sequence[str] | None,
    seen: list[set[str]],
    k: int,
) -> list[list[dict[str, Any]]]:
    """Per prompt the first ``k`` hypotheses whose title is not in ``seen``, as dicts
    (``tokens``: the catalogue's source-data item tokens, if any)."""
    scores = res.scores.float().cpu().tolist()
    out = []
    for row in range(len(seen)):
        recs: list[dict[str, Any]] = []
        for j, ids in enumerate(res.item_ids[row]):
            if not ids or titles[ids[0]] in seen[row]:
                continue
            rec = {"item_ids": ids, "title": titles[ids[0]], "score": scores[row][j]}
            if tokens is not None:
                rec["item_tokens"] = [tokens[i] for i in ids]
            recs.append(rec)
            if len(recs) == k:
                break
        out.append(recs)
    return out


def history_title(items: Any, entry: Any, where: str) -> str:
    """The title of one history entry: an item id (int or numpy integer), a catalogue title,
    a source-data token (RecBole ``item_id``) or a free-text title."""
    titles = items.titles
    if isinstance(entry, str):
        if entry in items.ids_by_title:
            return entry
        by_token = getattr(items, "id_by_token", None) or {}
        if entry in by_token:
            return titles[by_token[entry]]
        return entry
    if isinstance(entry, (int, np.integer)) and not isinstance(entry, (bool, np.bool_)):
        if 0 <= int(entry) < len(titles):
            return titles[int(entry)]
        raise DataError(f"{where}: item id {int(entry)} is outside 0..{len(titles) - 1}")
    raise DataError(
        f"{where}: {entry!r} ({type(entry).__name__}) is neither an item id, a title nor an "
        "item token"
    )
