"""latentr3_fast.decode: the item trie (C++ core) and catalogue-constrained decoding."""

from __future__ import annotations

from .beam import (
    STOP_RULES,
    BeamResult,
    beam_search,
    exact_rank,
    exact_rank_scorings,
    resolve_backend,
)
from .recommend import catalogue_trie, recommend
from .trie import DeviceTrie, ItemTrie

__all__ = [
    "STOP_RULES",
    "BeamResult",
    "DeviceTrie",
    "ItemTrie",
    "beam_search",
    "catalogue_trie",
    "exact_rank",
    "exact_rank_scorings",
    "recommend",
    "resolve_backend",
]
