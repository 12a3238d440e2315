"""Exact full-catalogue ranking: every item's teacher-forced log-likelihood given the prompt
and the latent thought(s) (paper Eq. 1 and Eq. 4's ``log P(y_i | x, r, y_<i)``, summed).

Each internal trie node is forwarded once per prompt, and its hidden state gives the
log-probs of all its children; an item's score is the sum along its path. Chunks of nodes
run as one sequence on the shared prompt cache with a tree-attention mask
(:func:`_tree_forwards`), or subtrees advance depth by depth on copies of the prompt cache
(:func:`_frontier_forwards`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from latentr3_fast.errors import ConfigError

from .protocol import Reasoner
from .result import BeamResult, attach_items
from .scoring import LMHead, prefill, token_logprobs
from .trie import ItemTrie

__all__ = ["exact_rank", "exact_rank_scorings"]

METHODS = ("auto", "tree", "frontier")

# expand(parent_nodes [P], hidden [B * P, d]): scores the children of those trie nodes
Expand = Callable[[np.ndarray, torch.Tensor], None]


@torch.no_grad()
def exact_rank(
    reasoner: Reasoner,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    trie: ItemTrie,
    length_penalty: float = 0.0,
    *,
    top_k: int | None = None,
    max_rows: int = 2048,
    latents: torch.Tensor | None = None,
    method: str = "auto",
) -> BeamResult:
    """Scores every item exactly (teacher forcing) and ranks the whole catalogue; see
    :func:`exact_rank_scorings` (one length penalty)."""
    return exact_rank_scorings(
        reasoner,
        prompt_ids,
        prompt_mask,
        trie,
        [length_penalty],
        top_k=top_k,
        max_rows=max_rows,
        latents=latents,
        method=method,
    )[0]


@torch.no_grad()
def exact_rank_scorings(
    reasoner: Reasoner,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    trie: ItemTrie,
    length_penalties: Sequence[float] = (0.0,),
    *,
    top_k: int | None = None,
    max_rows: int = 2048,
    latents: torch.Tensor | None = None,
    method: str = "auto",
) -> list[BeamResult]:
    """Scores every item exactly (teacher forcing) and ranks the whole catalogue.

    Each internal trie node is forwarded once per prompt and its hidden state gives the
    log-probs of all its children (log-softmax over the full vocabulary); an item's score is
    the sum along its path. Two ways to feed the nodes, same numbers:

    * ``method="tree"`` (what ``auto`` picks on sdpa/eager backbones with plain KV caches): a
      chunk of nodes (a preorder range, plus the ancestor path of its first node) is ONE
      sequence on the prompt cache, with a 4-D attention mask that lets each node see the
      prompt, the latent(s) and its own ancestors (tree attention); positions are prompt
      length + depth. The prompt cache is never copied.
    * ``method="frontier"``: subtrees advance depth by depth on copies of the prompt cache,
      one row per frontier node. ``auto`` uses it for attention backends that take no custom
      mask (flash-attention, ...) and for sliding-window caches (which drop old positions).

    ``max_rows`` bounds the rows (prompts x nodes) of one forward (in the tree method plus
    each chunk's ancestor path, at most the trie depth), so memory does not depend on the
    catalogue size beyond the ``[B, num_nodes]`` score table. In the tree method each
    node attends to the prompt plus its chunk, so smaller chunks are cheaper per node until
    the per-forward overhead dominates (CPU, CDs catalogue: 128 nodes per prompt was best).

    The summed log-probs do not depend on the length penalty, so one pass ranks the
    catalogue under every penalty given (BIGRec 1.0 and D3 0.0 at the cost of one).

    Args:
        prompt_ids, prompt_mask: ``[B, Lp]`` left-padded prompts and their mask.
        length_penalties: one ranking per value (score = sum_logp / length ** penalty).
        top_k: hypotheses returned per prompt (default: all terminal nodes).
        latents: ``[B, N, d]`` to use instead of ``reasoner.latents`` (e.g. N = 0).
        method: ``auto`` | ``tree`` | ``frontier``.
    Returns:
        one BeamResult per length penalty over terminal states, ``[B, top_k]``, best first.
    """
    if max_rows < 1:
        raise ConfigError(f"exact_rank: max_rows={max_rows} must be >= 1")
    if len(length_penalties) == 0:
        raise ConfigError("exact_rank_scorings: length_penalties is empty")
    if method not in METHODS:
        raise ConfigError(f"exact_rank: method={method!r}: expected 'auto', 'tree' or 'frontier'")
    csr = trie.to_csr()
    batch = prompt_ids.shape[0]
    scorer = _EdgeScorer(LMHead.of(reasoner), csr, batch, trie.num_nodes, prompt_ids.device)
    hidden, cache, past = prefill(reasoner, prompt_ids, prompt_mask, latents)
    scorer.expand(np.array([0]), hidden)
    tree_ok, why = _tree_supported(reasoner, cache)
    if method == "auto":
        method = "tree" if tree_ok else "frontier"
    elif method == "tree" and not tree_ok:
        raise ConfigError(f"exact_rank: method='tree' is not supported here ({why}); use 'auto'")
    budget = max(1, max_rows // max(batch, 1))
    forwards = _tree_forwards if method == "tree" else _frontier_forwards
    forwards(reasoner, csr, cache, past, budget, scorer.expand)
    return _rankings(scorer.node_logp, csr, trie, length_penalties, top_k)


class _EdgeScorer:
    """``node_logp [B, num_nodes]``: the log-prob of every trie edge (node given parent)."""

    def __init__(
        self,
        head: LMHead,
        csr: dict[str, np.ndarray],
        batch: int,
        num_nodes: int,
        device: torch.device,
    ) -> None:
        self.head = head
        self.batch = batch
        self.counts = np.diff(csr["child_offsets"])
        self.node_logp = torch.zeros((batch, num_nodes), device=device)
        self.child_offsets = torch.tensor(csr["child_offsets"], device=device)
        self.child_tokens = torch.tensor(csr["child_tokens"], device=device)
        self.child_nodes = torch.tensor(csr["child_nodes"], device=device)

    def expand(self, parent_nodes: np.ndarray, hidden: torch.Tensor) -> None:
        """``hidden [B * P, d]`` at the ``P`` parents -> node_logp of all their children."""
        device = self.node_logp.device
        width = int(self.counts[parent_nodes].max())
        parents = torch.from_numpy(parent_nodes).to(device)
        start = self.child_offsets[parents].unsqueeze(1)
        col = torch.arange(width, device=device).unsqueeze(0)
        valid = col < (self.child_offsets[parents + 1].unsqueeze(1) - start)
        edge = torch.where(valid, start + col, 0)
        tokens = torch.where(valid, self.child_tokens[edge], -1).repeat(self.batch, 1)
        children = self.child_nodes[edge]
        head = self.head
        logp = token_logprobs(
            hidden, head.weight, head.bias, tokens, shared=len(parent_nodes) == 1, scale=head.scale
        )
        logp = logp.view(self.batch, len(parent_nodes), width)
        self.node_logp[:, children[valid]] = logp[:, valid]


def _rankings(
    node_logp: torch.Tensor,
    csr: dict[str, np.ndarray],
    trie: ItemTrie,
    length_penalties: Sequence[float],
    top_k: int | None,
) -> list[BeamResult]:
    """Path sums of the edge log-probs (in place), then one top-k per length penalty."""
    device = node_logp.device
    depths = csr["depths"]
    node_sum = node_logp
    parents = torch.tensor(csr["parents"], device=device)
    for depth in range(2, int(depths.max()) + 1):  # path sums, shallow to deep
        at = torch.from_numpy(np.flatnonzero(depths == depth)).to(device)
        node_sum[:, at] += node_sum[:, parents[at]]
    terminal = np.flatnonzero(np.diff(csr["item_offsets"]) > 0)
    term_t = torch.tensor(terminal, device=device)
    lengths = torch.tensor(depths[terminal], device=device)
    sums = node_sum[:, term_t]
    k = len(terminal) if top_k is None else min(int(top_k), len(terminal))
    out = []
    for length_penalty in length_penalties:
        scores = sums / lengths.float().pow(float(length_penalty))
        top_scores, idx = torch.topk(scores, k, dim=1)
        res = BeamResult(
            states=term_t[idx],
            scores=top_scores,
            sum_logp=sums.gather(1, idx),
            lengths=lengths[idx],
        )
        out.append(attach_items(res, trie))
    return out


def _tree_supported(reasoner: Reasoner, cache: Any) -> tuple[bool, str]:
    """Tree attention needs a backend that takes a custom 4-D mask and a cache that keeps
    every position (a sliding-window layer drops old keys and cannot be cropped back)."""
    attn = str(getattr(reasoner.backbone.config, "_attn_implementation", "") or "")
    if attn not in ("sdpa", "eager"):
        return False, f"attention implementation {attn!r} takes no custom 4-D mask"
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if kinds - {"DynamicLayer"}:
        return False, f"KV cache layers {sorted(kinds)} (sliding window) drop old positions"
    return True, ""


def _chunk_context(chunk: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, int]:
    """A preorder range of nodes preceded by the ancestor path of its first node: in
    preorder, every ancestor of a node in ``[a, z)`` outside the range is an ancestor of
    ``a``. Returns ``(nodes, path length)``."""
    path = []
    node = int(parents[chunk[0]])
    while node > 0:
        path.append(node)
        node = int(parents[node])
    return np.concatenate([np.array(path[::-1], dtype=np.int64), chunk]), len(path)


def _ancestor_matrix(nodes: np.ndarray, parents: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``[m, m]`` bool: ``[i, j]`` when ``nodes[j]`` is ``nodes[i]`` or one of its ancestors.
    ``scratch``: an all -1 int array over the trie's nodes (left all -1 again)."""
    m = len(nodes)
    scratch[nodes] = np.arange(m)
    anc = np.eye(m, dtype=bool)
    rows = np.arange(m)
    cur = scratch[parents[nodes]]
    while True:  # walk up the parent chain inside the chunk
        live = cur >= 0
        if not live.any():
            break
        anc[rows[live], cur[live]] = True
        nxt = np.full(m, -1, dtype=np.int64)
        nxt[live] = scratch[parents[nodes[cur[live]]]]
        cur = nxt
    scratch[nodes] = -1
    return anc


def _tree_forwards(
    reasoner: Reasoner,
    csr: dict[str, np.ndarray],
    cache: Any,
    past: torch.Tensor,
    budget: int,
    expand: Expand,
) -> None:
    """Tree attention: internal nodes in preorder chunks of ``budget``, one forward each, on
    the prompt cache (cropped back after each)."""
    counts = np.diff(csr["child_offsets"])
    parents, parent_tokens, depths = csr["parents"], csr["parent_tokens"], csr["depths"]
    internal = np.flatnonzero(counts > 0)
    internal = internal[internal > 0]  # the root was expanded from the prefill
    device = past.device
    batch, prefix_len = past.shape
    dtype = reasoner.dtype
    neg = torch.finfo(dtype).min
    # prompt/latent part of the mask: real positions visible to every node, padding never
    prefix_add = torch.zeros((batch, prefix_len), dtype=dtype, device=device)
    prefix_add.masked_fill_(~past.bool(), neg)
    real_len = past.long().sum(-1, keepdim=True)
    scratch = np.full(len(parents), -1, dtype=np.int64)
    for a in range(0, len(internal), budget):
        chunk = internal[a : a + budget]
        nodes, path_len = _chunk_context(chunk, parents)
        m = len(nodes)
        anc = torch.from_numpy(_ancestor_matrix(nodes, parents, scratch)).to(device)
        tree_add = torch.zeros((m, m), dtype=dtype, device=device)
        tree_add.masked_fill_(~anc, neg)
        mask = torch.cat(
            [prefix_add[:, None, :].expand(batch, m, prefix_len), tree_add.expand(batch, m, m)],
            dim=-1,
        ).unsqueeze(1)  # [B, 1, m, prefix_len + m] additive
        pos = real_len + torch.from_numpy(depths[nodes] - 1).to(device)
        ids = torch.from_numpy(parent_tokens[nodes]).to(device).expand(batch, m)
        hidden = reasoner._base_forward(mask, pos, cache, input_ids=ids)
        cache.crop(-m)  # back to the prompt (transformers 5: negative = tokens to drop)
        expand(chunk, hidden[:, path_len:].reshape(batch * len(chunk), -1))


def _frontier_chunks(csr: dict[str, np.ndarray], budget: int) -> list[tuple[int, list[int], bool]]:
    """Units of work for the frontier method, ``(depth, nodes, full subtree?)``, by depth (a
    node's parent is always expanded in an earlier chunk). A subtree with more items than
    ``budget`` is split into its children (its path tokens are then re-fed once per chunk)."""
    co = csr["child_offsets"]
    counts = np.diff(co)
    depths = csr["depths"]
    leaves_below = _subtree_leaf_counts(csr)
    units: list[tuple[int, int, bool]] = []  # (depth, node, full subtree?)
    stack = [int(v) for v in csr["child_nodes"][co[0] : co[1]]]
    while stack:
        node = stack.pop()
        if counts[node] == 0:
            continue  # a leaf: its score came with its parent's expansion
        if leaves_below[node] > budget:
            units.append((int(depths[node]), node, False))
            stack.extend(int(c) for c in csr["child_nodes"][co[node] : co[node + 1]])
        else:
            units.append((int(depths[node]), node, True))
    units.sort()
    chunks: list[tuple[int, list[int], bool]] = []
    chunk_leaves = 0
    for depth, node, full in units:
        n = int(leaves_below[node]) if full else 1
        last = chunks[-1] if chunks else None
        if last is None or last[0] != depth or last[2] != full or chunk_leaves + n > budget:
            chunks.append((depth, [], full))
            chunk_leaves = 0
        chunks[-1][1].append(node)
        chunk_leaves += n
    return chunks


def _inner_children(
    frontier: np.ndarray, csr: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Children of ``frontier`` that have children, and the frontier row of each parent."""
    co = csr["child_offsets"]
    counts = np.diff(co)
    n_kids = counts[frontier]
    par = np.repeat(np.arange(len(frontier)), n_kids)
    first_edge = np.repeat(co[frontier] - np.concatenate([[0], np.cumsum(n_kids)[:-1]]), n_kids)
    kids = csr["child_nodes"][first_edge + np.arange(len(par))]
    inner = counts[kids] > 0
    return kids[inner], par[inner]


def _frontier_forwards(
    reasoner: Reasoner,
    csr: dict[str, np.ndarray],
    cache0: Any,
    past0: torch.Tensor,
    budget: int,
    expand: Expand,
) -> None:
    """Frontier expansion: chunks of subtrees advance depth by depth on copies of the prompt
    cache (one row per frontier node; row = prompt * frontier size + node)."""
    parent_tokens, parents = csr["parent_tokens"], csr["parents"]
    device = past0.device
    batch = past0.shape[0]
    for depth, nodes, full in _frontier_chunks(csr, budget):
        frontier = np.array(nodes, dtype=np.int64)
        size = len(frontier)
        path = np.empty((size, depth), dtype=np.int64)  # tokens root -> node
        cur = frontier
        for j in range(depth - 1, -1, -1):
            path[:, j] = parent_tokens[cur]
            cur = parents[cur]
        cache = reasoner.expand_cache(cache0, size)
        past = past0.repeat_interleave(size, dim=0)
        tokens = torch.tensor(path, device=device).repeat(batch, 1)
        while True:
            hidden = reasoner.forward_embeds(reasoner.embed(tokens), past, cache)[:, -1]
            past = torch.cat([past, past.new_ones(past.shape[0], tokens.shape[1])], dim=1)
            expand(frontier, hidden)
            if not full:
                break
            kids, par = _inner_children(frontier, csr)  # rows follow their parents
            if len(kids) == 0:
                break
            par_t = torch.from_numpy(par).to(device)
            rows = (torch.arange(batch, device=device).unsqueeze(1) * size + par_t).reshape(-1)
            cache.reorder_cache(rows)
            past = past.index_select(0, rows)
            frontier = kids
            size = len(frontier)
            tokens = torch.tensor(parent_tokens[frontier], device=device).repeat(batch).view(-1, 1)


def _subtree_leaf_counts(csr: dict[str, np.ndarray]) -> np.ndarray:
    """Number of terminal nodes in each node's subtree (nodes are in preorder)."""
    parents, depths = csr["parents"], csr["depths"]
    cnt = (np.diff(csr["item_offsets"]) > 0).astype(np.int64)
    for depth in range(int(depths.max()), 0, -1):  # deepest first: children before parents
        at = np.flatnonzero(depths == depth)
        np.add.at(cnt, parents[at], cnt[at])
    return cnt
