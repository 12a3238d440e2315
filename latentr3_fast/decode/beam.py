"""Catalogue-constrained beam search (the generative ranking of BIGRec and D3, paper Sec. 4.1).

The search runs as named steps, in the style of Hugging Face ``generate``'s beam search:

1. :func:`prefill`: one prompt forward, the latent(s) ``r`` and one forward of ``r`` in the
   thought slot (paper Eq. 1); the hidden state there predicts the first title token. The KV
   cache is expanded to ``num_beams`` rows per prompt only after the first step.
2. :func:`_score_candidates`: the trie gives the allowed tokens of every live beam as a padded
   ``[rows, width]`` block (``width`` = widest trie node at this depth, known in advance);
   only their log-probs (log-softmax over the full vocabulary, NOT renormalized) are gathered,
   and one ``topk`` over ``[prompt, beam * width]`` picks ``2 * num_beams`` candidates. No
   Python loop over beams.
3. :func:`_merge_finished`: finished candidates among the first ``num_beams`` enter the
   finished pool with score ``sum(logp) / len ** length_penalty`` (len = new tokens incl. EOS).
4. :func:`_select_running`: the best ``num_beams`` unfinished candidates continue.
5. :func:`_close_prompts`: a prompt closes once its best live beam cannot enter its top
   ``num_beams`` finished under the stopping rule; a closed prompt accepts no new finished
   hypotheses, and the search ends when every prompt is closed or no beam is alive.
   ``stop_rule="reference"`` (default) is what the reference evaluation ran, HF
   ``generate``'s default ``early_stopping=False``: the best live score is divided by the
   CURRENT length ** length_penalty. With ``length_penalty > 0`` that is a heuristic (a longer
   hypothesis may still have scored higher). ``stop_rule="exact"`` (HF's
   ``early_stopping="never"``) divides by the maximum length instead, a true bound: the result
   equals running every beam to the end. At ``length_penalty == 0`` both rules are the same.
6. :func:`_advance`: the surviving beams' caches are reordered and their last tokens fed.

``backend="host"`` asks the C++ trie for the allowed block (one host round trip per step);
``backend="device"`` uses :class:`DeviceTrie` tensors (no host round trip). Both feed the same
tensors to the same code, so the results are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latentr3_fast.errors import ConfigError

from .protocol import Reasoner
from .result import BeamResult, attach_items
from .scoring import NEG_INF, LMHead, prefill, token_logprobs
from .trie import DeviceTrie, ItemTrie

__all__ = ["STOP_RULES", "beam_search", "resolve_backend"]

# "reference" = HF generate's default early_stopping=False; "exact" = early_stopping="never"
STOP_RULES = ("reference", "exact")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``device`` on accelerators (no host sync per step), ``host`` on CPU."""
    if backend == "auto":
        return "host" if device.type == "cpu" else "device"
    if backend not in ("host", "device"):
        raise ConfigError(f"backend={backend!r}: expected 'auto', 'host' or 'device'")
    return backend


def _depth_width(trie: ItemTrie) -> list[int]:
    """Per depth, the most children of any node there (the allowed block's width)."""
    cached = getattr(trie, "_depth_width", None)
    if cached is None:
        csr = trie.to_csr()
        width = np.zeros(trie.max_depth + 1, dtype=np.int64)
        np.maximum.at(width, csr["depths"], np.diff(csr["child_offsets"]))
        cached = width.tolist()
        trie._depth_width = cached
    return cached


def _sink_state(trie: ItemTrie) -> int:
    """A leaf (no children): dead beams sit there, so their allowed block is empty."""
    cached = getattr(trie, "_sink", None)
    if cached is None:
        counts = np.diff(trie.to_csr()["child_offsets"])
        cached = int(np.flatnonzero(counts == 0)[0])
        trie._sink = cached
    return cached


