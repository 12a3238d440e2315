"""BIGRec's original grounding (optional; BIGRec, paper Sec. 4.1 and Appendix B).

BIGRec first generates free text, then grounds it in the catalogue: the generated title and
every catalogue title are embedded by the backbone's last-token final hidden state (after the
final norm), and items are ranked by the L2 distance to the generated text. The catalogue
embeddings are computed once per catalogue (:class:`TitleIndex`) and reused for every query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .protocol import Reasoner
from .scoring import prefill

__all__ = ["TitleIndex", "embed_texts", "greedy_generate"]


@torch.no_grad()
def embed_texts(reasoner: Reasoner, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Last-token final-norm hidden state of each text.

    Args:
        reasoner: a LatentReasoner (its backbone and tokenizer are used; no latent).
        texts: N strings, each encoded without special tokens.
        batch_size: texts per forward.
    Returns:
        ``[N, d]`` fp32 embeddings (the empty string embeds as the pad token).
    """
    tok = reasoner.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for a in range(0, len(texts), batch_size):
        ids = [tok.encode(t, add_special_tokens=False) or [pad] for t in texts[a : a + batch_size]]
        width = max(len(x) for x in ids)
        prompt = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: the last token is at position -1
            prompt[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        hidden, _ = reasoner.encode_prompt(prompt.to(reasoner.device), mask.to(reasoner.device))
        out.append(hidden[:, -1].float())
    d = reasoner.backbone.config.hidden_size
    return torch.cat(out) if out else torch.empty((0, d), device=reasoner.device)


class TitleIndex:
    """Catalogue titles embedded once; ``rank(texts, k)`` grounds generated texts by L2.

    Args:
        reasoner: the LatentReasoner whose backbone embeds titles and queries.
        titles: the catalogue's titles, index = item id (duplicates allowed).
    """

    def __init__(self, reasoner: Reasoner, titles: Sequence[str], batch_size: int = 64) -> None:
        if not titles:
            raise ConfigError("TitleIndex: the catalogue has no titles")
        self.reasoner = reasoner
        self.titles = list(titles)
        self.embeddings = embed_texts(reasoner, self.titles, batch_size)  # [n_items, d]

    @torch.no_grad()
    def rank(self, texts: Sequence[str], k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest items of each text.

        Returns:
            ``(item_ids [B, k] long, distances [B, k] fp32)``, nearest first.
        """
        if k < 1:
            raise ConfigError(f"TitleIndex.rank: k={k} must be >= 1")
        query = embed_texts(self.reasoner, texts)
        # exact differences (no |a|^2+|b|^2-2ab cancellation): a title finds itself at 0
        dist = torch.cdist(query, self.embeddings, compute_mode="donot_use_mm_for_euclid_dist")
        k = min(k, dist.shape[1])
        d, idx = torch.topk(dist, k, dim=1, largest=False)
        return idx, d


@torch.no_grad()
def greedy_generate(
    reasoner: Reasoner,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int = 64,
) -> list[list[int]]:
    """Unconstrained greedy decoding after the prompt and the latent slot(s).

    BIGRec generates freely and grounds afterwards. Args are the left-padded prompt batch
    ``[B, L]``; returns per row the generated token ids up to (excluding) EOS. The next token
    is the argmax of the LM head's logits, bias included (as HF ``generate`` with
    ``do_sample=False``).
    """
    eos = reasoner.tokenizer.eos_token_id
    last, cache, past = prefill(reasoner, prompt_ids, prompt_mask)
    weight, bias = reasoner.lm_head_weight, reasoner.lm_head_bias
    rows = prompt_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        logits = last.to(weight.dtype) @ weight.T
        if bias is not None:
            logits = logits + bias
        nxt = logits.argmax(-1)  # a final-logit scale (> 0) does not move the argmax
        for i in torch.nonzero(~done).flatten().tolist():
            if int(nxt[i]) == eos:
                done[i] = True
            else:
                out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        last = reasoner.forward_embeds(reasoner.embed(nxt[:, None]), past, cache)[:, -1]
        past = torch.cat([past, torch.ones_like(past[:, :1])], dim=1)
    return out


@torch.no_grad()
def ground_batch(
    reasoner: Reasoner, encoded: Sequence[Any], index: TitleIndex, k: int, max_new_tokens: int = 64
) -> Any:
    """BIGRec ranking of a batch of EncodedSamples: free greedy text, then nearest titles.

    Returns an object shaped like a BeamResult for the evaluation loop: ``item_ids`` (per row,
    k single-item lists, nearest first), ``scores`` ``[B, k]`` (minus the L2 distance) and
    ``texts`` (the generated strings).
    """
    from types import SimpleNamespace

    from ..data import collate

    pad = reasoner.tokenizer.pad_token_id
    batch = collate(list(encoded), pad).to(reasoner.device)
    gen = greedy_generate(reasoner, batch.prompt_ids, batch.prompt_mask, max_new_tokens)
    # the target format is '"' + title + '"\n': ground the title inside the quotes
    texts = [reasoner.tokenizer.decode(g).strip().strip('"').strip() for g in gen]
    ids, dist = index.rank(texts, k)
    return SimpleNamespace(
        item_ids=[[[int(i)] for i in row] for row in ids.tolist()], scores=-dist, texts=texts
    )
