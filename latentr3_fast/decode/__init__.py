"""latentr3_fast.decode: the item trie (C++ core) and catalogue-constrained decoding.

Modules: ``trie`` (ItemTrie / DeviceTrie), ``beam`` (constrained beam search), ``exact``
(full-catalogue ranking), ``scoring`` (prefill and next-token log-probs both use),
``result`` (BeamResult), ``recommend`` (serving), ``grounding`` (BIGRec's L2 grounding),
``protocol`` (the Reasoner type decode needs).
"""

from __future__ import annotations

from .beam import STOP_RULES, beam_search, resolve_backend
from .exact import exact_rank, exact_rank_scorings
from .protocol import Reasoner
from .recommend import catalogue_trie, recommend
from .result import BeamResult
from .trie import DeviceTrie, ItemTrie

__all__ = [
    "STOP_RULES",
    "BeamResult",
    "DeviceTrie",
    "ItemTrie",
    "Reasoner",
    "beam_search",
    "catalogue_trie",
    "exact_rank",
    "exact_rank_scorings",
    "recommend",
    "resolve_backend",
]
