"""Ranked hypotheses of a decoding call (beam search or exact ranking), with their items."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .trie import ItemTrie

__all__ = ["BeamResult", "attach_items"]


@dataclass
class BeamResult:
    """Ranked hypotheses per prompt (best first); missing slots have state -1 / score -inf.

    Attributes:
        states: ``[B, R]`` int64 terminal trie node of each hypothesis (-1: none).
        scores: ``[B, R]`` float32 ``sum_logp / length ** length_penalty``.
        sum_logp: ``[B, R]`` float32 summed token log-probs.
        lengths: ``[B, R]`` int64 new tokens including EOS.
        item_ids: per prompt, per hypothesis the list of item ids ending at that state.
        titles: per prompt, per hypothesis the title (when the trie knows its titles).
        num_steps: decoding steps run (model forwards after the prefill; 0 for exact ranking).
    """

    states: torch.Tensor
    scores: torch.Tensor
    sum_logp: torch.Tensor
    lengths: torch.Tensor
    item_ids: list[list[list[int]]] = field(default_factory=list)
    titles: list[list[str]] | None = None
    num_steps: int = 0

    def sequences(self, trie: ItemTrie) -> list[list[list[int]]]:
        """Token ids of every hypothesis (walks the trie's parent pointers)."""
        csr = trie.to_csr()
        parents, parent_tokens = csr["parents"], csr["parent_tokens"]
        out = []
        for row in self.states.cpu().tolist():
            seqs = []
            for node in row:
                seq: list[int] = []
                while node > 0:
                    seq.append(int(parent_tokens[node]))
                    node = int(parents[node])
                seqs.append(seq[::-1])
            out.append(seqs)
        return out


def attach_items(res: BeamResult, trie: ItemTrie) -> BeamResult:
    """Fills ``res.item_ids`` (and ``res.titles`` when the trie has titles) from its states."""
    csr = trie.to_csr()
    item_offsets, ids = csr["item_offsets"], csr["item_ids"]
    titles = trie.titles
    res.item_ids = []
    res.titles = [] if titles is not None else None
    for row in res.states.cpu().tolist():
        items = [ids[item_offsets[s] : item_offsets[s + 1]].tolist() if s >= 0 else [] for s in row]
        res.item_ids.append(items)
        if res.titles is not None:
            res.titles.append([titles[it[0]] if it else "" for it in items])
    return res