class _Allowed:
    """Padded allowed-token blocks from the C++ trie (host) or the DeviceTrie (device)."""

    def __init__(self, trie: ItemTrie, backend: str, device: torch.device) -> None:
        self.trie = trie
        self.backend = backend
        self.device = device
        self.dtrie: DeviceTrie | None = trie.to_device(device) if backend == "device" else None
        self.width = _depth_width(trie)
        self.sink = _sink_state(trie)
        # per node: is it a leaf (no children)? used to finish beams that cannot continue
        cache = trie.__dict__.setdefault("_leaf_by_device", {})
        key = str(device)
        if key not in cache:
            leaf = np.diff(trie.to_csr()["child_offsets"]) == 0
            cache[key] = torch.from_numpy(leaf).to(device)
        self.leaf = cache[key]

    def block(self, states: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """states [R] (all at ``depth``) -> (tokens [R, W], children [R, W]), -1 padded."""
        width = self.width[depth] if depth < len(self.width) else 0
        if self.dtrie is not None:
            return self.dtrie.allowed_padded(states, width)
        tok, child = self.trie.allowed_padded(states.cpu().numpy(), width)
        return (
            torch.from_numpy(tok).to(self.device, non_blocking=True),
            torch.from_numpy(child).to(self.device, non_blocking=True),
        )


@dataclass
class _Beams:
    """Search state, ``[B, K]`` each: K running beams and the K best finished hypotheses."""

    run_score: torch.Tensor  # summed log-prob of a running beam (-inf: dead)
    run_state: torch.Tensor  # its trie node
    run_token: torch.Tensor  # its last token
    fin_score: torch.Tensor  # sum_logp / length ** length_penalty, best first
    fin_sum: torch.Tensor
    fin_state: torch.Tensor  # -1: empty slot
    fin_len: torch.Tensor
    # [B, 1] can a live beam still enter the finished top K? (HF's sticky
    # "is_early_stop_heuristic_unsatisfied"; a closed prompt takes no new finished hypotheses)
    open_: torch.Tensor

    @classmethod
    def empty(cls, batch: int, num_beams: int, sink: int, device: torch.device) -> _Beams:
        shape = (batch, num_beams)
        return cls(
            run_score=torch.full(shape, NEG_INF, device=device),
            run_state=torch.full(shape, sink, dtype=torch.long, device=device),
            run_token=torch.zeros(shape, dtype=torch.long, device=device),
            fin_score=torch.full(shape, NEG_INF, device=device),
            fin_sum=torch.full(shape, NEG_INF, device=device),
            fin_state=torch.full(shape, -1, dtype=torch.long, device=device),
            fin_len=torch.zeros(shape, dtype=torch.long, device=device),
            open_=torch.ones((batch, 1), dtype=torch.bool, device=device),
        )


@dataclass
class _Candidates:
    """The ``2 K`` best extensions per prompt, ``[B, C]`` each, best first."""

    score: torch.Tensor  # summed log-prob
    beam: torch.Tensor  # the beam it extends
    token: torch.Tensor
    child: torch.Tensor  # trie node after ``token``
    valid: torch.Tensor  # finite score
    done: torch.Tensor  # EOS or a trie leaf: the hypothesis is complete


def _check_beam_args(
    num_beams: int, num_return: int | None, max_new_tokens: int, stop_rule: str
) -> int:
    """Returns ``num_return`` (default ``num_beams``)."""
    if stop_rule not in STOP_RULES:
        raise ConfigError(f"stop_rule={stop_rule!r}: expected one of {STOP_RULES}")
    if num_beams < 1:
        raise ConfigError(f"num_beams={num_beams}: must be >= 1")
    num_return = num_beams if num_return is None else int(num_return)
    if not 1 <= num_return <= num_beams:
        raise ConfigError(f"num_return={num_return}: must be in [1, num_beams={num_beams}]")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    return num_return


def _score_candidates(
    hidden: torch.Tensor,
    head: LMHead,
    allowed: _Allowed,
    beams: _Beams,
    depth: int,
    eos_token_id: int,
) -> _Candidates | None:
    """Every allowed extension of every live beam, scored; keeps the best ``2 K`` per prompt.

    At depth 0 there is one row per prompt, at the root (= HF's "only beam 0 is live" first
    step). Returns None when no beam has an allowed token."""
    batch, num_beams = beams.run_score.shape
    if depth == 0:
        states = torch.zeros((batch, 1), dtype=torch.long, device=hidden.device)
        base = torch.zeros((batch, 1), device=hidden.device)
    else:
        states, base = beams.run_state, beams.run_score
    rows = states.shape[1]
    tokens, children = allowed.block(states.reshape(-1), depth)
    width = tokens.shape[1]
    if width == 0:
        return None
    logp = token_logprobs(
        hidden, head.weight, head.bias, tokens, shared=depth == 0, scale=head.scale
    )
    logp = logp.view(batch, rows, width)
    cand = (base.unsqueeze(-1) + logp).view(batch, rows * width)
    n_top = min(2 * num_beams, rows * width)
    score, idx = torch.topk(cand, n_top, dim=1)  # sorted, best first
    token = tokens.view(batch, rows * width).gather(1, idx)
    child = children.view(batch, rows * width).gather(1, idx)
    valid = torch.isfinite(score)
    done = valid & ((token == eos_token_id) | allowed.leaf[child.clamp(min=0)])
    beam = torch.div(idx, width, rounding_mode="floor")
    return _Candidates(score, beam, token, child, valid, done)


def _merge_finished(beams: _Beams, cand: _Candidates, length: int, length_penalty: float):
    """Finished candidates among the first K (as ``generate`` does) of still-open prompts
    join the finished pool, which keeps its best K by ``sum_logp / length ** length_penalty``."""
    num_beams = beams.fin_score.shape[1]
    n_top = cand.score.shape[1]
    rank_ok = torch.arange(n_top, device=cand.score.device).unsqueeze(0) < num_beams
    new_fin = cand.done & rank_ok & beams.open_
    norm = float(length) ** length_penalty
    cand_fin_score = torch.where(new_fin, cand.score / norm, NEG_INF)
    m_score = torch.cat([beams.fin_score, cand_fin_score], dim=1)
    m_sum = torch.cat([beams.fin_sum, torch.where(new_fin, cand.score, NEG_INF)], dim=1)
    m_state = torch.cat([beams.fin_state, torch.where(new_fin, cand.child, -1)], dim=1)
    m_len = torch.cat([beams.fin_len, torch.full_like(cand.child, length)], dim=1)
    keep = torch.topk(m_score, num_beams, dim=1).indices
    beams.fin_score, beams.fin_sum = m_score.gather(1, keep), m_sum.gather(1, keep)
    beams.fin_state, beams.fin_len = m_state.gather(1, keep), m_len.gather(1, keep)


def _select_running(beams: _Beams, cand: _Candidates, sink: int) -> torch.Tensor:
    """The best K unfinished candidates continue; returns their parent beams ``[B, K]``."""
    num_beams = beams.run_score.shape[1]
    run_cand = torch.where(cand.valid & ~cand.done, cand.score, NEG_INF)
    beam, token, child = cand.beam, cand.token, cand.child
    n_top = run_cand.shape[1]
    if n_top < num_beams:
        pad = num_beams - n_top
        run_cand = F.pad(run_cand, (0, pad), value=NEG_INF)
        beam, token = F.pad(beam, (0, pad)), F.pad(token, (0, pad))
        child = F.pad(child, (0, pad), value=-1)
    sel = torch.topk(run_cand, num_beams, dim=1).indices
    beams.run_score = run_cand.gather(1, sel)
    alive = torch.isfinite(beams.run_score)
    beams.run_state = torch.where(alive, child.gather(1, sel), sink)
    beams.run_token = torch.where(alive, token.gather(1, sel), 0)
    return beam.gather(1, sel)


def _close_prompts(
    beams: _Beams, length: int, max_len: int, length_penalty: float, stop_rule: str
) -> bool:
    """Closes the prompts whose live beams cannot make the finished top K (``worst`` is -inf
    until K hypotheses have finished); returns whether any prompt is still open."""
    best_run = beams.run_score[:, 0]
    if stop_rule == "reference":
        denom = float(length) ** length_penalty  # the current length: HF's heuristic
    elif length_penalty > 0:
        denom = float(max_len) ** length_penalty  # scores only fall, the divisor grows to this
    else:
        denom = float(length + 1) ** length_penalty  # every later hypothesis is this long
    worst = beams.fin_score[:, -1]
    can_improve = torch.isfinite(best_run) & (best_run / denom > worst)
    beams.open_ = beams.open_ & can_improve.unsqueeze(1)
    return bool(beams.open_.any())


@dataclass
class _Decoder:
    """The model side of the search: KV cache and mask of the ``B * K`` beam rows."""

    reasoner: Reasoner
    cache: Any
    past: torch.Tensor  # [rows, P] mask of the cached positions
    shared_len: int = 0  # prompt + latents: identical in all beams of a prompt

    def advance(self, beams: _Beams, parent: torch.Tensor, depth: int) -> torch.Tensor:
        """Reorders the cache to the surviving beams (after the first step: expands it to K
        rows per prompt), feeds their last tokens; returns the next hidden ``[B * K, d]``."""
        batch, num_beams = parent.shape
        if depth == 0:
            self.cache = self.reasoner.expand_cache(self.cache, num_beams)
            self.past = self.past.repeat_interleave(num_beams, dim=0)
            self.shared_len = self.past.shape[1]
        else:
            prompts = torch.arange(batch, device=parent.device)
            rows = (prompts.unsqueeze(1) * num_beams + parent).reshape(-1)
            _reorder_suffix(self.cache, rows, self.shared_len)
            self.past = self.past.index_select(0, rows)
        emb = self.reasoner.embed(beams.run_token.reshape(-1, 1))
        hidden = self.reasoner.forward_embeds(emb, self.past, self.cache)[:, -1]
        self.past = torch.cat([self.past, self.past.new_ones(batch * num_beams, 1)], dim=1)
        return hidden


@torch.no_grad()
def beam_search(
    reasoner: Reasoner,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    trie: ItemTrie,
    num_beams: int = 10,
    num_return: int | None = None,
    length_penalty: float = 0.0,
    max_new_tokens: int = 128,
    eos_token_id: int | None = None,
    backend: str = "auto",
    latents: torch.Tensor | None = None,
    stop_rule: str = "reference",
) -> BeamResult:
    """Constrained beam search over the catalogue trie (see the module docstring).

    Args:
        reasoner: a LatentReasoner (see :class:`~latentr3_fast.decode.protocol.Reasoner`).
        prompt_ids, prompt_mask: ``[B, Lp]`` left-padded prompts and their mask.
        trie: the catalogue trie (sequences end with EOS).
        num_beams: K.
        num_return: hypotheses returned per prompt (default K, at most K).
        length_penalty: 0.0 = D3 (raw sum), 1.0 = BIGRec (paper Sec. 4.1).
        max_new_tokens: generation cap (new tokens incl. EOS).
        eos_token_id: a candidate with this token finishes (default the tokenizer's EOS);
            reaching a trie leaf also finishes.
        backend: ``auto`` | ``host`` (C++ trie) | ``device`` (DeviceTrie).
        latents: ``[B, N, d]`` to use instead of ``reasoner.latents`` (e.g. N = 0).
        stop_rule: ``"reference"`` (HF ``generate``'s default ``early_stopping=False``: the
            bound on a live beam uses the current length; what the reference evaluation
            ran) or ``"exact"`` (HF ``early_stopping="never"``: the bound uses the maximum
            length, so the result equals an unpruned search). They differ only when
            ``length_penalty > 0``; see the module docstring.
    Returns:
        BeamResult with ``[B, num_return]`` tensors, best first.
    """
    num_return = _check_beam_args(num_beams, num_return, max_new_tokens, stop_rule)
    if eos_token_id is None:
        eos_token_id = int(reasoner.tokenizer.eos_token_id)
    device = prompt_ids.device
    allowed = _Allowed(trie, resolve_backend(backend, device), device)
    head = LMHead.of(reasoner)
    length_penalty = float(length_penalty)
    max_len = min(int(max_new_tokens), trie.max_depth)

    hidden, cache, past = prefill(reasoner, prompt_ids, prompt_mask, latents)
    decoder = _Decoder(reasoner, cache, past)
    beams = _Beams.empty(prompt_ids.shape[0], num_beams, allowed.sink, device)
    steps = 0
    for depth in range(max_len):
        steps = length = depth + 1
        cand = _score_candidates(hidden, head, allowed, beams, depth, eos_token_id)
        if cand is None:
            break
        _merge_finished(beams, cand, length, length_penalty)
        parent = _select_running(beams, cand, allowed.sink)
        if length >= max_len or not _close_prompts(
            beams, length, max_len, length_penalty, stop_rule
        ):
            break
        hidden = decoder.advance(beams, parent, depth)

    res = BeamResult(
        states=beams.fin_state[:, :num_return],
        scores=beams.fin_score[:, :num_return],
        sum_logp=beams.fin_sum[:, :num_return],
        lengths=beams.fin_len[:, :num_return],
        num_steps=steps,
    )
    return attach_items(res, trie)


def _reorder_suffix(cache: Any, rows: torch.Tensor, shared_len: int) -> None:
    """``cache.reorder_cache(rows)`` for a within-prompt beam permutation, copying only the
    positions after ``shared_len`` (the prompt + latent part is the same in every beam of a
    prompt, so it is invariant). Only plain full-attention layers (``DynamicLayer``) keep
    position ``i`` at index ``i``: a sliding-window layer drops its oldest keys once the
    window is full, so its first ``shared_len`` slots then hold beam-specific tokens and a
    suffix-only copy would leave another beam's history there. Any other layout (sliding
    window, unknown) gets the full reorder."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(x).__name__ != "DynamicLayer" for x in layers):
        cache.reorder_cache(rows)
        return
    for layer in layers:
        for name in ("keys", "values"):
            kv = getattr(layer, name)
            if kv is None or kv.dim() != 4 or kv.shape[2] <= shared_len:
                continue
            kv[:, :, shared_len:] = kv[:, :, shared_len:].index_select(0, rows)
